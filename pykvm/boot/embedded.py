"""The embedded default guest that `pykvm run` boots when given no image: a multiboot image of
a few hand-assembled 32-bit instructions that print a greeting on COM1 and reset the machine
through the i8042 (which ends the run with status 0). It needs no toolchain, and it boots on
`qemu-system-x86_64 -kernel` too."""

from __future__ import annotations

from pykvm.boot import formats as f

LOAD_ADDR = 0x10_0000
GREETING = b"Hello from pykvm! This is the embedded default guest; it resets the machine now.\n"

_HEADER_SIZE = f.MultibootHeader.sizeof()
ENTRY = LOAD_ADDR + _HEADER_SIZE
_CODE_SIZE = 25
MESSAGE = ENTRY + _CODE_SIZE


def _code() -> bytes:
    return b"".join([
        b"\xfc",                                   #       cld
        b"\xbe" + MESSAGE.to_bytes(4, "little"),   #       mov esi, MESSAGE
        b"\x66\xba\xf8\x03",                       #       mov dx, 0x3f8      ; COM1 data
        b"\xac",                                   # next: lodsb
        b"\x84\xc0",                               #       test al, al
        b"\x74\x03",                               #       jz done
        b"\xee",                                   #       out dx, al
        b"\xeb\xf8",                               #       jmp next
        b"\xb0\xfe",                               # done: mov al, 0xfe      ; pulse reset
        b"\xe6\x64",                               #       out 0x64, al
        b"\xf4",                                   # halt: hlt
        b"\xeb\xfd",                               #       jmp halt
    ])


def default_guest_image() -> bytes:
    flags = f.MB_MEMORY_INFO | f.MB_AOUT_KLUDGE
    header = f.MultibootHeader.build(dict(
        flags=flags,
        checksum=-(f.MULTIBOOT_HEADER_MAGIC + flags) & 0xFFFF_FFFF,
        header_addr=LOAD_ADDR,
        load_addr=LOAD_ADDR,
        load_end_addr=0,  # the whole file
        bss_end_addr=0,
        entry_addr=ENTRY,
    ))
    code = _code()
    assert len(code) == _CODE_SIZE
    return header + code + GREETING + b"\0"
