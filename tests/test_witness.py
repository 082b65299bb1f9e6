"""The witness: of two sides claiming the same epoch step, exactly one wins, with a file record
(POSIX locks across processes) and with a real etcd; an unreachable or damaged witness decides
nothing."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from etcd_server import EtcdServer
from pykvm.errors import ConfigError
from pykvm.ft.witness import Epoch, WitnessDamaged, WitnessUnavailable, open_witness


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


def _claim_in_child(uri: str, seen_number: int, owner: str, start, results) -> None:
    witness = open_witness(uri)
    seen = witness.read()
    start.wait()  # both children hold the same record before either claims
    won = witness.claim(seen, owner) if seen.number == seen_number else None
    results.put((owner, won is not None))


def _race(uri: str, rounds: int) -> None:
    """Two processes claim the same step `rounds` times: exactly one wins each time."""
    context = multiprocessing.get_context("fork")
    for step in range(rounds):
        before = open_witness(uri).read().number
        start, results = context.Barrier(2), context.Queue()
        children = [context.Process(target=_claim_in_child, args=(uri, before, side, start, results))
                    for side in ("primary", "standby")]
        for child in children:
            child.start()
        outcome = dict(results.get(timeout=30) for _ in children)
        for child in children:
            child.join(30)
        assert sorted(outcome.values()) == [False, True], f"step {step}: {outcome}"
        after = open_witness(uri).read()
        assert after.number == before + 1
        assert after.owner == next(side for side, won in outcome.items() if won)


def test_file_witness_one_winner_per_step(tmp_path):
    _race(f"file:{tmp_path}/epoch", rounds=20)


def test_etcd_witness_one_winner_per_step(etcd):
    _race(etcd.uri + "/race", rounds=10)


def test_a_new_pair_starts_from_the_stored_epoch(tmp_path, etcd):
    for uri in (f"file:{tmp_path}/epoch", etcd.uri + "/resume"):
        witness = open_witness(uri)
        assert witness.read() == Epoch(0)
        first = witness.claim(witness.read(), "primary A")
        assert first == Epoch(1, "primary A")
        again = open_witness(uri)  # another process later: the next step is its own
        assert again.claim(again.read(), "standby B") == Epoch(2, "standby B")
        assert again.claim(first, "stale side") is None  # a side that saw epoch 1 has lost
        assert open_witness(uri).read() == Epoch(2, "standby B")


def test_unreachable_witnesses_decide_nothing(tmp_path):
    missing = open_witness(f"file:{tmp_path}/no/such/dir/epoch")
    with pytest.raises(WitnessUnavailable, match="cannot open"):
        missing.read()
    with pytest.raises(WitnessUnavailable):
        missing.claim(Epoch(0), "primary")
    # an etcd that is not there (a closed loopback port)
    down = open_witness("etcd:127.0.0.1:1/x")
    with pytest.raises(WitnessUnavailable, match="did not answer"):
        down.read()


def test_a_damaged_record_is_refused_not_overwritten(tmp_path):
    path = tmp_path / "epoch"
    witness = open_witness(f"file:{path}")
    witness.claim(witness.read(), "primary")
    data = bytearray(path.read_bytes())
    data[data.index(b'\\"epoch\\": 1') + 11] = ord("7")  # the number changes, the checksum does not
    path.write_bytes(bytes(data))
    with pytest.raises(WitnessDamaged, match="damaged"):
        witness.read()
    with pytest.raises(WitnessDamaged):
        witness.claim(Epoch(1, "primary"), "standby")
    assert path.read_bytes() == bytes(data)  # left as found, for the operator


def test_a_held_lock_is_waited_for_then_reported(tmp_path):
    """A side that hangs while holding the record's lock (SIGSTOP mid-claim) makes the other
    report the witness unavailable, not wait forever and not decide."""
    import fcntl

    path = tmp_path / "epoch"
    witness = open_witness(f"file:{path}")
    seen = witness.read()
    locked, release = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:
        fd = os.open(path, os.O_RDWR)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.write(locked[1], b"x")
        os.read(release[0], 1)
        os._exit(0)
    os.read(locked[0], 1)
    try:
        with pytest.raises(WitnessUnavailable, match="cannot lock"):
            witness.claim(seen, "standby")
    finally:
        os.write(release[1], b"x")
        os.waitpid(pid, 0)
    assert witness.read() == Epoch(0)
    assert witness.claim(seen, "standby") == Epoch(1, "standby")  # once the holder is gone


@pytest.mark.parametrize("uri", ["", "file:", "etcd:", "etcd:host", "etcd:host:0", "etcd:host:99999", "zk:host:1"])
def test_malformed_witness_uris_are_bad_input(uri):
    with pytest.raises(ConfigError, match="expected file:PATH or etcd:HOST:PORT"):
        open_witness(uri)
