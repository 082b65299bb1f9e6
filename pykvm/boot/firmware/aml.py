"""AML, the ACPI Machine Language: just the objects pykvm's DSDT needs (ACPI 6.x, chapter 20),
and the resource descriptors of a PCI host bridge's _CRS (chapter 6.4).

Each function returns the encoded bytes of one term; a term that holds others (a package, a
device, a scope) takes their encodings and prefixes its opcode and PkgLength.
"""

from __future__ import annotations

from construct import Int16ul, Int32ul


def pkg_length(content: int) -> bytes:
    """PkgLength: the length of the package including the encoding's own bytes."""
    if content + 1 < 0x40:
        return bytes([content + 1])
    for extra in (1, 2, 3):
        total = content + 1 + extra
        if total < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (total & 0xF)]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError("AML package too long")


def name_seg(name: str) -> bytes:
    return name.ljust(4, "_").encode()


def integer(value: int) -> bytes:
    if value == 0:
        return b"\x00"  # ZeroOp
    if value == 1:
        return b"\x01"  # OneOp
    for prefix, size in ((0x0A, 1), (0x0B, 2), (0x0C, 4), (0x0E, 8)):
        if value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(value)


def package(elements: list[bytes]) -> bytes:
    content = bytes([len(elements)]) + b"".join(elements)
    return b"\x12" + pkg_length(len(content)) + content  # PackageOp


def buffer(data: bytes) -> bytes:
    content = integer(len(data)) + data
    return b"\x11" + pkg_length(len(content)) + content  # BufferOp


def name(name: str, value: bytes) -> bytes:
    return b"\x08" + name_seg(name) + value  # NameOp


def device(name: str, body: bytes) -> bytes:
    content = name_seg(name) + body
    return b"\x5b\x82" + pkg_length(len(content)) + content  # DeviceOp


def scope(path: bytes, body: bytes) -> bytes:
    content = path + body
    return b"\x10" + pkg_length(len(content)) + content  # ScopeOp


def eisa_id(text: str) -> int:
    """A compressed EISA ID ("PNP0A03") as the 32-bit integer AML stores."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    value = (letters[0] << 26) | (letters[1] << 21) | (letters[2] << 16) | int(text[3:], 16)
    return int.from_bytes(value.to_bytes(4, "big"), "little")


# -- resource descriptors (a _CRS buffer's contents) ----------------------------------------------

def word_address(resource_type: int, type_flags: int, low: int, high: int) -> bytes:
    """A Word Address Space descriptor (bus numbers or I/O) the bridge produces."""
    return bytes([0x88]) + Int16ul.build(13) + bytes([resource_type, 0x0C, type_flags]) + b"".join(
        Int16ul.build(v) for v in (0, low, high, 0, high - low + 1))


def dword_memory(low: int, high: int) -> bytes:
    """A DWord Memory descriptor: a read-write, non-cacheable window the bridge produces."""
    return bytes([0x87]) + Int16ul.build(23) + bytes([0, 0x0C, 0x01]) + b"".join(
        Int32ul.build(v) for v in (0, low, high, 0, high - low + 1))


def io_port(base: int, length: int) -> bytes:
    """An I/O Port descriptor: `length` ports at a fixed `base`, decoding 16 address bits."""
    return bytes([0x47, 0x01]) + Int16ul.build(base) + Int16ul.build(base) + bytes([1, length])


END_TAG = bytes([0x79, 0x00])  # checksum 0: "treat as correct"
