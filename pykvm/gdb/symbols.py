"""Function and object symbols of an ELF64 file (its .symtab), for naming breakpoints in Python."""

from __future__ import annotations

import struct
from pathlib import Path

from pykvm.errors import ConfigError

_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")  # Elf64_Ehdr
_SECTION = struct.Struct("<IIQQQQIIQQ")  # Elf64_Shdr
_SYMBOL = struct.Struct("<IBBHQQ")  # Elf64_Sym
SHT_SYMTAB = 2
STT_OBJECT, STT_FUNC = 1, 2


def read_symbols(path: str | Path) -> dict[str, int]:
    """name -> address of every function and object the ELF's symbol table names."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER.size or data[:5] != b"\x7fELF\x02":
        raise ConfigError(f"{path}: not an ELF64 file")
    header = _HEADER.unpack_from(data)
    shoff, shentsize, shnum = header[6], header[11], header[12]
    sections = []
    for index in range(shnum):
        at = shoff + index * shentsize
        if shentsize < _SECTION.size or at + _SECTION.size > len(data):
            raise ConfigError(f"{path}: section header {index} lies outside the file")
        sections.append(_SECTION.unpack_from(data, at))
    symbols: dict[str, int] = {}
    for kind, offset, size, link in ((s[1], s[4], s[5], s[6]) for s in sections):
        if kind != SHT_SYMTAB or link >= len(sections):
            continue
        strings_at, strings_size = sections[link][4], sections[link][5]
        strings = data[strings_at: strings_at + strings_size]
        for at in range(offset, min(offset + size, len(data)) - _SYMBOL.size + 1, _SYMBOL.size):
            name_at, info, _, _, value, _ = _SYMBOL.unpack_from(data, at)
            if info & 0xF in (STT_OBJECT, STT_FUNC) and name_at < len(strings):
                name = strings[name_at: strings.find(b"\0", name_at)].decode(errors="replace")
                symbols.setdefault(name, value)
    if not symbols:
        raise ConfigError(f"{path}: no symbol table (stripped?)")
    return symbols
