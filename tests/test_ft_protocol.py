"""The replication protocol against a hostile or broken stream (hypothesis): truncated, corrupted,
reordered and duplicated frames are rejected or leave events unfinished, never yield a wrong
event; a standby fed such a stream keeps its last committed sync, RAM and disk untouched."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.ft.capture import disk_change_frames
from pykvm.transfer import wire
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft import protocol as p
from pykvm.ft.standby import Standby, TakeoverImpossible
from pykvm.ft.state_parts import full_blob
from pykvm.machine import Machine, MachineConfig
from pykvm.memory import PAGE_SIZE, ram_hash
from pykvm.state import encode
from tests.conftest import requires_kvm
from tests.tmpfs import can_mount, free_bytes, small_tmpfs

import xxhash

RAM = bytearray(64 * PAGE_SIZE)
for i in range(64):
    RAM[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes([i]) * PAGE_SIZE
STATE = b'{"not": "decoded at this level"}'


def _stream(*, authenticated: bool = False) -> tuple[list[bytes], list[p.Event]]:
    """A Hello, then one sync: the frames (each as bytes) and the events a standby should see.
    `authenticated`: as a primary over TLS sends it (the page data without a digest)."""
    primary = p.FtConnection(p.Role.PRIMARY, authenticated=authenticated)
    frames = [b"".join(bytes(b) for b in primary.send(p.Hello(b"config")))]
    primary._advance(p.Ready(), outgoing=False)  # the standby's Ready, not part of this stream
    pages = np.array([1, 2, 3, 10], dtype="<u4")
    frames.append(b"".join(bytes(b) for b in primary.send_pages(0, memoryview(RAM), pages)))
    change = p.DiskChanges(0, (DiskChange(4096, b"disk data"), DiskChange(8192, zeroed=512)))
    frames.append(b"".join(bytes(b) for b in primary.send(change)))
    frames.append(b"".join(bytes(b) for b in primary.send(p.MachineStateBlob(STATE))))
    end = p.SyncEnd(1, "blk", None, xxhash.xxh3_64_intdigest(STATE))
    frames.append(b"".join(bytes(b) for b in primary.send(end)))
    # The primary's connection fills in the digest of the sync's page data, in the order sent
    data = b"".join(RAM[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in pages.tolist())
    end = dataclasses.replace(end, pages_hash=0 if authenticated else xxhash.xxh3_64_intdigest(data))
    events = [p.Hello(b"config"), ("pages", 0, pages.tolist()), change, p.MachineStateBlob(STATE), end]
    return frames, events


FRAMES, EVENTS = _stream()


def _feed(data: bytes, chunk: int = 7919, *, data_intact: bool = True,
          authenticated: bool = False) -> tuple[list, Exception | None]:
    """Feed bytes to a standby-side connection (`authenticated`: over TLS); returns the events
    and the error (if any). `data_intact`: check that each page's data landed (a damaged page is
    only caught at the SyncEnd, whose digest covers the sync's page data)."""
    staged = bytearray(64 * PAGE_SIZE)

    def sink(slot: int, pages: np.ndarray) -> list[memoryview]:
        if slot != 0 or int(pages.max()) >= 64:
            raise wire.ProtocolError("outside")
        return [memoryview(staged)[int(n) * PAGE_SIZE : (int(n) + 1) * PAGE_SIZE] for n in pages]

    conn = p.FtConnection(p.Role.STANDBY, page_sink=sink, authenticated=authenticated)
    events: list = []
    view = memoryview(data)
    try:
        while view:
            targets = conn.want()
            n = 0
            for target in targets:
                take = min(len(target), len(view) - n, chunk)
                target[:take] = view[n : n + take]
                n += take
                if take < len(target):
                    break
            view = view[n:]
            event = conn.filled(n)
            if event is None:
                continue
            if isinstance(event, p.Hello):
                conn._advance(p.Ready(), outgoing=True)
            if isinstance(event, p.Pages):
                assert not data_intact or staged[int(event.pages[0]) * PAGE_SIZE] == event.pages[0]  # the data landed
                events.append(("pages", event.slot, event.pages.tolist()))
            else:
                events.append(event)
    except wire.ProtocolError as error:
        return events, error
    return events, None


@pytest.mark.nokvm
def test_the_clean_stream_decodes_to_its_events():
    events, error = _feed(b"".join(FRAMES))
    assert error is None and events == EVENTS


@pytest.mark.nokvm
@settings(max_examples=400, deadline=None)
@given(position=st.integers(0, sum(map(len, FRAMES)) - 1), bit=st.integers(0, 7))
def test_any_flipped_bit_is_caught(position, bit):
    data = bytearray(b"".join(FRAMES))
    data[position] ^= 1 << bit
    events, error = _feed(bytes(data), data_intact=False)
    assert events == EVENTS[: len(events)]  # nothing wrong ever comes out...
    assert error is not None or len(events) < len(EVENTS)  # ...and the damage never goes unseen...
    assert error is None or not any(isinstance(event, p.SyncEnd) for event in events)  # ...by the commit


@pytest.mark.nokvm
def test_over_tls_the_pages_go_without_a_digest_and_a_side_in_the_clear_refuses_that():
    """Over TLS, which authenticates every byte itself, the primary hashes no page data (its
    SyncEnd says 0) and the standby checks none. A standby in the clear never skips the check:
    the same stream, whatever it says, fails there at the SyncEnd, before anything commits."""
    frames, expected = TLS_FRAMES, TLS_EVENTS
    assert expected[-1].pages_hash == 0
    events, error = _feed(b"".join(frames), authenticated=True)
    assert error is None and events == expected
    events, error = _feed(b"".join(frames))
    assert isinstance(error, wire.ProtocolError) and "failed its checksum" in str(error)
    assert events == expected[:-1]  # no SyncEnd: nothing of the sync is committed


TLS_FRAMES, TLS_EVENTS = _stream(authenticated=True)
_TLS_DATA_AT = len(TLS_FRAMES[0]) + wire.HEADER.size + wire.PAGES_HEAD.size + 4 * 4  # the pages frame's data
_TLS_DATA_END = _TLS_DATA_AT + 4 * PAGE_SIZE


@pytest.mark.nokvm
@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, sum(map(len, TLS_FRAMES)) - 1).filter(lambda at: not _TLS_DATA_AT <= at < _TLS_DATA_END),
       bit=st.integers(0, 7))
def test_over_tls_every_flipped_bit_but_the_page_data_is_still_caught(position, bit):
    """Over TLS only the page data goes without a digest (TLS would refuse its record); headers,
    page numbers, disk changes, the state and the SyncEnd still carry their frames' hashes."""
    data = bytearray(b"".join(TLS_FRAMES))
    data[position] ^= 1 << bit
    events, error = _feed(bytes(data), data_intact=False, authenticated=True)
    assert events == TLS_EVENTS[: len(events)]
    assert error is not None or len(events) < len(TLS_EVENTS)


@pytest.mark.nokvm
@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, sum(map(len, FRAMES)) - 1))
def test_a_truncated_stream_yields_only_whole_events(cut):
    events, error = _feed(b"".join(FRAMES)[:cut])
    assert error is None and events == EVENTS[: len(events)] and len(events) < len(EVENTS)


@pytest.mark.nokvm
@pytest.mark.parametrize("order", [[0, 2, 1, 3, 4], [0, 1, 1, 2, 3, 4], [0, 1, 2, 3, 3, 4], [0, 1, 2, 4], [1, 2, 3, 4]])
def test_reordered_duplicated_or_missing_frames_are_rejected(order):
    events, error = _feed(b"".join(FRAMES[i] for i in order))
    assert error is not None
    assert events == EVENTS[: len(events)]


@pytest.mark.nokvm
@pytest.mark.parametrize("disks", [("replicated", ()), ("shared", ((4 << 20, 0x1234, 99), (512, 0, 7)))])
def test_hello_carries_the_witness_epoch_and_modes(disks):
    hello = p.Hello(b"config", "file:/tmp/w", 7, "pipelined", 25.0, disk_mode=disks[0], shared_disks=disks[1])
    data = b"".join(bytes(b) for b in p.FtConnection(p.Role.PRIMARY).send(hello))
    events, error = _feed(data)
    assert error is None and events == [hello]
    for bad in ({"epoch": -1}, {"mode": "turbo"}, {"interval_ms": -5}, {"witness": 3}, {"epoch": "7"},
                {"disk_mode": "mirrored"}, {"disk_mode": "shared", "shared_disks": [[1, 2]]},
                {"disk_mode": "shared", "shared_disks": [[1, 2, -3]]}, {"shared_disks": [[1, 2, 3]]},
                {"disk_mode": "shared", "shared_disks": "all"}):
        fields = {"protocol": p.PROTOCOL, "witness": "", "epoch": 0, "mode": "sync", "interval_ms": 0, **bad}
        with pytest.raises(ValueError):
            p.Hello.parse(json.dumps(fields).encode() + b"\nconfig")


@pytest.mark.nokvm
@pytest.mark.parametrize("frames_before", [1, 2, 3, 4, 5])
def test_a_standby_fault_ends_the_conversation_from_any_phase_of_a_sync(frames_before):
    """The standby may refuse a sync wherever in it the fault shows (a damaged frame, a failed
    write), and nothing may follow its StandbyFault."""
    standby = p.FtConnection(p.Role.STANDBY, page_sink=lambda slot, pages: [memoryview(bytearray(PAGE_SIZE * len(pages)))])
    data = b"".join(FRAMES[:frames_before])
    view = memoryview(data)
    while view:
        targets = standby.want()
        n = 0
        for target in targets:
            take = min(len(target), len(view) - n)
            target[:take] = view[n : n + take]
            n += take
        view = view[n:]
        event = standby.filled(n)
        if isinstance(event, p.Hello):
            ready = b"".join(bytes(b) for b in standby.send(p.Ready()))
    fault = b"".join(bytes(b) for b in standby.send(p.StandbyFault("disk full applying sync 1")))
    assert standby.phase is p.Phase.CLOSED
    with pytest.raises(wire.ProtocolError, match="after the connection ended"):
        standby.send(p.Ack(1))
    decoder, view, frame = wire.Decoder(lambda slot, pages: []), memoryview(ready + fault), None
    while frame is None or frame.kind is wire.Kind.READY:
        target = decoder.want()[0]
        target[:] = view[: len(target)]
        view = view[len(target):]
        frame = decoder.filled(len(target))
    assert frame.kind is wire.Kind.STANDBY_FAULT
    assert p.StandbyFault.parse(frame.payload).reason == "disk full applying sync 1"


@pytest.mark.nokvm
def test_heartbeats_are_answered_between_syncs_only():
    primary = p.FtConnection(p.Role.PRIMARY)
    primary.send(p.Hello(b"c"))
    primary._advance(p.Ready(), outgoing=False)
    primary.send(p.Heartbeat())
    primary._advance(p.Heartbeat(), outgoing=False)  # the standby's answer
    primary.send(p.MachineStateBlob(b"x"))
    with pytest.raises(wire.ProtocolError, match="Heartbeat not allowed in phase state-sent"):
        primary._advance(p.Heartbeat(), outgoing=False)


@pytest.mark.nokvm
@pytest.mark.parametrize("before", [[], [p.Hello(b"c"), p.Goodbye("done")]], ids=["before-hello", "after-goodbye"])
def test_pages_out_of_turn_are_refused_before_their_data_lands(before):
    """The decoder asks for a frame's page buffers on its head, before the frame is whole and
    checked against the rules: out of turn, the connection refuses right there, so a stray
    peer's page data is written nowhere (a waiting standby's RAM is where the first sync's lands)."""
    asked = []
    standby = p.FtConnection(p.Role.STANDBY, page_sink=lambda slot, pages: asked.append(pages) or [])
    primary = p.FtConnection(p.Role.PRIMARY)
    data = b""
    for event in before:
        data += b"".join(bytes(b) for b in primary.send(event))
        if isinstance(event, p.Hello):
            primary._advance(p.Ready(), outgoing=False)
    data += b"".join(bytes(b) for b in wire.page_frame(len(before), 0, np.array([3], dtype="<u4"), [bytes(PAGE_SIZE)]))
    view = memoryview(data)
    with pytest.raises(wire.ProtocolError, match="Pages"):
        while view:
            target = standby.want()[0]
            take = min(len(target), len(view))
            target[:take], view = view[:take], view[take:]
            if isinstance(standby.filled(take), p.Hello):
                standby._advance(p.Ready(), outgoing=True)
    assert asked == []


@pytest.mark.nokvm
def test_protocol_rules_on_the_sending_side():
    primary = p.FtConnection(p.Role.PRIMARY)
    with pytest.raises(wire.ProtocolError):
        primary.send(p.MachineStateBlob(b"x"))  # before Hello/Ready
    primary.send(p.Hello(b"c"))
    primary._advance(p.Ready(), outgoing=False)
    with pytest.raises(wire.ProtocolError, match="without a machine state"):
        primary.send(p.SyncEnd(1, "blk"))
    primary.send(p.MachineStateBlob(b"x"))
    with pytest.raises(wire.ProtocolError, match="out of order"):
        primary.send(p.SyncEnd(2, "blk"))
    with pytest.raises(wire.ProtocolError, match="the primary does not send Ack"):
        primary.send(p.Ack(1))


# -- a real standby: committed state untouched by a broken sync --------------------------------------


@pytest.fixture
def standby_machine(tmp_path):
    disk = tmp_path / "standby.img"
    disk.write_bytes(bytes(1 << 20))
    config = MachineConfig(disks=(DiskSpec(str(disk)),))
    with Machine(config, serial_output=lambda data: None, attach_networks=False) as machine:
        yield machine, disk


def _sync_frames(primary: p.FtConnection, machine_state: bytes, fill: int, sync: int,
                 changes: tuple[DiskChange, ...] | None = None, ram_hash_: int | None = None) -> bytes:
    ram = bytearray(272 * PAGE_SIZE)  # the primary's RAM up to the pages sent: 256..271 filled
    ram[256 * PAGE_SIZE :] = bytes([fill]) * (16 * PAGE_SIZE)
    out = primary.send_pages(0, memoryview(ram), np.arange(256, 272, dtype="<u4"))
    for event in disk_change_frames(0, changes or (DiskChange(0, bytes([fill]) * 4096),)):
        out += primary.send(event)
    out += primary.send(p.MachineStateBlob(machine_state))
    out += primary.send(p.SyncEnd(sync, "blk", ram_hash_, xxhash.xxh3_64_intdigest(machine_state)))
    return b"".join(bytes(b) for b in out)


class FakePrimary:
    """A standby serving in a thread, and a primary made of a bare FtConnection and a socket."""

    def __init__(self, machine: Machine) -> None:
        self.machine = machine
        self.lines: list[str] = []
        self.standby = Standby(machine, timeout=2.0, log=self.lines.append)
        self.state = full_blob(machine.save_state())
        self.server = socket.create_server(("127.0.0.1", 0))
        self.outcome: list[str] = []
        self.thread = threading.Thread(target=lambda: self.outcome.append(self.standby.serve(self.server)))
        self.thread.start()
        self.primary = p.FtConnection(p.Role.PRIMARY)
        self.conn = socket.create_connection(self.server.getsockname())
        wire.send_buffers(self.conn, self.primary.send(p.Hello(encode(machine.config))))
        assert isinstance(p.receive_event(self.conn, self.primary), p.Ready)

    def sync(self, data: bytes) -> p.Event:
        self.conn.sendall(data)
        return p.receive_event(self.conn, self.primary)

    def end(self) -> str:
        """Close our side; the standby's outcome."""
        self.conn.close()
        self.thread.join(10)
        self.server.close()
        assert not self.thread.is_alive()
        return self.outcome[0]


@requires_kvm
@pytest.mark.parametrize("damage", ["truncated", "corrupted", "bad-state", "past-the-disk"])
def test_a_broken_sync_leaves_the_committed_state_untouched(standby_machine, damage):
    """A sync cut short is what a dying primary leaves ("lost": a takeover may follow); a sync
    that arrives but does not check out is the standby's fault: it says why and will not take
    over. Either way RAM, disk and state stay those of the last committed sync."""
    machine, disk = standby_machine
    fake = FakePrimary(machine)
    assert fake.sync(_sync_frames(fake.primary, fake.state, 0xAA, 1)) == p.Ack(1)
    committed_ram, committed_disk = ram_hash(machine.vm.memory), disk.read_bytes()
    broken_state = b'{"vm": 1}' if damage == "bad-state" else fake.state
    changes = (DiskChange(0, b"\x55" * 4096), DiskChange((1 << 20) - 512, bytes(1024))) if damage == "past-the-disk" else None
    second = _sync_frames(fake.primary, broken_state, 0x55, 2, changes)
    if damage == "truncated":
        fake.conn.sendall(second[: len(second) // 2])
        assert fake.end() == "lost"
    else:
        if damage == "corrupted":
            second = second[:200] + bytes([second[200] ^ 0x10]) + second[201:]
        answer = fake.sync(second)
        assert isinstance(answer, p.StandbyFault)
        assert {"corrupted": "failed its checksum", "bad-state": "does not decode",
                "past-the-disk": "runs past the end of disk 0"}[damage] in answer.reason
        assert fake.end() == "fault"
        assert [line for line in fake.lines if "will not take over" in line] == [
            f"ft standby: cannot follow the primary, will not take over: {answer.reason}"]
    assert fake.standby.committed_sync == 1 and fake.standby.committed is not None
    assert ram_hash(machine.vm.memory) == committed_ram
    assert machine.vm.memory.read(256 * PAGE_SIZE, 4) == b"\xaa" * 4
    assert disk.read_bytes() == committed_disk and committed_disk[:4096] == b"\xaa" * 4096


@requires_kvm
def test_a_committed_state_that_does_not_restore_is_not_taken_over(standby_machine):
    """A state that decodes but that the machine refuses (here a CMOS index past its NVRAM) is
    found when the standby puts it in, before it claims the right to run: no takeover."""
    machine, _ = standby_machine
    fake = FakePrimary(machine)
    state = machine.save_state()
    state.devices["cmos"] = dataclasses.replace(state.devices["cmos"], index=4096)
    unrestorable = full_blob(state)
    assert fake.sync(_sync_frames(fake.primary, unrestorable, 0xAA, 1)) == p.Ack(1)  # it decodes
    assert fake.end() == "lost"
    with pytest.raises(TakeoverImpossible, match="the state of sync 1 does not restore: CMOS state"):
        fake.standby.restore_committed()


@requires_kvm
def test_an_oversized_frame_is_refused_on_its_header(standby_machine):
    """A DiskChanges frame longer than its cap: the standby refuses on the header alone, before
    any of the payload is sent (so it allocated nothing for it)."""
    machine, _ = standby_machine
    fake = FakePrimary(machine)
    header = wire.HEADER.pack(wire.MAGIC, wire.VERSION, wire.Kind.DISK_CHANGES, 0, 1, p.DISK_FRAME_BYTES + 1, 0)
    fault = fake.sync(header)
    assert isinstance(fault, p.StandbyFault) and "DISK_CHANGES frame" in fault.reason and "exceeds" in fault.reason
    assert fake.end() == "fault"


@requires_kvm
@pytest.mark.parametrize("changes", ["zeroed", "empty"])
def test_a_sync_cannot_stage_more_disk_changes_than_its_disk_holds(standby_machine, changes):
    """A sync's disk changes wait in memory for its end. A primary's sync covers each byte of
    a disk once at most, in whole sectors; one that sends zeroed ranges over and over, or
    empty changes, costing no data, is refused once they add up past the disk's size, instead
    of growing the standby's memory for as long as it goes on. Sync 1 stays committed."""
    machine, disk = standby_machine
    fake = FakePrimary(machine)
    assert fake.sync(_sync_frames(fake.primary, fake.state, 0xAA, 1)) == p.Ack(1)
    committed_ram, committed_disk = ram_hash(machine.vm.memory), disk.read_bytes()
    size = len(committed_disk)
    if changes == "zeroed":  # the whole disk in sectors, three times over
        hostile = tuple(DiskChange(at, zeroed=512) for _ in range(3) for at in range(0, size, 512))
    else:
        hostile = tuple(DiskChange(at) for at in range(0, 3 * size // 512))
    fault = fake.sync(_sync_frames(fake.primary, fake.state, 0x55, 2, hostile))
    assert isinstance(fault, p.StandbyFault) and "changes to disk 0 exceed its size" in fault.reason
    assert fake.end() == "fault"
    assert fake.standby.committed_sync == 1
    assert ram_hash(machine.vm.memory) == committed_ram and disk.read_bytes() == committed_disk


@requires_kvm
def test_a_ram_mismatch_under_verification_is_a_fault(standby_machine):
    """--ft-verify: a standby whose RAM differs from the primary's after a commit knows its copy
    is wrong: it refuses to go on and may not take over."""
    machine, _ = standby_machine
    fake = FakePrimary(machine)
    assert fake.sync(_sync_frames(fake.primary, fake.state, 0xAA, 1)) == p.Ack(1)
    fault = fake.sync(_sync_frames(fake.primary, fake.state, 0x55, 2, ram_hash_=12345))
    assert isinstance(fault, p.StandbyFault) and "VERIFY FAILED at sync 2" in fault.reason
    assert fake.end() == "fault"
    assert fake.standby.unusable and fake.standby.stats.mismatches == 1


@requires_kvm
@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_a_disk_that_fills_up_mid_sync_is_rolled_back(tmp_path):
    """The standby's disk is on a 1 MiB tmpfs. Sync 2 overwrites committed data, then writes
    2 MiB into a hole: the file system fills up part-way. The standby puts the overwritten data
    back from its undo journal, punches the hole again, says why, and keeps sync 1 whole."""
    with small_tmpfs(tmp_path / "small", 1 << 20) as small:
        disk = small / "standby.img"
        with open(disk, "wb") as f:
            f.truncate(4 << 20)  # sparse: larger than the file system
        config = MachineConfig(disks=(DiskSpec(str(disk)),))
        with Machine(config, serial_output=lambda data: None, attach_networks=False) as machine:
            fake = FakePrimary(machine)
            first = (DiskChange(0, b"\xaa" * (64 << 10)),)
            assert fake.sync(_sync_frames(fake.primary, fake.state, 0xAA, 1, first)) == p.Ack(1)
            committed_ram, committed_disk = ram_hash(machine.vm.memory), disk.read_bytes()
            free = free_bytes(small)
            second = (DiskChange(0, b"\x55" * (64 << 10)), DiskChange(8192, zeroed=8192),
                      DiskChange(1 << 20, b"\x77" * (2 << 20)))
            fault = fake.sync(_sync_frames(fake.primary, fake.state, 0x55, 2, second))
            assert isinstance(fault, p.StandbyFault)
            assert "No space left on device" in fault.reason and "rolled back to sync 1" in fault.reason
            assert fake.end() == "fault"
            assert not fake.standby.unusable and fake.standby.committed_sync == 1
            assert ram_hash(machine.vm.memory) == committed_ram
            assert disk.read_bytes() == committed_disk
            assert free_bytes(small) >= free - (8 << 10)  # the hole is a hole again (its space given back)
