"""The machine state as FT syncs carry it (ft.state_parts over state.pack/unpack): a running
machine's state comes back equal and restores; a sync after it carries only what changed; a
damaged or foreign blob is refused with StateError and nothing else."""

from __future__ import annotations

import dataclasses
import random
import struct

import pytest

from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.ft.state_parts import StateSender, _split, full_blob, merge
from pykvm.machine import Machine, MachineConfig
from pykvm.state import StateError, pack, unpack
from tests.conftest import SerialCapture, requires_kvm

pytestmark = requires_kvm


@pytest.fixture
def running_state(tmp_path, guest_images):
    """(config, the state of a machine running `dirty` at CPL3 with a disk and a NIC)."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(cpus=2, disks=(DiskSpec(str(disk)),), nets=(NetSpec("socket", str(tmp_path / "n.sock")),))
    output = SerialCapture()
    with Machine(config, serial_output=output) as machine:
        machine.load(guest_images["dirty"], cmdline="pages=64")
        machine.vm.start()
        output.wait_for(b"pages/s")
        with machine.quiesced():
            state = machine.save_state()
        machine.vm.stop(0, "saved")
    return config, state


def test_every_part_packs_and_comes_back_equal(running_state):
    _, state = running_state
    for name, device in state.devices.items():
        assert unpack(type(device), pack(device)) == device, name
    assert unpack(type(state.vm), pack(state.vm)) == state.vm


def test_a_full_blob_restores_and_a_later_one_carries_only_what_changed(running_state):
    config, state = running_state
    with Machine(config, serial_output=lambda data: None, attach_networks=False) as standby:
        committed = merge(None, full_blob(state), standby)
        assert committed == state
        standby.restore_state(committed)  # what a takeover does

        sender = StateSender()
        sender.blob(state, full=True)
        unchanged = sender.blob(state, full=False)
        assert _split(unchanged) == {}
        assert merge(committed, unchanged, standby) == committed
        changed_state = dataclasses.replace(state, devices={**state.devices,
                                                            "cmos": dataclasses.replace(state.devices["cmos"], index=7)})
        changed = sender.blob(changed_state, full=False)
        assert list(_split(changed)) == ["device.cmos"]
        merged = merge(committed, changed, standby)
        assert merged.devices["cmos"].index == 7 and merged.vm == committed.vm
        assert committed.devices["cmos"].index == state.devices["cmos"].index  # the committed copy untouched


def test_damaged_or_foreign_blobs_are_refused(running_state):
    config, state = running_state
    blob = full_blob(state)
    with Machine(config, serial_output=lambda data: None, attach_networks=False) as standby:
        committed = merge(None, blob, standby)
        rng = random.Random(7)
        cuts = sorted(rng.sample(range(len(blob)), 200))
        flips = [(rng.randrange(len(blob)), 1 << rng.randrange(8)) for _ in range(300)]
        for cut in cuts:
            with pytest.raises(StateError):
                merge(committed, blob[:cut], standby)
        for at, bit in flips:
            damaged = bytearray(blob)
            damaged[at] ^= bit
            try:  # a flip inside a value may still decode (the frame hash is what catches it)
                merge(committed, bytes(damaged), standby)
            except StateError:
                pass
        lacking = {name: data for name, data in _split(blob).items() if name != "device.cmos"}
        with pytest.raises(StateError, match="lacks parts"):
            merge(None, _join(lacking), standby)
        with pytest.raises(StateError, match="not this machine's"):
            merge(committed, _join({"device.gpu": b""}), standby)
        with pytest.raises(StateError, match="vcpu"):
            merge(committed, _join({"vcpu.0": b"\x00" * 5}), standby)


def _join(parts: dict[str, bytes]) -> bytes:
    out = struct.pack("<I", len(parts))
    for name, data in parts.items():
        out += struct.pack("<H", len(name)) + name.encode() + struct.pack("<I", len(data)) + data
    return out


def test_unpack_checks_counts_and_types_before_building_anything():
    @dataclasses.dataclass
    class Sample:
        items: list[int]
        flag: bool
        note: str | None

    sample = Sample([1, -2, 1 << 70], True, "x")
    assert unpack(Sample, pack(sample)) == sample
    with pytest.raises(StateError, match="count"):
        unpack(Sample, struct.pack("<I", 1 << 31))  # two billion items claimed, none there
    data = pack(sample)
    flag_at = len(data) - 7  # then the note: present (1), its length (4), "x"
    with pytest.raises(StateError, match="not a boolean"):
        unpack(Sample, data[:flag_at] + b"\x02" + data[flag_at + 1 :])
    with pytest.raises(StateError, match="after the state"):
        unpack(Sample, pack(sample) + b"\x00")


def test_a_dict_of_ints_packs_whole_or_pair_by_pair():
    @dataclasses.dataclass
    class Registers:
        msrs: dict[int, int]

    small = Registers({0x10: 12345, 0xC0000080: (1 << 64) - 1})
    big = Registers({0x10: -1, 1 << 70: 5})
    for value in (small, big, Registers({})):
        assert unpack(Registers, pack(value)) == value
    assert pack(small)[0] == 0 and pack(big)[0] == 1  # u64s in one struct call; anything else pair by pair
    with pytest.raises(StateError, match="not a form of dict"):
        unpack(Registers, b"\x02" + pack(small)[1:])
    with pytest.raises(StateError):
        unpack(Registers, pack(small)[:-1])
