"""Faults injected at each phase of a sync, at the loss of the standby and at a takeover
(pykvm.ft.faults: PYKVM_FT_FAULT), on the real thing: primary and standby VMM processes running
the kv guest, a client writing records through the guest's link, a file witness. Whatever the
fault, every record the client saw acknowledged is served by whoever runs the guest afterwards
(or, when neither side can, is on the disk of the one that ran it, and nothing was acknowledged
after the fault), and at most one copy of the guest lives: the other process died, fenced itself
(75), or gave up without taking over."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from pykvm.ft.witness import open_witness
from pykvm.testing.kv import TRY, KvClient, records_on_disk
from pykvm.testing.netframes import FrameSocket, parse_frame
from tests.conftest import VmmProcess, requires_kvm
from pykvm.testing.ft_pair import stop_pair
from tests.test_fencing import MovableFileWitness, Pair, _assert_one_survivor
from tests.test_ft import _disks, _free_port

pytestmark = requires_kvm

K = 30  # a sync in the middle of the client's puts (kv costs about three syncs a put)
WHOLE_SYNC = 1 << 40  # more bytes than any sync: the primary dies once all of sync K is sent
AFTER_THE_FAULT = 5  # records put once a side has gone, served by the one that is left
# Puts before the client stops and waits for a side to exit. Once one side runs alone, puts are
# fast, and the other may take up to its own patience to give up (a primary's is ten times
# --ft-timeout): put on, the client would fill kv's store (8191 records) before that.
PUTS_BEFORE_WAITING = 1000
FAULT_PATIENCE = 120  # seconds for the fault to strike (at sync K) and one side to exit


@dataclass
class Faulted:
    """What a fault left: the pair, the client and what it saw acknowledged, the VMM that exited
    first, and the epoch the witness held before."""

    pair: Pair
    client: KvClient
    gone: VmmProcess
    witness_uri: str
    epoch: int

    def winner(self) -> str:
        """The role that won the epoch after the fault's ("primary" or "standby")."""
        record = open_witness(self.witness_uri).read()
        assert record.number == self.epoch + 1, record
        return record.owner.split()[0]


@contextlib.contextmanager
def faulted(tmp_path, side: str, fault: str, *, cut_at: int = 0) -> Iterator[Faulted]:
    """A pair whose `side` ("primary" or "standby") has `fault`; the client puts records until
    one VMM has exited, then a few more. `cut_at`: the link goes silent before that record."""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, **{f"{side}_env": {"PYKVM_FT_FAULT": fault}})
    try:
        epoch = open_witness(witness.uri).read().number
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            deadline = time.monotonic() + FAULT_PATIENCE  # a time, not a count: unprotected puts are fast
            for seq in itertools.count(1):
                if seq == cut_at:
                    pair.relay.cut()
                assert client.put(seq, f"record-{seq}"), f"put {seq} never acknowledged"
                gone = next((vmm for vmm in (pair.primary, pair.standby) if vmm.proc.poll() is not None), None)
                if gone is None and seq >= PUTS_BEFORE_WAITING:
                    gone = _first_to_exit((pair.primary, pair.standby), deadline)
                if gone is not None:
                    break
                assert time.monotonic() < deadline, f"{fault}: no side exited after {seq} records"
            for seq in range(seq + 1, seq + 1 + AFTER_THE_FAULT):
                assert client.put(seq, f"record-{seq}"), f"put {seq} (after the fault) never acknowledged"
            yield Faulted(pair, client, gone, witness.uri, epoch)
    finally:
        pair.close()


def _first_to_exit(vmms: tuple[VmmProcess, ...], deadline: float) -> VmmProcess | None:
    """The first of `vmms` to exit before `deadline` (each waited on in turn, a short while at a
    time), or None."""
    while time.monotonic() < deadline:
        for vmm in vmms:
            try:
                vmm.proc.wait(timeout=0.05)
                return vmm
            except subprocess.TimeoutExpired:
                pass
    return None


def put_until_gone(client: KvClient, vmm: VmmProcess, first: int) -> int:
    """Put records from `first` on, one at a time, each sent once and its `ok` awaited (then it is
    in client.acked), until `vmm`, which runs the guest, has exited; returns the last record put.
    Once the process is gone, everything it sent is in the link's socket: that is read to the
    end, so an `ok` it sent after its fault is counted, and nothing of it is left there."""
    deadline, seq = time.monotonic() + FAULT_PATIENCE, first - 1
    while vmm.proc.poll() is None:
        seq += 1
        client.peer.send_udp(9000, f"put {seq} record-{seq}".encode())
        while True:
            gone = vmm.proc.poll() is not None  # before the read: all it sent is in the socket by now
            data = client.peer.link.receive(0 if gone else TRY)
            if data is None and gone:
                break
            if data is None:
                assert time.monotonic() < deadline, f"still running after record {seq}:\n{vmm.errors}"
                continue
            udp = parse_frame(data).udp
            if udp is not None and udp.payload == f"ok {seq}".encode():
                client.acked[seq] = f"record-{seq}"
                break
    return seq


def _assert_on_disk(path: str, acked: dict[int, str]) -> None:
    on_disk = records_on_disk(path)
    assert {seq: on_disk.get(seq) for seq in acked} == {seq: value.encode() for seq, value in acked.items()}


@pytest.mark.parametrize("count", [0, 100, WHOLE_SYNC], ids=["nothing", "100-bytes", "all"])
def test_a_primary_that_dies_while_sending_a_sync(tmp_path, count):
    """Cut off mid-sync, the sync never counts: the standby takes over from the one before. Sent
    whole (its Ack never read), it counts: the standby commits it and takes over from it, and
    the outputs it covers, never released by the primary, are served by the standby."""
    with faulted(tmp_path, "primary", f"primary-die-after-bytes:{K}:{count}") as after:
        primary, standby = after.pair.primary, after.pair.standby
        assert after.gone is primary and primary.wait() == -signal.SIGKILL, primary.errors
        committed = K if count == WHOLE_SYNC else K - 1
        standby.stderr.wait_for(f"took over from sync {committed} ".encode())
        assert standby.proc.poll() is None and after.winner() == "standby"
        after.client.check_all_served()


def test_a_primary_whose_own_flush_fails_fences_and_the_standby_serves(tmp_path):
    """The standby commits and acknowledges sync K without flushing its disk; the primary's own
    flush of what K wrote fails. The outputs K covers were promised durable, so they never leave:
    the primary fences itself (75), and the standby, whose takeover flushes its disk, serves
    every acknowledged record."""
    with faulted(tmp_path, "primary", f"primary-flush-fails:{K}") as after:
        primary, standby = after.pair.primary, after.pair.standby
        assert after.gone is primary and primary.wait() == 75, primary.errors
        assert "fenced: a disk the guest flushed cannot be flushed here" in primary.errors
        standby.stderr.wait_for(b"took over from sync ")
        assert standby.proc.poll() is None and after.winner() == "standby"
        after.client.check_all_served()


def test_a_primary_whose_full_sync_cannot_be_flushed_fences_before_its_guest_runs(tmp_path):
    """The primary's own flush for its full sync (sync 1, made before its guest runs) fails: it
    fences (75) with that reason in one line and no traceback, and the standby, which committed
    sync 1, takes over and serves the guest from its start."""
    witness = MovableFileWitness(tmp_path)
    primary_disk, standby_disk = _disks(tmp_path, "p.img", "s.img")
    link, port = str(tmp_path / "link.sock"), _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", standby_disk,
                         "--net", f"socket:{link}", "--ft-witness", witness.uri)
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", primary_disk, "--net", f"socket:{link}", "--ft",
                             f"tcp:127.0.0.1:{port}", "--ft-witness", witness.uri,
                             env={"PYKVM_FT_FAULT": "primary-flush-fails:1"})
        assert primary.wait() == 75, primary.errors
        assert (f"\nfenced: a disk the guest flushed cannot be flushed here: flushing {primary_disk} failed: "
                "Input/output error (injected: PYKVM_FT_FAULT)\n") in "\n" + primary.errors, primary.errors
        assert "Traceback" not in primary.errors and primary.output == ""  # its guest never ran
        standby.stderr.wait_for(b"took over from sync 1 ")
        standby.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "client.sock", link) as sock:
            client = KvClient(sock)
            assert client.put(1, "after-the-fence")
            client.check_all_served()
        assert open_witness(witness.uri).read().owner.startswith("standby")
    finally:
        stop_pair(primary, standby)


def test_a_primary_that_cannot_flush_alone_fences_and_acknowledges_nothing_more(tmp_path):
    """Ten records are put; the standby hangs (SIGSTOP: silence), and one more is put. The guest
    writes it, flushes it (done at once: the sync will flush it) and answers `ok`, held for a
    sync the standby never acknowledges. The primary gives the standby up, and cannot flush its
    own disk before going on alone (EIO): the flush the guest was told is done is durable
    nowhere, so the primary fences (75) without claiming the epoch, that `ok` never leaves, and
    the ten records acknowledged are on the primary's disk."""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, primary_env={"PYKVM_FT_FAULT": "primary-flush-fails-alone"})
    try:
        epoch = open_witness(witness.uri).read().number
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            for seq in range(1, 11):
                assert client.put(seq, f"record-{seq}"), f"put {seq} never acknowledged"
            os.kill(pair.standby.proc.pid, signal.SIGSTOP)
            last = put_until_gone(client, pair.primary, 11)
        primary = pair.primary
        assert primary.wait() == 75, primary.errors
        assert "ft primary: standby lost (" in primary.errors, primary.errors
        assert (f"); going on alone, but flushing {pair.primary_disk} failed: Input/output error "
                "(injected: PYKVM_FT_FAULT)") in primary.errors, primary.errors
        assert "\nfenced: a disk the guest flushed cannot be flushed here" in primary.errors, primary.errors
        assert "claiming epoch" not in primary.errors
        assert open_witness(witness.uri).read().number == epoch  # nobody holds the right to run the guest
        assert (last, sorted(client.acked)) == (11, list(range(1, 11)))  # no `ok` after the fault
        _assert_on_disk(pair.primary_disk, client.acked)
    finally:
        pair.close()


def test_a_primary_that_cannot_flush_alone_leaves_the_epoch_to_its_standby(tmp_path):
    """The link goes silent; the primary cannot flush its own disk before going on alone, so it
    fences (75) without claiming the epoch, and the standby, cut off but alive with every
    acknowledged sync, wins it, takes over and serves every acknowledged record."""
    with faulted(tmp_path, "primary", "primary-flush-fails-alone", cut_at=10) as after:
        primary, standby = after.pair.primary, after.pair.standby
        assert after.gone is primary and primary.wait() == 75, primary.errors
        assert "; going on alone, but flushing " in primary.errors and "claiming epoch" not in primary.errors
        standby.stderr.wait_for(b"took over from sync ")
        assert standby.proc.poll() is None and after.winner() == "standby"
        after.client.check_all_served()


def test_a_standby_that_cannot_flush_its_disk_does_not_take_over(tmp_path):
    """The primary dies once all of sync K is sent, records being put (the standby commits K);
    the standby's flush of its disk before the guest would run there fails (EIO). It says why
    in one line, exits 1, and neither runs the guest (nothing on its console, no frame on the
    link, not even the takeover's announcement) nor claims the epoch."""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, primary_env={"PYKVM_FT_FAULT": f"primary-die-after-bytes:{K}:{WHOLE_SYNC}"},
                standby_env={"PYKVM_FT_FAULT": "standby-takeover-flush-fails"})
    try:
        epoch = open_witness(witness.uri).read().number
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            assert client.put(1, "record-1"), "the guest never answered"
            last = put_until_gone(client, pair.primary, 2)
            primary, standby = pair.primary, pair.standby
            assert primary.wait() == -signal.SIGKILL and last not in client.acked, primary.errors
            assert standby.wait() == 1, standby.errors
            assert link.receive(0) is None  # all the standby sent is here: nothing
        assert (f"\nft standby: the disks of sync {K} cannot be flushed: [Errno 5] Input/output error (injected: "
                "PYKVM_FT_FAULT); not taking over\n") in standby.errors, standby.errors
        assert "took over" not in standby.errors and "won epoch" not in standby.errors and standby.output == ""
        record = open_witness(witness.uri).read()
        assert record.number == epoch and record.owner.startswith("primary"), record
    finally:
        pair.close()


def test_a_standby_that_dies_before_its_ack(tmp_path):
    """Sync K is committed on a standby that dies before it says so: the primary wins the next
    epoch, goes on unprotected, releases what it held, and serves everything."""
    with faulted(tmp_path, "standby", f"standby-die-before-ack:{K}") as after:
        primary, standby = after.pair.primary, after.pair.standby
        assert after.gone is standby and standby.wait() == -signal.SIGKILL, standby.errors
        primary.stderr.wait_for(b"; continuing unprotected")
        assert primary.proc.poll() is None and after.winner() == "primary"
        after.client.check_all_served()


def test_a_link_cut_after_the_ack_before_the_release(tmp_path):
    """The primary has sync K's Ack, but the link dies before it releases the outputs K covers:
    one side wins the epoch and serves every acknowledged record, the other fences itself."""
    with faulted(tmp_path, "primary", f"link-cut-after-ack:{K}") as after:
        _assert_one_survivor(after.pair, after.witness_uri, after.epoch)
        after.client.check_all_served()


def test_a_standby_whose_disk_fails_mid_commit_does_not_take_over(tmp_path):
    """From sync K on, the standby's disk writes fail (EIO). That is the standby's fault, not the
    primary's: it refuses to follow (StandbyFault), exits 1 and never runs the guest; the primary
    wins the next epoch and goes on unprotected, serving every acknowledged record."""
    with faulted(tmp_path, "standby", f"standby-disk-fails:{K}") as after:
        primary, standby = after.pair.primary, after.pair.standby
        assert after.gone is standby and standby.wait() == 1, standby.errors
        assert "Input/output error" in standby.errors and "took over" not in standby.errors
        assert standby.output == ""  # the guest never ran there
        primary.stderr.wait_for(b"; continuing unprotected")
        assert primary.proc.poll() is None and after.winner() == "primary"
        after.client.check_all_served()


@pytest.mark.parametrize("winner", ["standby", "primary"])
def test_a_standby_writes_nothing_to_a_shared_disk_before_it_wins_the_epoch(tmp_path, winner):
    """Shared disk: the primary dies holding a disk write its last acknowledged sync covers, so
    the standby's committed state has that write pending in its ring. The witness cannot be
    asked: the standby, its state restored, holds everything meanwhile, and the shared file
    holds exactly the records the client saw acknowledged. Then either the standby wins the
    epoch, takes over and serves the write, or the epoch was claimed by the primary's side
    first: the standby fences itself (75), and the file still holds nothing it wrote."""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, primary_env={"PYKVM_FT_FAULT": "primary-die-holding-write:10"}, disk="shared")
    try:
        epoch = open_witness(witness.uri).read()
        witness.make_unreachable()  # asked only on a loss: the pair syncs on without it
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            assert client.put(1, "record-1"), "the guest never answered"
            last = put_until_gone(client, pair.primary, 2)
            primary, standby = pair.primary, pair.standby
            assert primary.wait() == -signal.SIGKILL and last not in client.acked, primary.errors
            standby.stderr.wait_for(b"cannot ask the witness")
            assert set(records_on_disk(pair.primary_disk)) == set(client.acked), standby.errors
            if winner == "primary":  # as a primary that won before it died would have left it
                assert open_witness(f"file:{witness.away / 'epoch'}").claim(epoch, "primary (the test)")
            witness.restore()
            if winner == "primary":
                assert standby.wait() == 75 and "\nfenced: " in "\n" + standby.errors, standby.errors
                assert set(records_on_disk(pair.primary_disk)) == set(client.acked)
            else:
                standby.stderr.wait_for(b"took over from sync ")
                client.check_all_served()
                assert last in records_on_disk(pair.primary_disk)  # the write held, served by the winner
    finally:
        pair.close()
