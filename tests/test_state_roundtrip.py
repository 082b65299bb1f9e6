"""One state round trip against every device (and the VM itself): save, restore into a freshly
built machine, save again, compare. A device added to the machine without a complete state
contract fails here, because every device on the I/O bus must be among Machine.devices()."""

from __future__ import annotations

from pykvm.bus import IoBus
from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.kvm.structs import KvmPitState2
from pykvm.machine import Machine, MachineConfig, MachineState
from pykvm.state import decode, encode
from tests.conftest import SerialCapture, requires_kvm

pytestmark = requires_kvm


def _devices_on_bus(bus: IoBus) -> set[int]:
    """ids of every object the bus dispatches to (BAR adapters resolved to their function)."""
    found = set()
    targets = [entry[0] for entry in bus.ports if entry is not None] + [device for _, _, device in bus._mmio]
    for target in targets:
        owner = getattr(target, "function", None) or getattr(target, "bus", None) or target
        found.add(id(owner))
    return found


def _config(tmp_path) -> MachineConfig:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    net = NetSpec("socket", str(tmp_path / "net.sock"))
    return MachineConfig(cpus=2, disks=(DiskSpec(str(disk)),), nets=(net,))


def test_every_device_survives_a_state_round_trip(tmp_path, guest_images):
    config = _config(tmp_path)
    output = SerialCapture()
    with Machine(config, serial_output=output) as machine:
        assert _devices_on_bus(machine.vm.bus) <= {id(part) for part in machine.devices().values()}
        machine.load(guest_images["dirty"], cmdline="pages=64")
        machine.vm.start()
        output.wait_for(b"pages/s")  # running at CPL3, with a few PIT interrupts behind it
        with machine.quiesced():
            first = encode(machine.save_state())
        machine.vm.stop(0, "saved")

    with Machine(config, serial_output=lambda data: None) as fresh:
        fresh.restore_state(decode(MachineState, first))
        with fresh.quiesced():
            second = encode(fresh.save_state())
    assert _timeless(decode(MachineState, first)) == _timeless(decode(MachineState, second))


MSR_IA32_TSC = 0x10


def _timeless(state: MachineState) -> MachineState:
    """The state less what is a reading of a running clock: kvmclock, the TSC, and the PIT
    channels' load timestamps (KVM_SET_PIT2 reloads the counters at the current time)."""
    pit = KvmPitState2.from_buffer_copy(state.vm.pit)
    for channel in pit.channels:
        channel.count_load_time = 0
    state.vm.pit, state.vm.clock = bytes(pit), b""
    for vcpu in state.vm.vcpus:
        vcpu.msrs.pop(MSR_IA32_TSC, None)
    return state


def test_running_virtio_devices_survive_a_state_round_trip(tmp_path):
    """Drivers set up (queues live, MSI-X table written, a request served): the transport and
    ring state comes back identical, and the restored blk device serves the next request."""
    import struct

    from pykvm.devices.virtio import F_VERSION_1
    from tests.virtio_driver import PythonVirtioDriver

    config = _config(tmp_path)
    with Machine(config, serial_output=lambda data: None) as machine:
        blk_driver = PythonVirtioDriver(machine, 1)
        blk_driver.initialize()
        net_driver = PythonVirtioDriver(machine, 2)
        net_driver._next_free = 0x400000
        net_driver.initialize(features=F_VERSION_1, queue_sizes={0: 16, 1: 16})
        machine.vm.bus.mmio_write(blk_driver.bar(1), 4, 0xFEE00000)  # an MSI-X table entry
        header, status = blk_driver.alloc(16), blk_driver.alloc(1)
        machine.vm.memory.write(header, struct.pack("<IIQ", 4, 0, 0))  # flush
        blk_driver.submit_chain(0, [(header, 16, False), (status, 1, True)])
        blk_driver.wait_used(0)
        with machine.quiesced():
            first = encode(machine.save_state())
        memory = machine.vm.memory.read(0, 8 << 20)

    with Machine(config, serial_output=lambda data: None) as fresh:
        fresh.vm.memory.write(0, memory)
        fresh.restore_state(decode(MachineState, first))
        with fresh.quiesced():
            second = encode(fresh.save_state())
        assert decode(MachineState, first).devices == decode(MachineState, second).devices
        driver = PythonVirtioDriver(fresh, 1)
        driver.rings[0] = blk_driver.rings[0]  # the driver's view of the ring survives in RAM too
        fresh.vm.memory.write(header, struct.pack("<IIQ", 4, 0, 0))
        driver.make_available(0, 0)
        assert driver.wait_used(0) == (0, 1)
