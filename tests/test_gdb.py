"""The gdb stub with a real gdb and over raw sockets: breakpoints in guest ring 0 (hardware) and
ring 3 (software), a variable read, steps, the guest's exit status; Ctrl-C, threads, detach,
re-attach and kill; a busy port."""

from __future__ import annotations

import shutil
import socket
import subprocess

import pytest

from pykvm.gdb import packets as rsp
from pykvm.gdb.registers import G_PACKET_BYTES
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.test_ft import _free_port

pytestmark = requires_kvm

GDB_SCRIPT = """\
set pagination off
set confirm off
target remote 127.0.0.1:{port}
info threads
hbreak guest_main
break run
continue
print/x $pc
continue
print *(unsigned long *)arg
stepi
print/x $pc
next
info line *$pc
delete
continue
"""


def _elf(name: str) -> str:
    result = run_pykvm("guests", "path", name, "--elf")
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def _symbol(elf: str, name: str) -> int:
    for line in subprocess.run(["nm", elf], capture_output=True, text=True, check=True).stdout.splitlines():
        address, _, symbol = line.split()
        if symbol == name:
            return int(address, 16)
    raise AssertionError(f"{name} not in {elf}")


def test_guests_path_elf_is_only_the_path_of_an_elf_with_symbols(guest_images):
    result = run_pykvm("guests", "path", "compute", "--elf")
    path = result.stdout.decode()
    assert result.returncode == 0 and path.endswith(".elf\n") and path.count("\n") == 1
    elf = path.strip()
    with open(elf, "rb") as file:
        assert file.read(4) == b"\x7fELF"
    sections = subprocess.run(["objdump", "-h", elf], capture_output=True, text=True, check=True).stdout
    assert ".debug_info" in sections and _symbol(elf, "run") > 0


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (scripts/setup.sh test installs it)")
def test_gdb_breaks_reads_a_variable_steps_and_sees_the_exit_status(tmp_path, guest_images):
    elf, port = _elf("compute"), _free_port()
    vmm = VmmProcess("run", "compute", "--append", "rounds=3", "--gdb", f"tcp:127.0.0.1:{port}")
    try:
        vmm.stderr.wait_for(b"waiting for gdb on")
        assert vmm.output == ""  # the guest waits at its first instruction
        script = tmp_path / "session.gdb"
        script.write_text(GDB_SCRIPT.format(port=port))
        gdb = subprocess.run(["gdb", "-batch", "-nx", "-x", str(script), elf], capture_output=True, text=True,
                             timeout=120)
        out = gdb.stdout
        assert "Thread 1 (vCPU 0)" in out, out + gdb.stderr
        # the hardware breakpoint in ring 0, then the software one in ring 3
        assert "Breakpoint 1, guest_main ()" in out, out + gdb.stderr
        assert f"$1 = {_symbol(elf, 'guest_main'):#x}" in out
        assert "Breakpoint 2, run (arg=" in out
        assert "$2 = 3" in out  # the rounds= of the command line, read through the pointer
        assert f"$3 = {_symbol(elf, 'run') + 2:#x}" in out  # stepi: past `push %r12` (2 bytes)
        assert 'Line 80 of "' in out or "80\t\tcrc_table_init();" in out  # next: the next source line
        assert "[Inferior 1 (Remote target) exited normally]" in out
        assert vmm.wait(60) == 0
        assert "compute: ok rounds=3" in vmm.output
    finally:
        vmm.kill()


class RspClient:
    """gdb's side of the protocol, byte by byte, for what batch gdb cannot do (Ctrl-C, re-attach)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.decoder = rsp.Decoder()
        self.pending: list = []

    def send(self, payload: bytes) -> None:
        self.sock.sendall(rsp.encode(payload))

    def reply(self) -> bytes:
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, rsp.Packet):
                    self.sock.sendall(b"+")
                    return event.payload
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.pending += self.decoder.feed(data)

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def test_interrupt_threads_registers_memory_detach_reattach_and_kill(guest_images):
    elf, port = _elf("compute"), _free_port()
    vmm = VmmProcess("run", "compute", "--cpus", "2", "--append", "rounds=1000000", "--gdb", f"tcp:127.0.0.1:{port}")
    try:
        vmm.stderr.wait_for(b"waiting for gdb on")
        gdb = RspClient(port)
        assert b"swbreak+" in gdb.ask(b"qSupported:multiprocess+;swbreak+;hwbreak+")
        assert gdb.ask(b"?").startswith(b"T05thread:1;")
        assert gdb.ask(b"qfThreadInfo") == b"m1,2"  # one thread per vCPU
        assert gdb.ask(b"qThreadExtraInfo,2") == b"vCPU 1".hex().encode()
        assert gdb.ask(b"Hg2") == b"OK" and gdb.ask(b"Hg3").startswith(b"E")
        rip = int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little")
        assert rip == 0xFFF0  # vCPU 1 waits for INIT-SIPI in its reset state (CS base 0xffff0000)
        assert gdb.ask(b"Hg1") == b"OK"
        start = _symbol(elf, "_start32")
        assert int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little") == start
        assert gdb.ask(b"m%x,1" % start) == b"fa"  # cli, read through the page tables (none yet: linear)
        assert gdb.ask(b"m7fffffff000,8").startswith(b"E")  # beyond RAM: an error, not a crash
        gdb.send(b"c")
        vmm.wait_for(b"compute: rounds=1000000")
        gdb.sock.sendall(b"\x03")
        assert gdb.reply().startswith(b"T02thread:")  # SIGINT
        registers = gdb.ask(b"g")
        assert len(registers) == 2 * G_PACKET_BYTES
        assert gdb.ask(b"D") == b"OK"  # detached: the guest runs on
        gdb.close()
        vmm.stderr.wait_for(b"gdb detached; the guest runs on")
        assert vmm.proc.poll() is None
        again = RspClient(port)  # attaching again stops the guest where it is
        assert again.ask(b"?").startswith(b"T")
        again.send(b"k")
        assert vmm.wait(60) == 0
        assert "compute: ok" not in vmm.output  # killed long before the million rounds
    finally:
        vmm.kill()


def test_busy_gdb_port_is_one_line_and_status_2(guest_images):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        result = run_pykvm("run", "compute", "--gdb", f"tcp:127.0.0.1:{port}")
    errors = result.stderr.decode()
    assert result.returncode == 2
    assert errors.count("\n") == 1 and "--gdb" in errors and "Address already in use" in errors
    result = run_pykvm("run", "--gdb", "127.0.0.1:1234")
    assert result.returncode == 2 and result.stderr.decode() == \
        "pykvm: error: --gdb '127.0.0.1:1234': expected tcp:HOST:PORT (port 1-65535)\n"


def test_restore_waits_for_gdb_at_the_snapshot_then_runs_it(tmp_path, guest_images):
    control, snap = str(tmp_path / "vm.sock"), str(tmp_path / "vm.snap")
    source = VmmProcess("run", "compute", "--append", "rounds=1000000", "--control", control)
    try:
        source.wait_for(b"compute: rounds=1000000")
        assert run_pykvm("ctl", control, "snapshot", snap).returncode == 0
        assert run_pykvm("ctl", control, "quit").returncode == 0
        assert source.wait(60) == 0
    finally:
        source.kill()
    port = _free_port()
    restored = VmmProcess("restore", snap, "--gdb", f"tcp:127.0.0.1:{port}")
    try:
        restored.stderr.wait_for(b"waiting for gdb on")
        gdb = RspClient(port)
        assert gdb.ask(b"?").startswith(b"T05thread:1;")
        rip = int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little")
        assert gdb.ask(b"m%x,1" % rip) != b""  # the restored vCPU's code, through its page tables
        memset = _symbol(_elf("compute"), "memset")  # each round's sieve starts with one
        assert gdb.ask(b"Z0,%x,1" % memset) == b"OK"
        assert gdb.ask(b"c") == b"T05thread:1;swbreak:;"
        assert int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little") == memset
        gdb.send(b"k")
        assert restored.wait(60) == 0
    finally:
        restored.kill()


def test_each_vcpu_is_a_thread_that_stops_at_breakpoints(guest_images):
    elf, port = _elf("smp"), _free_port()
    vmm = VmmProcess("run", "smp", "--cpus", "2", "--gdb", f"tcp:127.0.0.1:{port}")
    try:
        vmm.stderr.wait_for(b"waiting for gdb on")
        gdb = RspClient(port)
        # check_in's out-of-line copy runs on the AP only (the BSP's call is inlined into guest_main)
        check_in = _symbol(elf, "check_in")
        assert gdb.ask(b"Z0,%x,1" % check_in) == b"OK"
        assert gdb.ask(b"c") == b"T05thread:2;swbreak:;"
        assert gdb.ask(b"qC") == b"QC2"
        assert int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little") == check_in
        assert gdb.ask(b"Hg1") == b"OK"  # the BSP, stopped with it somewhere in guest_main
        bsp_rip = int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little")
        assert bsp_rip != check_in and 0x100000 <= bsp_rip < check_in + 0x10000
        assert gdb.ask(b"z0,%x,1" % check_in) == b"OK"
        assert gdb.ask(b"Hc2") == b"OK"
        assert gdb.ask(b"s") == b"T05thread:2;"  # a step of the AP (ring 0)
        assert gdb.ask(b"Hg2") == b"OK"
        assert int.from_bytes(bytes.fromhex(gdb.ask(b"p10").decode()), "little") > check_in
        assert gdb.ask(b"c") == b"W00"
        assert vmm.wait(60) == 0
        assert "smp: all 2 cpus checked in" in vmm.output
    finally:
        vmm.kill()
