"""The machine state as a sync carries it: part by part (each vCPU, the VM's interrupt
controllers, PIT and clock, each device), each part in the compact binary form of pykvm.state,
and only the parts whose binary form changed since the sync before. The full sync sends them all.

    blob = count u32, then count x (name length u16, name, data length u32, data)
    names: "vm.<field of VmState>" (vcpus aside), "vcpu.<index>", "device.<name>"

Leaving out what did not change is safe because the syncs of a connection are committed in
order, all of them or the connection ends: the standby's committed state is always the one the
primary sent last, and a new standby starts with a full sync. The standby decodes a blob against
its own machine's types (a name it does not know, or a first sync lacking a part, is refused)
and merges it into a copy of its committed state, which it keeps untouched until the commit.
"""

from __future__ import annotations

import dataclasses
import functools
import struct
import typing

from pykvm.machine import Machine, MachineState
from pykvm.state import StateError, pack, unpack
from pykvm.vcpu_state import VcpuState
from pykvm.vm import VmState

_COUNT = struct.Struct("<I")
_NAME = struct.Struct("<H")
_DATA = struct.Struct("<I")
_VM_FIELDS = [f.name for f in dataclasses.fields(VmState) if f.name != "vcpus"]


@functools.cache
def _vm_hints() -> dict[str, typing.Any]:
    return typing.get_type_hints(VmState)


def _parts(state: MachineState) -> dict[str, bytes]:
    hints = _vm_hints()
    parts = {f"vm.{name}": pack(getattr(state.vm, name), hints[name]) for name in _VM_FIELDS}
    parts.update((f"vcpu.{index}", pack(vcpu)) for index, vcpu in enumerate(state.vm.vcpus))
    parts.update((f"device.{name}", pack(device)) for name, device in state.devices.items())
    return parts


def _blob(parts: dict[str, bytes]) -> bytes:
    out = bytearray(_COUNT.pack(len(parts)))
    for name, data in parts.items():
        raw = name.encode()
        out += _NAME.pack(len(raw)) + raw + _DATA.pack(len(data)) + data
    return bytes(out)


def full_blob(state: MachineState) -> bytes:
    """Every part of `state` (what a full sync sends)."""
    return _blob(_parts(state))


class StateSender:
    """The primary's side: remembers the binary form of each part it sent last."""

    def __init__(self) -> None:
        self._sent: dict[str, bytes] = {}

    def blob(self, state: MachineState, *, full: bool) -> bytes:
        """The parts of `state` that changed since the last blob (all of them if `full`)."""
        if full:
            self._sent = {}
        changed = {name: data for name, data in _parts(state).items() if self._sent.get(name) != data}
        self._sent.update(changed)
        return _blob(changed)


def _split(blob: bytes) -> dict[str, bytes]:
    try:
        (count,) = _COUNT.unpack_from(blob, 0)
        at, parts = _COUNT.size, {}
        for _ in range(min(count, len(blob))):
            (length,) = _NAME.unpack_from(blob, at)
            name = blob[at + 2 : at + 2 + length].decode()
            at += 2 + length
            (length,) = _DATA.unpack_from(blob, at)
            data = blob[at + 4 : at + 4 + length]
            at += 4 + length
            if len(data) != length or name in parts:
                raise StateError(f"part {name!r} cut short or repeated")
            parts[name] = data
    except (struct.error, UnicodeDecodeError) as error:
        raise StateError(f"a machine state that does not split into parts ({error})") from None
    if len(parts) != count or at != len(blob):
        raise StateError("a machine state with a wrong part count or bytes after its parts")
    return parts


def merge(committed: MachineState | None, blob: bytes, machine: Machine) -> MachineState:
    """The state `blob` describes on top of `committed` (None: the first sync, which must carry
    every part), decoded against `machine`'s own types. Raises StateError."""
    hints = _vm_hints()
    kinds: dict[str, typing.Any] = {f"vm.{name}": hints[name] for name in _VM_FIELDS}
    kinds.update((f"vcpu.{index}", VcpuState) for index in range(len(machine.vm.vcpus)))
    kinds.update((f"device.{name}", part.state_type) for name, part in machine.devices().items())
    parts = _split(blob)
    unknown = sorted(set(parts) - set(kinds))
    if unknown:
        raise StateError(f"parts {unknown} are not this machine's")
    if committed is None and set(parts) != set(kinds):
        raise StateError(f"the first state lacks parts {sorted(set(kinds) - set(parts))}")
    decoded = {}
    for name, data in parts.items():
        try:
            decoded[name] = unpack(kinds[name], data)
        except StateError as error:
            raise StateError(f"part {name}: {error}") from None

    def part(name: str, committed_value: typing.Callable[[], typing.Any]) -> typing.Any:
        return decoded[name] if name in decoded else committed_value()
    vm = VmState(**{name: part(f"vm.{name}", lambda name=name: getattr(committed.vm, name)) for name in _VM_FIELDS},
                 vcpus=[part(f"vcpu.{index}", lambda index=index: committed.vm.vcpus[index])
                        for index in range(len(machine.vm.vcpus))])
    devices = dict(committed.devices) if committed is not None else {}
    devices.update((name[len("device."):], value) for name, value in decoded.items() if name.startswith("device."))
    return MachineState(vm, devices)
