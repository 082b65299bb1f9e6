"""Copy-on-write syncs (--ft-mode cow) on the real thing: the copy-on-write step with a guest
writing its pages, RAM equality at every sync while `dirty` rewrites pages during each sync's
copy, kill trials with no acknowledged record lost, and the protocol's two syncs in flight."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pykvm import guestbuild
from pykvm.ft import protocol as p
from pykvm.ft.capture import dirty_bitmaps, harvest
from pykvm.ft.cow import CowMemory
from pykvm.ft.demo import run_demo
from pykvm.machine import Machine, MachineConfig
from pykvm.memory import PAGE_SIZE, dirty_pages
from pykvm.testing.ft_pair import stop_pair
from pykvm.transfer.wire import ProtocolError
from pykvm.userfaultfd import UserfaultfdUnavailable
from tests.conftest import SerialCapture, VmmProcess, requires_kvm, run_pykvm
from tests.test_ft import _free_port, _kill_the_primary_and_check_dirty_runs_on


@requires_kvm
@pytest.mark.parametrize("writes", ["before the capture", "before the mark", "after the mark"])
def test_a_guest_write_to_a_page_not_yet_copied_lands_after_its_copy(guest_images, writes):
    """Capture with the guest paused, let it run: it rewrites the captured pages (each carries a
    generation number), and what the sync gathers afterwards is still the capture's contents,
    while RAM holds the guest's later writes. The guest goes round its pages between the arm and
    the capture (the pages it wrote are copied in the pause), between the capture and the mark
    (its writes meet the pages' captured bits), or after the mark (they meet PENDING pages)."""
    output = SerialCapture()
    with Machine(MachineConfig(), serial_output=output) as machine:
        machine.load(guestbuild.image_path("dirty"), cmdline="pages=64")
        machine.vm.start()
        output.wait_for(b"pages/s")
        machine.vm.set_dirty_logging(True)
        try:
            cow = CowMemory(machine.vm.memory)
        except UserfaultfdUnavailable as error:
            pytest.skip(str(error))
        try:
            harvest(machine, full=False)  # from here on, the log holds what the guest writes
            _the_guest_goes_round_its_pages(output)
            cow.arm([function.lock for function in machine.virtio])
            if writes == "before the capture":
                _the_guest_goes_round_its_pages(output)
            with machine.quiesced("test"):
                (slot, bitmap), = dirty_bitmaps(machine)
                cow.capture([(slot, bitmap)])
                pages = dirty_pages(bitmap)
                at_capture = np.frombuffer(slot.view, dtype=np.uint8).reshape(-1, PAGE_SIZE)[pages].copy()
            found = cow.pages() if writes != "before the mark" else None
            _the_guest_goes_round_its_pages(output)
            (found_in, found_pages), = found or cow.pages()
            assert found_in is slot and np.array_equal(found_pages, pages)
            gathered = np.frombuffer(cow.gather(slot, pages), dtype=np.uint8).reshape(-1, PAGE_SIZE)
            now = np.frombuffer(slot.view, dtype=np.uint8).reshape(-1, PAGE_SIZE)[pages]
            cow.disarm()
            assert cow.faults > 0
            # (before the capture, it wrote each of its pages and had it let go: copied in the pause)
            assert cow.copied_aside < len(pages) // 2 if writes == "before the capture" else cow.copied_aside > 0
            assert np.array_equal(gathered, at_capture)
            rewritten = (now != at_capture).any(axis=1)
            assert rewritten.sum() >= max(1, cow.copied_aside // 2), "the guest's writes did not land"
        finally:
            cow.close()
            machine.vm.stop(0, "test done")
    assert b"FAIL" not in output.data


def _the_guest_goes_round_its_pages(output: SerialCapture) -> None:
    """Wait for `dirty` to print its rate again: it has written each of its pages (many times)."""
    printed = output.data.count(b"pages/s")
    output.wait_for(b"pages/s", count=printed + 1)


@requires_kvm
def test_cow_mode_standby_memory_equals_primary_at_every_sync(tmp_path, guest_images):
    """--ft-verify in cow mode: the hash of all RAM taken in the pause must equal the standby's
    RAM after each commit, although `dirty` rewrites pages while each sync's pages are copied."""
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--ft-verify",
                         "--ft-timeout", "2000", "--control", str(tmp_path / "sb.ctl"))  # hashing 64 MiB takes a while
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "dirty", "--append", "pages=2048", "--ft", f"tcp:127.0.0.1:{port}",
                             "--ft-mode", "cow", "--ft-verify", "--ft-interval", "20",
                             "--metrics", str(tmp_path / "m.jsonl"), "--control", str(tmp_path / "p.ctl"))
        primary.wait_for(b"\n", count=4, timeout=90)  # each sync hashes all RAM in the pause: the guest crawls
        stats = json.loads(run_pykvm("ctl", str(tmp_path / "sb.ctl"), "ft-stats").stdout)
        assert stats["verified"] >= 20 and stats["mismatches"] == 0 and stats["mode"] == "cow", stats
        mine = json.loads(run_pykvm("ctl", str(tmp_path / "p.ctl"), "ft-stats").stdout)
        assert mine["mode"] == "cow" and mine["wp_faults"] > 0, mine
        _kill_the_primary_and_check_dirty_runs_on(primary, standby)
    finally:
        stop_pair(primary, standby)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert {r["mode"] for r in records} == {"cow"}
    assert sum(r["trigger"] == "timer" for r in records) >= 20


@requires_kvm
@pytest.mark.parametrize("trial", range(3))
def test_kill_the_primary_in_cow_mode(tmp_path, guest_images, trial):
    """Kill trials (more in bench/ft_faults.py --ft-mode cow): no acknowledged record lost."""
    result = run_demo(records=40, seed=3000 + trial, workdir=tmp_path, say=lambda line: None, mode="cow")
    assert result.lost == [] and result.verified == 40
    assert {s["mode"] for s in result.syncs} == {"cow"}


def _deliver(buffers: list, receiver: p.FtConnection) -> list:
    """Hand a sender's buffers to the other side's connection, as a stream would; its events."""
    data, events = b"".join(bytes(buffer) for buffer in buffers), []
    while data:
        target = receiver.want()[0]
        count = min(len(target), len(data))
        target[:count], data = data[:count], data[count:]
        event = receiver.filled(count)
        if event is not None:
            events.append(event)
    return events


@pytest.mark.nokvm
def test_a_second_sync_may_start_before_the_first_is_acknowledged():
    """The primary sends sync 2 while sync 1 awaits its Ack (at most two in flight); the standby
    acknowledges each in order as it commits it, and each Ack names the oldest sync awaiting one."""
    primary, standby = p.FtConnection(p.Role.PRIMARY), p.FtConnection(p.Role.STANDBY)
    _deliver(primary.send(p.Hello(b"config", mode="cow")), standby)
    _deliver(standby.send(p.Ready()), primary)
    acks = []
    for sync in (1, 2):
        assert primary.next_sync == sync
        sent = primary.send(p.MachineStateBlob(b"state")) + primary.send(p.SyncEnd(sync, "blk", None, 0))
        assert [type(e) for e in _deliver(sent, standby)] == [p.MachineStateBlob, p.SyncEnd]
        acks.append(standby.send(p.Ack(sync)))
    assert primary.unacknowledged == 2 and primary.last_sync == 0
    with pytest.raises(ProtocolError, match="2 unacknowledged"):
        primary.send(p.MachineStateBlob(b"state"))
    assert _deliver(acks[0], primary) == [p.Ack(1)]
    assert (primary.last_sync, primary.phase) == (1, p.Phase.AWAIT_ACK)
    third = primary.send(p.MachineStateBlob(b"state"))  # the third starts once the first is acknowledged
    assert _deliver(acks[1], primary) == [p.Ack(2)]
    assert (primary.last_sync, primary.phase) == (2, p.Phase.STATE_SENT)
    _deliver(third + primary.send(p.SyncEnd(3, "net", None, 0)), standby)
    assert _deliver(standby.send(p.Ack(3)), primary) == [p.Ack(3)]
    assert (primary.last_sync, primary.phase, primary.unacknowledged) == (3, p.Phase.IDLE, 0)
