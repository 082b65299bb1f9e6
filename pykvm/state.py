"""The one save/restore contract: every part of the machine describes its state as a plain
dataclass, and this module turns such dataclasses into bytes and back.

The encoding is JSON with bytes as hex, decoded against the dataclass's type hints, so a state
read from a file or a socket is type-checked field by field and can never run code (as pickle
could). Unknown or missing fields, and values of the wrong type, raise StateError.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from functools import cache
from typing import Any, Protocol, TypeVar

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
