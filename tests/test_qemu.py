"""The same guest images boot on QEMU (`-kernel`, multiboot) with the same results: our guests and
our loader follow the multiboot spec, not pykvm's quirks."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from pykvm.boot.embedded import default_guest_image
from tests.conftest import kvm_usable

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
ACCEL = "kvm" if kvm_usable() else "tcg"


def run_qemu(image, *, append: str = "", accel: str = ACCEL, smp: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [QEMU, "-accel", accel, "-M", "pc", "-m", "64", "-smp", str(smp), "-nodefaults", "-no-reboot",
         "-display", "none", "-serial", "stdio", "-monitor", "none",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01", "-kernel", str(image), "-append", append],
        capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
    )


def test_hello_on_qemu(guest_images):
    result = run_qemu(guest_images["hello"], append="on=qemu")
    assert result.returncode == 0, result.stderr
    greeting, cmdline, memory = result.stdout.decode().replace("\r", "").splitlines()
    assert greeting == "Hello from pykvm guest!"
    assert cmdline.endswith(" on=qemu")  # QEMU, like GRUB, puts the image path first
    assert memory.startswith("memory: ") and memory.endswith(" KiB")


def test_embedded_default_guest_on_qemu(tmp_path):
    image = tmp_path / "default.bin"
    image.write_bytes(default_guest_image())
    result = run_qemu(image)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"Hello from pykvm! This is the embedded default guest")


def test_smp_on_qemu(guest_images):
    result = run_qemu(guest_images["smp"], smp=2, accel="tcg")
    assert result.returncode == 0, result.stdout + result.stderr
    assert b"smp: all 2 cpus checked in" in result.stdout
