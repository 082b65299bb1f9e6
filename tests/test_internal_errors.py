"""int3 and fwait in guest ring 0: hardware KVM runs them itself; KVM's PVM backend hands them to
the VMM as KVM_EXIT_INTERNAL_ERROR, and pykvm.internal_errors completes them. Either way the
guest must see what a CPU does: #BP delivered with the return address after the int3, fwait a
no-op. Anything else the backend gives up on still stops the VM with a report."""

from __future__ import annotations

from pathlib import Path

from conftest import requires_kvm, run_pykvm

pytestmark = requires_kvm

LOAD = 0x1000  # real mode: CS = 0x100, IP = 0

# 16-bit code. The #BP handler (IVT entry 3) sets BL = 1 and returns; the main line then runs
# fwait and exits through port 0xF4 with 40 + BL: 41 only if the handler ran and returned past
# the int3 (a wrong return address would run the int3 again, forever).
GUEST = bytes([
    0x31, 0xC0,                    # 00 xor ax, ax
    0x8E, 0xD8,                    # 02 mov ds, ax
    0xC7, 0x06, 0x0C, 0x00, 0x1D, 0x00,  # 04 mov word [0x0c], 0x001d (handler offset)
    0xC7, 0x06, 0x0E, 0x00, 0x00, 0x01,  # 0a mov word [0x0e], 0x0100 (handler segment)
    0xB3, 0x00,                    # 10 mov bl, 0
    0xCC,                          # 12 int3
    0x9B,                          # 13 fwait
    0x88, 0xD8,                    # 14 mov al, bl
    0x04, 0x28,                    # 16 add al, 40
    0xE6, 0xF4,                    # 18 out 0xf4, al
    0xF4,                          # 1a hlt
    0xEB, 0xFD,                    # 1b jmp 0x1a
    0xB3, 0x01,                    # 1d handler: mov bl, 1
    0xCF,                          # 1f iret
])


def test_int3_reaches_the_guest_handler_and_fwait_completes(tmp_path: Path) -> None:
    image = tmp_path / "int3.bin"
    image.write_bytes(GUEST)
    result = run_pykvm("run", str(image), "--load-addr", hex(LOAD), timeout=60)
    assert result.returncode == 41, result.stderr.decode()

