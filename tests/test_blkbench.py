"""The `blkbench` guest (bench/blk.py's workload), briefly, on pykvm and on QEMU: every test runs,
prints the line the benchmark parses, and reads back the stamps its writes left."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from bench.blk import RESULT
from tests.conftest import requires_kvm, run_pykvm

TESTS = ["seq-write-64k", "seq-read-64k", "rand-read-4k-qd1", "rand-write-4k-qd1", "rand-read-4k-qd8",
         "rand-write-4k-qd8"]
APPEND = "ms=30 gap=0 region=2 depth=8"


def _disk(path, size=8 << 20):
    with open(path, "wb") as f:
        f.truncate(size)
    return str(path)


def check_output(text: str) -> None:
    results = {m.group(1): m for m in map(RESULT.match, text.splitlines()) if m}
    assert list(results) == TESTS, text
    for name, match in results.items():
        assert int(match.group(4)) > 0 and int(match.group(5)) > 0, match.group(0)
        assert match.group(2) == ("1" if name.endswith("qd1") else "8")
    assert text.splitlines()[-1].startswith("blkbench: ok "), text


@requires_kvm
@pytest.mark.parametrize("append", ["", "irq=intx", "irq=poll event_idx=0 indirect=0"])
def test_blkbench_on_pykvm(tmp_path, guest_images, append):
    result = run_pykvm("run", "blkbench", "--disk", _disk(tmp_path / "disk.img"), "--append", f"{APPEND} {append}",
                       timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    check_output(result.stdout.decode())


def test_blkbench_refuses_a_read_only_disk(tmp_path, guest_images):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    disk = _disk(tmp_path / "disk.img")
    result = _qemu(guest_images["blkbench"], disk, APPEND, readonly=True)
    assert result.returncode == 2 << 1 | 1, result.stdout
    assert b"blkbench: FAIL the disk is read-only" in result.stdout


def test_blkbench_on_qemu(tmp_path, guest_images):
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    result = _qemu(guest_images["blkbench"], _disk(tmp_path / "disk.img"), APPEND)
    assert result.returncode == 0, result.stdout
    check_output(result.stdout.decode())


def _qemu(image, disk: str, append: str, *, readonly: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-m", "64", "-nodefaults", "-no-reboot",
         "-display", "none", "-serial", "stdio", "-monitor", "none",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
         "-drive", f"if=none,id=d0,file={disk},format=raw" + (",readonly=on" if readonly else ""),
         "-device", "virtio-blk-pci,drive=d0,disable-legacy=on", "-kernel", str(image), "-append", append],
        capture_output=True, timeout=120)
