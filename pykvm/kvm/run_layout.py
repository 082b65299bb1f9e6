"""Where the vCPU run loop finds things in the kvm_run page, derived from the ctypes ``KvmRun``.

The loop reads kvm_run through a memoryview and ``struct.unpack_from`` rather than through ctypes
attributes (several times cheaper per exit), so it needs plain offsets and ``struct.Struct``s.
They are computed here once, at import, from the same ctypes layout the uapi test checks against
<linux/kvm.h>: nothing is written twice.
"""

from __future__ import annotations

import ctypes
import struct

from .structs import KvmRun, KvmRunIo, KvmRunMmio

__all__ = ["EXIT_REASON_WORD", "IO_EXIT", "IO_EXIT_OFFSET", "MMIO_EXIT", "MMIO_EXIT_OFFSET", "MMIO_DATA_OFFSET"]

_UNSIGNED = {1: "B", 2: "H", 4: "I", 8: "Q"}


def unpacker(ctype: type[ctypes.Structure]) -> struct.Struct:
    """A little-endian ``struct.Struct`` with one item per field of ``ctype`` (unsigned integers, or
    byte arrays as ``bytes``), padding included, so it reads a ``ctype`` at the same offsets."""
    layout, end = "<", 0
    for name, field_type in ctype._fields_:
        field = getattr(ctype, name)
        layout += "x" * (field.offset - end)
        if issubclass(field_type, ctypes.Array):
            if ctypes.sizeof(field_type._type_) != 1:
                raise TypeError(f"{ctype.__name__}.{name}: only byte arrays unpack as bytes")
            layout += f"{field.size}s"
        else:
            layout += _UNSIGNED[field.size]
        end = field.offset + field.size
    return struct.Struct(layout)


# exit_reason read as an item of the page cast to u32: one index, no unpack.
assert KvmRun.exit_reason.offset % 4 == 0 and KvmRun.exit_reason.size == 4
EXIT_REASON_WORD = KvmRun.exit_reason.offset // 4

IO_EXIT = unpacker(KvmRunIo)  # direction, size, port, count, data_offset
IO_EXIT_OFFSET = KvmRun.io.offset
MMIO_EXIT = unpacker(KvmRunMmio)  # phys_addr, data, len, is_write
MMIO_EXIT_OFFSET = KvmRun.mmio.offset
MMIO_DATA_OFFSET = MMIO_EXIT_OFFSET + KvmRunMmio.data.offset  # where an MMIO read's value goes
