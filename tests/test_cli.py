"""The CLI as a user runs it: each guest's output and exit status, and every bad input."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, requires_kvm, run_pykvm

pytestmark = requires_kvm


def test_default_guest_greets_and_exits_zero():
    result = run_pykvm("run")
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"Hello from pykvm! This is the embedded default guest; it resets the machine now.\n"
    assert result.stderr == b""


def test_hello_prints_cmdline_and_memory(guest_images):
    result = run_pykvm("run", "hello", "--mem", "96M", "--append", "answer=42 greeting=hi")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines == ["Hello from pykvm guest!", "cmdline: answer=42 greeting=hi", f"memory: {96 * 1024} KiB"]


def test_hello_as_elf64_enters_in_long_mode(guest_images):
    """The .elf of a guest starts at its 64-bit entry through the ELF64 loader."""
    elf = guest_images["hello"].with_suffix(".elf")
    result = run_pykvm("run", str(elf), "--append", "via=elf64", "--trace")
    assert result.returncode == 0, result.stderr
    assert b"cmdline: via=elf64" in result.stdout
    assert b"loaded elf64 image" in result.stderr


def test_compute_checks_its_result(guest_images):
    result = run_pykvm("run", "compute", "--append", "rounds=20")
    assert result.returncode == 0, result.stderr
    assert b"compute: ok rounds=20 primes=78498" in result.stdout


def test_timer_counts_pit_and_lapic_interrupts(guest_images):
    result = run_pykvm("run", "timer")
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"timer: ok" in result.stdout


def test_dirty_reports_rate_and_finishes(guest_images):
    result = run_pykvm("run", "dirty", "--append", "pages=512 seconds=2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.decode()
    assert "pages/s" in out and out.rstrip().endswith("dirty: done")


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_every_vcpu_checks_in(guest_images, cpus):
    result = run_pykvm("run", "smp", "--cpus", str(cpus))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.decode()
    for cpu in range(cpus):
        assert f"smp: cpu {cpu} checked in" in out
    assert f"smp: all {cpus} cpus checked in" in out


def test_guest_exit_status_passes_through(guest_images, tmp_path):
    """A flat real-mode binary writing 0x2a to the debug-exit port: the VMM exits 42."""
    image = tmp_path / "exit42.bin"
    image.write_bytes(bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4]))  # mov al, 42; out 0xf4, al; hlt
    result = run_pykvm("run", str(image), "--load-addr", "0x7c00")
    assert result.returncode == 42, result.stderr


def test_serial_to_file(tmp_path):
    log = tmp_path / "serial.log"
    result = run_pykvm("run", "--serial", f"file:{log}")
    assert result.returncode == 0
    assert result.stdout == b""
    assert log.read_bytes().startswith(b"Hello from pykvm!")


def test_serial_input_reaches_the_guest(tmp_path):
    """Real-mode echo loop: read COM1 until a byte arrives, echo it, and exit with it as status."""
    code = bytes([
        0xBA, 0xFD, 0x03,  # mov dx, 0x3fd (LSR)
        0xEC,              # wait: in al, dx
        0xA8, 0x01,        # test al, 1 (data ready)
        0x74, 0xFB,        # jz wait
        0xBA, 0xF8, 0x03,  # mov dx, 0x3f8
        0xEC,              # in al, dx
        0xEE,              # out dx, al
        0xE6, 0xF4,        # out 0xf4, al
        0xF4,              # hlt
    ])
    image = tmp_path / "echo.bin"
    image.write_bytes(code)
    result = run_pykvm("run", str(image), "--load-addr", "0x7c00", input=b"A")
    assert result.stdout == b"A"
    assert result.returncode == ord("A")


def test_trace_prints_exits_with_port_and_data():
    result = run_pykvm("run", "--trace")
    assert result.returncode == 0
    trace = result.stderr.decode()
    assert "[vcpu0] io   out port=0x03f8 size=1 data=0x48" in trace  # 'H'
    assert "[vcpu0] io   out port=0x0064 size=1 data=0xfe" in trace
    assert trace.rstrip().endswith("pykvm: guest reset")


def test_triple_fault_is_reported_with_registers_and_disassembly(tmp_path):
    """32-bit code dividing by zero with no IDT: #DE, then #DF, then a triple fault."""
    image = tmp_path / "crash.bin"
    image.write_bytes(bytes([0x31, 0xC0,    # xor eax, eax
                             0xF7, 0xF0]))  # div eax
    result = run_pykvm("run", str(image), "--load-addr", "0x100000")
    assert result.returncode == 1
    err = result.stderr.decode()
    assert "triple fault" in err
    assert "vcpu0 registers (32-bit protected mode)" in err and "rip=0x0000000000100002" in err
    assert "div eax" in err  # the faulting instruction, disassembled by capstone


def test_a_plain_run_loads_neither_numpy_nor_capstone_nor_ssl():
    """They cost ~27 MiB resident together; only migration, FT, snapshots, crash reports and TLS
    need them (bench/footprint.py)."""
    code = ("import sys\nfrom pykvm import cli\nstatus = cli.main(['run', '--serial', 'none'])\n"
            "print(status, *[m for m in ('numpy', 'capstone', 'ssl', 'pykvm.ft.primary', 'pykvm.transfer.wire') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert result.stdout.decode().splitlines()[-1] == "0", result.stdout + result.stderr


# -- bad input: one line on stderr, exit status 2, no traceback ---------------------------------


def _assert_usage_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("pykvm: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err


def test_missing_image():
    _assert_usage_error(run_pykvm("run", "/no/such/image.bin"), "no such file")


def test_unknown_guest_name():
    _assert_usage_error(run_pykvm("run", "hellp"), "neither a bundled guest", "hello")


def test_file_of_no_known_format(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(4096).replace(b"\x7fELF", b"xxxx").replace(b"\x02\xb0\xad\x1b", b"xxxx"))
    _assert_usage_error(run_pykvm("run", str(junk)), "not an ELF64, multiboot or flat image")


def test_truncated_elf(guest_images, tmp_path):
    elf = guest_images["hello"].with_suffix(".elf").read_bytes()
    cut = tmp_path / "cut.elf"
    cut.write_bytes(elf[: len(elf) // 2])
    _assert_usage_error(run_pykvm("run", str(cut)), "truncated ELF")


@pytest.mark.parametrize("mem, message", [("lots", "not a size"), ("1M", "at least 2 MiB"), ("4097K", "multiple of 4 KiB")])
def test_bad_mem(mem, message):
    _assert_usage_error(run_pykvm("run", "--mem", mem), message)


def test_mem_too_small_for_image(tmp_path):
    image = tmp_path / "big.bin"
    image.write_bytes(b"\xf4" * (3 << 20))
    _assert_usage_error(run_pykvm("run", str(image), "--load-addr", "0x100000", "--mem", "2M"),
                        "does not fit in guest RAM of 2 MiB")


def test_too_many_cpus():
    _assert_usage_error(run_pykvm("run", "--cpus", "100000"), "vCPUs")


def test_bad_serial_spec():
    _assert_usage_error(run_pykvm("run", "--serial", "tcp:1234"), "expected stdio, file:PATH or none")


def test_unaligned_real_mode_load_address(tmp_path):
    image = tmp_path / "x.bin"
    image.write_bytes(b"\xf4")
    _assert_usage_error(run_pykvm("run", str(image), "--load-addr", "0x7c01"), "16-byte aligned")


needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root and unshare(1) for a private /dev"
)


@needs_unshare
def test_missing_dev_kvm():
    """In a mount namespace whose /dev is empty, as on a host without KVM."""
    script = f"mount -t tmpfs none /dev && cd {REPO} && exec \"$0\" -m pykvm run"
    result = run_pykvm(prefix=("unshare", "-m", "sh", "-c", script))  # python path passed as $0
    _assert_usage_error(result, "/dev/kvm does not exist")


@needs_unshare
def test_unusable_dev_kvm():
    """/dev/kvm that is not KVM at all (here: /dev/null bound over it)."""
    script = f"mount --bind /dev/null /dev/kvm && cd {REPO} && exec \"$0\" -m pykvm run"
    result = run_pykvm(prefix=("unshare", "-m", "sh", "-c", script))
    _assert_usage_error(result, "/dev/kvm")
