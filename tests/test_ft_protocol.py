"""The replication protocol against a hostile or broken stream (hypothesis): truncated, corrupted,
reordered and duplicated frames are rejected or leave events unfinished, never yield a wrong
event; a standby fed such a stream keeps its last committed sync, RAM and disk untouched."""

from __future__ import annotations

import json
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.transfer import wire
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft import protocol as p
from pykvm.ft.standby import Standby
from pykvm.machine import Machine, MachineConfig
from pykvm.memory import PAGE_SIZE, ram_hash
from pykvm.state import encode
from tests.conftest import requires_kvm

import xxhash

RAM = bytearray(64 * PAGE_SIZE)
for i in range(64):
    RAM[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] = bytes([i]) * PAGE_SIZE
STATE = b'{"not": "decoded at this level"}'


def _stream() -> tuple[list[bytes], list[p.Event]]:
    """A Hello, then one sync: the frames (each as bytes) and the events a standby should see."""
    primary = p.FtConnection(p.Role.PRIMARY)
    frames = [b"".join(bytes(b) for b in primary.send(p.Hello(b"config")))]
    primary._advance(p.Ready(), outgoing=False)  # the standby's Ready, not part of this stream
    pages = np.array([1, 2, 3, 10], dtype="<u4")
    frames.append(b"".join(bytes(b) for b in primary.send_pages(0, memoryview(RAM), pages)))
    change = p.DiskChanges(0, (DiskChange(4096, b"disk data"), DiskChange(8192, zeroed=512)))
    frames.append(b"".join(bytes(b) for b in primary.send(change)))
    frames.append(b"".join(bytes(b) for b in primary.send(p.MachineStateBlob(STATE))))
    end = p.SyncEnd(1, "blk", None, xxhash.xxh3_64_intdigest(STATE))
    frames.append(b"".join(bytes(b) for b in primary.send(end)))
    events = [p.Hello(b"config"), ("pages", 0, pages.tolist()), change, p.MachineStateBlob(STATE), end]
    return frames, events


FRAMES, EVENTS = _stream()


def _feed(data: bytes, chunk: int = 7919) -> tuple[list, Exception | None]:
    """Feed bytes to a standby-side connection; returns the events and the error (if any)."""
    staged = bytearray(64 * PAGE_SIZE)

    def sink(slot: int, pages: np.ndarray) -> list[memoryview]:
        if slot != 0 or int(pages.max()) >= 64:
            raise wire.ProtocolError("outside")
        return [memoryview(staged)[int(n) * PAGE_SIZE : (int(n) + 1) * PAGE_SIZE] for n in pages]

    conn = p.FtConnection(p.Role.STANDBY, page_sink=sink)
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
                assert staged[int(event.pages[0]) * PAGE_SIZE] == event.pages[0]  # the data landed
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
    events, error = _feed(bytes(data))
    assert events == EVENTS[: len(events)]  # nothing wrong ever comes out...
    assert error is not None or len(events) < len(EVENTS)  # ...and the damage never goes unseen


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
def test_hello_carries_the_witness_epoch_and_mode():
    hello = p.Hello(b"config", "file:/tmp/w", 7, "pipelined", 25.0)
    data = b"".join(bytes(b) for b in p.FtConnection(p.Role.PRIMARY).send(hello))
    events, error = _feed(data)
    assert error is None and events == [hello]
    for bad in ({"epoch": -1}, {"mode": "turbo"}, {"interval_ms": -5}, {"witness": 3}, {"epoch": "7"}):
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
    view, events = memoryview(data), []
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


def _sync_frames(primary: p.FtConnection, machine_state: bytes, fill: int, sync: int) -> bytes:
    ram = bytearray(272 * PAGE_SIZE)  # the primary's RAM up to the pages sent: 256..271 filled
    ram[256 * PAGE_SIZE :] = bytes([fill]) * (16 * PAGE_SIZE)
    out = primary.send_pages(0, memoryview(ram), np.arange(256, 272, dtype="<u4"))
    out += primary.send(p.DiskChanges(0, (DiskChange(0, bytes([fill]) * 4096),)))
    out += primary.send(p.MachineStateBlob(machine_state))
    out += primary.send(p.SyncEnd(sync, "blk", None, xxhash.xxh3_64_intdigest(machine_state)))
    return b"".join(bytes(b) for b in out)


@requires_kvm
@pytest.mark.parametrize("damage", ["truncated", "corrupted", "bad-state"])
def test_a_broken_sync_leaves_the_committed_state_untouched(standby_machine, damage):
    machine, disk = standby_machine
    state = encode(machine.save_state())
    standby = Standby(machine, timeout=2.0, log=lambda line: None)
    server = socket.create_server(("127.0.0.1", 0))
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(standby.serve(server)))
    thread.start()
    primary = p.FtConnection(p.Role.PRIMARY)
    with socket.create_connection(server.getsockname()) as conn:
        wire.send_buffers(conn, primary.send(p.Hello(encode(machine.config))))
        assert isinstance(p.receive_event(conn, primary), p.Ready)
        conn.sendall(_sync_frames(primary, state, 0xAA, 1))
        assert p.receive_event(conn, primary) == p.Ack(1)
        committed_ram, committed_disk = ram_hash(machine.vm.memory), disk.read_bytes()
        broken_state = b'{"vm": 1}' if damage == "bad-state" else state
        second = _sync_frames(primary, broken_state, 0x55, 2)
        if damage == "truncated":
            second = second[: len(second) // 2]
        elif damage == "corrupted":
            second = second[:200] + bytes([second[200] ^ 0x10]) + second[201:]
        conn.sendall(second)
    thread.join(10)
    server.close()
    assert outcome == ["lost"]
    assert standby.committed_sync == 1 and standby.committed is not None
    assert ram_hash(machine.vm.memory) == committed_ram
    assert machine.vm.memory.read(256 * PAGE_SIZE, 4) == b"\xaa" * 4
    assert disk.read_bytes() == committed_disk and committed_disk[:4096] == b"\xaa" * 4096
