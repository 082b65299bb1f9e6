"""The one save/restore contract: every part of the machine describes its state as a plain
dataclass, and this module turns such dataclasses into bytes and back, in two forms:

- `encode`/`decode`: JSON with bytes as hex (snapshots, migration, a config in a Hello);
- `pack`/`unpack`: a compact binary form (FT syncs, where a state goes many times a second):
  fields in declaration order, bytes and strings with a u32 length, ints as a length byte and
  that many little-endian bytes (signed), lists and dicts with a u32 count (a dict of u64s, as
  a vCPU's MSRs, in one struct call), an optional value behind a 0/1 byte; a type neither form
  names (Any, a union of types) goes as its JSON.

Both are decoded against the dataclass's type hints, so a state read from a file or a socket is
type-checked field by field and can never run code (as pickle could). Unknown or missing fields,
values of the wrong type, and binary data that is short, long or out of range raise StateError.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import types
import typing
from functools import cache
from typing import Any, Callable, Protocol, TypeVar

T = TypeVar("T")


class StateError(ValueError):
    """A state blob that does not decode into the expected dataclass."""


class Stateful(Protocol):
    """A part of the machine whose state can be captured and put back (the VM must be quiesced)."""

    def save_state(self) -> Any: ...
    def restore_state(self, state: Any) -> None: ...


def encode(state: Any) -> bytes:
    return json.dumps(_to_plain(state), separators=(",", ":")).encode()


def decode(cls: type[T], data: bytes | str) -> T:
    try:
        plain = json.loads(data)
    except (ValueError, UnicodeDecodeError) as error:
        raise StateError(f"{cls.__name__}: not valid JSON ({error})") from None
    return _from_plain(cls, plain, cls.__name__)


def to_plain(value: Any) -> Any:
    """A dataclass as JSON-ready data (what `encode` writes)."""
    return _to_plain(value)


def from_plain(cls: type[T], plain: Any) -> T:
    """The inverse of to_plain, checked against `cls`."""
    return _from_plain(cls, plain, cls.__name__)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, dict):
        return [[_to_plain(k), _to_plain(v)] for k, v in value.items()]
    return value


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _from_plain(kind: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise StateError(f"{where}: expected an object")
        hints = _hints(kind)
        names = {f.name for f in dataclasses.fields(kind) if f.init}
        if set(value) != names:
            raise StateError(f"{where}: fields {sorted(set(value) ^ names)} missing or unexpected")
        return kind(**{name: _from_plain(hints[name], value[name], f"{where}.{name}") for name in names})
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _from_plain(option, value, where)
            except StateError as error:
                errors.append(str(error))
        raise StateError("; ".join(errors) or f"{where}: unexpected null")
    if origin is list or origin is tuple:
        if not isinstance(value, list):
            raise StateError(f"{where}: expected a list")
        item = args[0] if args else Any
        items = [_from_plain(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, list) or not all(isinstance(p, list) and len(p) == 2 for p in value):
            raise StateError(f"{where}: expected a list of pairs")
        key_type, value_type = args
        return {_from_plain(key_type, k, where): _from_plain(value_type, v, where) for k, v in value}
    if kind is bytes:
        if not isinstance(value, str):
            raise StateError(f"{where}: expected hex bytes")
        try:
            return bytes.fromhex(value)
        except ValueError:
            raise StateError(f"{where}: not hex") from None
    if kind is bool:
        if not isinstance(value, bool):
            raise StateError(f"{where}: expected a boolean")
        return value
    if kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise StateError(f"{where}: expected an integer")
        return value
    if kind is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise StateError(f"{where}: expected a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise StateError(f"{where}: expected a string")
        return value
    if kind is Any:
        return value
    raise StateError(f"{where}: cannot decode type {kind!r}")


# -- the binary form -------------------------------------------------------------------------------

_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
Packer = Callable[[Any, bytearray], None]
Unpacker = Callable[[bytes, int], tuple[Any, int]]


def pack(state: Any, kind: Any = None) -> bytes:
    """`state` in the binary form; `kind` is its type (the dataclass's own by default)."""
    out = bytearray()
    _packer(kind or type(state))(state, out)
    return bytes(out)


def unpack(kind: type[T] | Any, data: bytes) -> T:
    """The inverse of pack, checked against `kind`: any damage raises StateError."""
    name = getattr(kind, "__name__", str(kind))
    try:
        value, end = _unpacker(kind)(data, 0)
    except StateError as error:
        raise StateError(f"{name}: {error}") from None
    except (struct.error, IndexError, ValueError, TypeError, UnicodeDecodeError, RecursionError) as error:
        raise StateError(f"{name}: damaged binary state ({error})") from None
    if end != len(data):
        raise StateError(f"{name}: {len(data) - end} bytes after the state")
    return value


def _take(data: bytes, at: int, length: int) -> bytes:
    if at + length > len(data):
        raise StateError(f"{length} bytes wanted at {at}, {len(data) - at} left")
    return data[at : at + length]


def _count(data: bytes, at: int) -> tuple[int, int]:
    (count,) = _U32.unpack_from(data, at)
    if count > len(data) - at:  # every item takes a byte at least: a count cannot outgrow the data
        raise StateError(f"a count of {count} with {len(data) - at} bytes left")
    return count, at + 4


def _pack_int(value: int, out: bytearray) -> None:
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    size = (value.bit_length() + 8) // 8
    out.append(size)
    out += value.to_bytes(size, "little", signed=True)


def _unpack_int(data: bytes, at: int) -> tuple[int, int]:
    size = data[at]
    return int.from_bytes(_take(data, at + 1, size), "little", signed=True), at + 1 + size


def _pack_bytes(value: bytes, out: bytearray) -> None:
    out += _U32.pack(len(value))
    out += value


def _pack_int_dict(value: dict, out: bytearray) -> None:
    """dict[int, int] (a vCPU's MSRs): when every key and value is a u64, one struct call for
    all of them (a 0 byte, the count, the keys, the values); else a 1 byte and each pair."""
    if all(type(v) is int and 0 <= v < 1 << 64 for v in (*value, *value.values())):
        out.append(0)
        out += _U32.pack(len(value))
        out += struct.pack(f"<{2 * len(value)}Q", *value, *value.values())
        return
    out.append(1)
    out += _U32.pack(len(value))
    for key, item in value.items():
        _pack_int(key, out)
        _pack_int(item, out)


def _unpack_int_dict(data: bytes, at: int) -> tuple[dict, int]:
    form = data[at]
    count, at = _count(data, at + 1)
    if form == 0:
        words = struct.unpack_from(f"<{2 * count}Q", data, at)
        return dict(zip(words[:count], words[count:])), at + 16 * count
    if form != 1:
        raise StateError(f"{form} is not a form of dict")
    items = {}
    for _ in range(count):
        key, at = _unpack_int(data, at)
        items[key], at = _unpack_int(data, at)
    return items, at


def _unpack_bytes(data: bytes, at: int) -> tuple[bytes, int]:
    (length,) = _U32.unpack_from(data, at)
    return _take(data, at + 4, length), at + 4 + length


def _unpack_bool(data: bytes, at: int) -> tuple[bool, int]:
    if data[at] > 1:
        raise StateError(f"{data[at]} is not a boolean")
    return data[at] == 1, at + 1


def _unpack_str(data: bytes, at: int) -> tuple[str, int]:
    raw, at = _unpack_bytes(data, at)
    return raw.decode(), at


@cache
def _packer(kind: Any) -> Packer:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        hints = _hints(kind)
        fields = [(f.name, _packer(hints[f.name])) for f in dataclasses.fields(kind) if f.init]

        def pack_dataclass(value: Any, out: bytearray) -> None:
            for name, pack_field in fields:
                pack_field(getattr(value, name), out)
        return pack_dataclass
    if kind is int:
        return _pack_int
    if kind is bool:
        return lambda value, out: out.append(1 if value else 0)
    if kind is float:
        return lambda value, out: out.extend(_F64.pack(value))
    if kind is bytes:
        return _pack_bytes
    if kind is str:
        return lambda value, out: _pack_bytes(value.encode(), out)
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        pack_some = _packer(next(a for a in args if a is not type(None)))

        def pack_optional(value: Any, out: bytearray) -> None:
            out.append(0 if value is None else 1)
            if value is not None:
                pack_some(value, out)
        return pack_optional
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        pack_item = _packer(args[0])

        def pack_list(value: Any, out: bytearray) -> None:
            out += _U32.pack(len(value))
            for item in value:
                pack_item(item, out)
        return pack_list
    if origin is dict and args == (int, int):
        return _pack_int_dict
    if origin is dict:
        pack_key, pack_value = _packer(args[0]), _packer(args[1])

        def pack_dict(value: dict, out: bytearray) -> None:
            out += _U32.pack(len(value))
            for key, item in value.items():
                pack_key(key, out)
                pack_value(item, out)
        return pack_dict
    return lambda value, out: _pack_bytes(json.dumps(_to_plain(value), separators=(",", ":")).encode(), out)


@cache
def _unpacker(kind: Any) -> Unpacker:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if dataclasses.is_dataclass(kind):
        hints = _hints(kind)
        fields = [(f.name, _unpacker(hints[f.name])) for f in dataclasses.fields(kind) if f.init]

        def unpack_dataclass(data: bytes, at: int) -> tuple[Any, int]:
            values = {}
            for name, unpack_field in fields:
                values[name], at = unpack_field(data, at)
            return kind(**values), at
        return unpack_dataclass
    simple = {int: _unpack_int, bool: _unpack_bool, bytes: _unpack_bytes, str: _unpack_str,
              float: lambda data, at: (_F64.unpack_from(data, at)[0], at + 8)}
    if kind in simple:
        return simple[kind]
    if origin in (typing.Union, types.UnionType) and len(args) == 2 and type(None) in args:
        unpack_some = _unpacker(next(a for a in args if a is not type(None)))

        def unpack_optional(data: bytes, at: int) -> tuple[Any, int]:
            present, at = _unpack_bool(data, at)
            return unpack_some(data, at) if present else (None, at)
        return unpack_optional
    if origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
        unpack_item, as_tuple = _unpacker(args[0]), origin is tuple

        def unpack_list(data: bytes, at: int) -> tuple[Any, int]:
            count, at = _count(data, at)
            items = []
            for _ in range(count):
                item, at = unpack_item(data, at)
                items.append(item)
            return (tuple(items) if as_tuple else items), at
        return unpack_list
    if origin is dict and args == (int, int):
        return _unpack_int_dict
    if origin is dict:
        unpack_key, unpack_value = _unpacker(args[0]), _unpacker(args[1])

        def unpack_dict(data: bytes, at: int) -> tuple[dict, int]:
            count, at = _count(data, at)
            items = {}
            for _ in range(count):
                key, at = unpack_key(data, at)
                items[key], at = unpack_value(data, at)
            return items, at
        return unpack_dict

    def unpack_json(data: bytes, at: int) -> tuple[Any, int]:
        raw, at = _unpack_bytes(data, at)
        try:
            plain = json.loads(raw)
        except ValueError as error:
            raise StateError(f"not valid JSON ({error})") from None
        return _from_plain(kind, plain, getattr(kind, "__name__", str(kind))), at
    return unpack_json
