"""The debug target for Python code (notebooks, teaching): breakpoints by name, run until a stop.

    debugger = Debugger(machine, elf=guest_elf("compute"))   # the guest waits at its first instruction
    debugger.break_at("run")
    stop = debugger.run()          # StopEvent: a breakpoint, a step, or the guest's end
    debugger.registers()["rip"], debugger.read(address, 16), debugger.step()

It drives the same DebugTarget as the gdb server, so what works in gdb works here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pykvm.gdb import registers as regs
from pykvm.gdb.symbols import read_symbols
from pykvm.gdb.target import DebugTarget, StopEvent

if TYPE_CHECKING:
    from pykvm.machine import Machine


class Debugger:
    def __init__(self, machine: Machine, *, elf: str | Path | None = None) -> None:
        """Call before the machine runs: its vCPUs are held at their first instruction."""
        self.machine = machine
        self.target = DebugTarget(machine.vm)
        self.symbols = read_symbols(elf) if elf is not None else {}

    def address(self, where: int | str) -> int:
        if isinstance(where, int):
            return where
        if where not in self.symbols:
            raise KeyError(f"no symbol {where!r}" + ("" if self.symbols else " (give Debugger an elf=)"))
        return self.symbols[where]

    def break_at(self, where: int | str, *, hardware: bool = False) -> int:
        """A breakpoint at an address or a symbol; returns the address."""
        address = self.address(where)
        self.target.insert_breakpoint(address, hardware=hardware)
        return address

    def remove(self, where: int | str, *, hardware: bool = False) -> None:
        self.target.remove_breakpoint(self.address(where), hardware=hardware)

    def run(self, timeout: float | None = None) -> StopEvent | None:
        """Run until a breakpoint or the guest's end (None if `timeout` seconds pass first)."""
        self._start()
        self.target.resume()
        return self.target.wait(timeout)

    def step(self, thread: int | None = None, timeout: float | None = None) -> StopEvent | None:
        """One instruction on `thread` (vCPU index + 1; default: the one that stopped last)."""
        self._start()
        self.target.resume(step_thread=thread or self.target.current)
        return self.target.wait(timeout)

    def pause(self) -> StopEvent:
        """Stop the running guest where it is."""
        return self.target.interrupt()

    def registers(self, thread: int | None = None) -> dict[str, int]:
        return {register.name: value for register, value in zip(regs.REGISTERS, self.target.read_registers(thread))}

    def set_registers(self, thread: int | None = None, **values: int) -> None:
        self.target.write_registers({regs.NUMBER[name]: value for name, value in values.items()}, thread)

    def read(self, where: int | str, length: int, thread: int | None = None) -> bytes:
        """Guest-virtual memory, through the vCPU's page tables."""
        return self.target.read_memory(self.address(where), length, thread)

    def write(self, where: int | str, data: bytes, thread: int | None = None) -> None:
        self.target.write_memory(self.address(where), data, thread)

    def detach(self) -> None:
        """Remove every breakpoint and let the guest run on undebugged."""
        self._start()
        self.target.detach()

    def _start(self) -> None:
        if all(vcpu.thread is None for vcpu in self.machine.vm.vcpus):
            self.machine.vm.start()
