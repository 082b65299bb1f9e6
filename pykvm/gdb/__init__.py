"""A gdb stub: the GDB remote serial protocol over TCP (`--gdb tcp:HOST:PORT`), and the debug
target it drives, which Python code can use directly (pykvm.Debugger).

    packets.py    the protocol's framing, checksums and escapes, sans-IO
    registers.py  x86-64 registers in gdb's order, the target description, their values on a vCPU
    virtual.py    guest-virtual memory through the vCPU's page tables; GDT descriptors
    breakpoints.py int3 bytes and debug-register slots
    stepping.py   where an instruction can go next (capstone), for steps by temporary breakpoints
    target.py     the debugged VM: stops, resume, step, breakpoints, registers, memory
    server.py     the TCP server: one gdb at a time, packets to target calls

It sits above the VM layer (it hooks vCPU exits, as run_control pauses them); no device imports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pykvm.gdb.server import GdbServer
from pykvm.gdb.target import DebugTarget, StopEvent
from pykvm.errors import ConfigError
from pykvm.transfer.tcp import listen, parse_tcp_uri

if TYPE_CHECKING:
    from pykvm.vm import Vm

__all__ = ["DebugTarget", "GdbServer", "StopEvent", "serve"]


def serve(vm: Vm, uri: str, log: Callable[[str], None]) -> GdbServer:
    """Listen for gdb at `uri` (a busy port: ConfigError), the VM held at its first instruction
    until gdb continues it. Call before the VM starts."""
    try:
        parse_tcp_uri(uri)
    except ConfigError as error:
        raise ConfigError(f"--gdb {error}") from None
    listener = listen(uri, "--gdb")
    server = GdbServer(DebugTarget(vm), listener, log)
    server.start()
    log(f"pykvm: waiting for gdb on {uri}")
    return server
