"""TCP connections that survive a failover. A client in the LAN's namespace holds a connection to
an FT-protected `tcp-echo` or TCP `kv` (the primary on one TAP, the standby on another, both on a
bridge) while the primary is killed, or the link between the two is cut, at a random point: the
connection is never reset, every byte sent is echoed exactly once and in order, every record
acknowledged on the connection is served after the takeover, on that same connection. In every
FT mode (pykvm.ft.protocol.SYNC_MODES: a new mode is tested here by being added there)."""

from __future__ import annotations

import random

import pytest

from pykvm.ft.protocol import SYNC_MODES
from pykvm.testing.ft_pair import FtPair, put_kv_records_across_a_fault
from pykvm.testing.lan import GuestLan
from pykvm.testing.tcp import EchoStream
from tests.conftest import needs_netns, requires_kvm

pytestmark = [requires_kvm, needs_netns]

TRIALS = 2  # per guest and mode; bench/ft_tcp.py runs many more
STREAM = 300_000  # bytes through tcp-echo a trial
RECORDS = 40  # kv puts a trial
EXIT_FENCED = 75


@pytest.fixture
def lan():
    with GuestLan(taps=("tap0", "tap1")) as lan:
        yield lan


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("mode", SYNC_MODES)
def test_an_echo_stream_survives_the_primary_killed(lan, tmp_path, guest_images, mode, trial):
    rng = random.Random(f"echo-{mode}-{trial}")
    pair = FtPair(lan, tmp_path, "tcp-echo", mode)
    try:
        stream = EchoStream(lan.connect(7), STREAM, seed=trial).start()
        assert stream.wait_received(int(STREAM * rng.uniform(0.05, 0.8))), pair.report()
        pair.kill_primary()
        result = stream.wait()
        assert result.intact, f"{result}{pair.report()}"
        assert "took over from sync" in pair.standby.errors
        # the standby's guest finished it (its line may follow the client's seeing the close)
        pair.standby.wait_for(f"closed after {STREAM} bytes".encode(), timeout=30)
    finally:
        pair.close()


@pytest.mark.parametrize("trial", range(TRIALS))
@pytest.mark.parametrize("mode", SYNC_MODES)
def test_kv_records_on_a_connection_survive_the_primary_killed(lan, tmp_path, guest_images, mode, trial):
    """The kill strikes inside a put (a random record, a random few ms after it was sent): its
    answer comes on the same connection from the standby, and every record acknowledged before
    or after is served there."""
    rng = random.Random(f"kv-{mode}-{trial}")
    pair = FtPair(lan, tmp_path, "kv", mode, disks=True)
    try:
        kv = put_kv_records_across_a_fault(lan, RECORDS, rng, pair.kill_primary)
        pair.standby.stderr.wait_for(b"took over from sync", timeout=60)
        assert kv.unserved() == [], pair.report()
        kv.close()
    finally:
        pair.close()


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_an_echo_stream_survives_a_cut_link(lan, tmp_path, guest_images, mode):
    """The link between primary and standby goes silent: both turn to the witness, one wins and
    runs the guest, the other stands down (exit 75). The client never notices more than a pause."""
    rng = random.Random(f"cut-echo-{mode}")
    pair = FtPair(lan, tmp_path, "tcp-echo", mode, witness=True, relay=True)
    try:
        stream = EchoStream(lan.connect(7), STREAM, seed=11).start()
        assert stream.wait_received(int(STREAM * rng.uniform(0.05, 0.8))), pair.report()
        pair.relay.cut()
        result = stream.wait()
        assert result.intact, f"{result}{pair.report()}"
        winner = _one_side_runs(pair)
        winner.wait_for(f"closed after {STREAM} bytes".encode(), timeout=30)
    finally:
        pair.close()


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_kv_records_on_a_connection_survive_a_cut_link(lan, tmp_path, guest_images, mode):
    rng = random.Random(f"cut-kv-{mode}")
    pair = FtPair(lan, tmp_path, "kv", mode, disks=True, witness=True, relay=True)
    try:
        kv = put_kv_records_across_a_fault(lan, RECORDS, rng, pair.relay.cut)
        _one_side_runs(pair)
        assert kv.unserved() == [], pair.report()
        kv.close()
    finally:
        pair.close()


def _one_side_runs(pair: FtPair):
    """After a cut, once the client was served again: the side that lost the witness stands down
    (75) and the winner runs; the winner. (A standby that won said so before it served.)"""
    took_over = "took over from sync" in pair.standby.errors
    loser, winner = (pair.primary, pair.standby) if took_over else (pair.standby, pair.primary)
    assert loser.wait(30) == EXIT_FENCED and "fenced: " in loser.errors, pair.report()
    assert winner.proc.poll() is None, pair.report()
    return winner
