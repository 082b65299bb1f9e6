"""A saved state that does not restore (here: the 36-byte MSI-X table a guest could make before
issue 15, which a restore refuses) ends `pykvm restore` and a migration target with one line
and an exit status, never a traceback; the migration source hears why and keeps its guest."""

from __future__ import annotations

import dataclasses
import socket

from pykvm.devices.virtio.blk import DiskSpec
from pykvm.machine import Machine, MachineConfig
from pykvm.state import encode
from pykvm.transfer import snapshot, wire
from tests.conftest import VmmProcess, requires_kvm, run_pykvm

pytestmark = requires_kvm

BLK = "pci.1.virtio-blk"


def _disk(tmp_path) -> str:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(1 << 20))
    return str(path)


def _grown_msix_table(machine: Machine) -> None:
    """What an 8-byte write at the last dword of the table did before the table refused it."""
    machine.virtio[0].msix.table += bytes(4)


def test_restore_of_a_state_that_does_not_fit_is_one_line_and_status_2(tmp_path, guest_images):
    disk, snap = _disk(tmp_path), str(tmp_path / "grown.snap")
    with Machine(MachineConfig(disks=(DiskSpec(disk),)), serial_output=lambda data: None) as machine:
        machine.load(guest_images["hello"])
        _grown_msix_table(machine)
        with machine.quiesced():
            snapshot.save(machine, snap)
    result = run_pykvm("restore", snap)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("pykvm: error: ") and err.count("\n") == 1, err
    assert "the saved state does not restore" in err and "slot 1" in err


def _unrestorable_state(config: MachineConfig) -> bytes:
    with Machine(config, serial_output=lambda data: None) as machine:
        with machine.quiesced():
            state = machine.save_state()
    pci = state.devices[BLK].pci
    state.devices[BLK].pci = dataclasses.replace(pci, msix_table=pci.msix_table + bytes(4))
    return encode(state)


def test_migration_target_refuses_a_state_that_does_not_fit_in_one_line(tmp_path, guest_images):
    """A source (played here) sends a state that does not restore: the target says REFUSED and
    why, exits 1 with one line, and never runs the guest."""
    disk = _disk(tmp_path)
    config = MachineConfig(disks=(DiskSpec(disk),))
    payload = _unrestorable_state(config)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = VmmProcess("run", "--disk", disk, "--incoming", f"tcp:127.0.0.1:{port}")
    try:
        _assert_refused_as_a_source_sends_it(target, port, config, payload, "does not fit")
    finally:
        target.kill()


def _assert_refused_as_a_source_sends_it(target: VmmProcess, port: int, config: MachineConfig, payload: bytes,
                                         reason: str) -> bytes:
    """Play a migration source that sends `payload` as its state: the target answers REFUSED with
    `reason`, exits 1 with one line saying it, and never runs the guest. Returns the REFUSED's text."""
    target.stderr.wait_for(b"waiting for a migration")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        replies = wire.Decoder(lambda slot, pages: [])
        wire.send_buffers(sock, wire.frame(wire.Kind.HELLO, 0, encode(config)))
        assert wire.receive_frame(sock, replies).kind == wire.Kind.READY
        wire.send_buffers(sock, wire.frame(wire.Kind.MACHINE_STATE, 1, payload))
        wire.send_buffers(sock, wire.frame(wire.Kind.SYNC_END, 2, b"{}"))
        answer = wire.receive_frame(sock, replies)
    assert answer.kind == wire.Kind.REFUSED
    assert reason.encode() in answer.payload
    assert target.wait() == 1
    assert target.output == ""  # the guest never ran there
    errors = target.errors.strip().splitlines()
    assert errors[-1].startswith("pykvm: error: incoming migration") and reason in errors[-1]
    assert "Traceback" not in target.errors
    return answer.payload



def test_a_state_kvm_refuses_is_refused_to_the_source_with_kvms_reason(tmp_path, guest_images):
    """Well-typed, but KVM will not take it (an MSR that does not exist): the source hears
    REFUSED and KVM's reason, as for a state pykvm itself refuses. Before: the target exited
    without a word to the source, which saw only its connection closed."""
    config = MachineConfig()
    with Machine(config, serial_output=lambda data: None) as machine:
        with machine.quiesced():
            state = machine.save_state()
    state.vm.vcpus[0].msrs[0x345] = 1 << 63  # IA32_PERF_CAPABILITIES: read-only, this value is refused
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = VmmProcess("run", "--incoming", f"tcp:127.0.0.1:{port}")
    try:
        refusal = _assert_refused_as_a_source_sends_it(target, port, config, encode(state), "KVM_SET_MSRS")
        assert b"the state does not restore" in refusal
    finally:
        target.kill()
