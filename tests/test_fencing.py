"""Fencing through a witness, on the real thing: primary and standby VMM processes running the kv
guest, the replication link through a relay that can be cut silently, a file witness and a real
etcd. After a cut exactly one side runs the guest and serves every acknowledged record; the
other exits 75 saying `fenced: `. While the witness is unreachable nobody releases anything."""

from __future__ import annotations

import json
import queue
import random
import threading
from pathlib import Path

import pytest

from pykvm.ft.witness import open_witness
from pykvm.testing.ft_pair import stop_pair
from pykvm.testing.kv import KvClient
from pykvm.testing.netframes import FrameSocket
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.etcd_server import EtcdServer
from tests.relay import Relay
from tests.test_ft import _disks, _free_port

pytestmark = requires_kvm

FENCED = 75


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    server = EtcdServer(tmp_path_factory.mktemp("etcd"))
    yield server
    server.stop()


class MovableFileWitness:
    """A witness file in a folder that can be moved away (unreachable) and back."""

    def __init__(self, tmp_path: Path) -> None:
        self.folder, self.away = tmp_path / "witness", tmp_path / "witness-away"
        self.folder.mkdir()
        self.uri = f"file:{self.folder / 'epoch'}"

    def make_unreachable(self) -> None:
        self.folder.rename(self.away)

    def restore(self) -> None:
        self.away.rename(self.folder)


class StoppableEtcdWitness:
    def __init__(self, server: EtcdServer, prefix: str) -> None:
        self.server, self.uri = server, f"{server.uri}/{prefix}"

    def make_unreachable(self) -> None:
        self.server.stop()

    def restore(self) -> None:
        self.server.start()


@pytest.fixture(params=["file", "etcd"])
def witness(request, tmp_path):
    if request.param == "file":
        return MovableFileWitness(tmp_path)
    server = request.getfixturevalue("etcd")
    return StoppableEtcdWitness(server, f"{request.node.name}-{random.getrandbits(32):08x}")


class Pair:
    """A standby and a kv primary, replicating through a relay, both naming `witness_uri`."""

    def __init__(self, tmp_path: Path, witness_uri: str, *, primary_env: dict | None = None,
                 standby_env: dict | None = None, primary_options: tuple[str, ...] = (), disk: str = "replicated") -> None:
        """`disk`: the pair's --ft-disk (shared: the standby opens the primary's disk file)."""
        self.primary_disk, standby_disk = _disks(tmp_path, "p.img", "s.img")
        if disk == "shared":
            standby_disk, primary_options = self.primary_disk, (*primary_options, "--ft-disk", "shared")
        self.link = str(tmp_path / "link.sock")
        port = _free_port()
        patience = ("--ft-timeout", "1000")  # a load spike on a shared host must not look like a lost peer
        self.primary: VmmProcess | None = None
        self.relay: Relay | None = None
        self.standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", standby_disk,
                                  "--net", f"socket:{self.link}", "--ft-witness", witness_uri,
                                  "--control", str(tmp_path / "s.ctl"), *patience, env=standby_env)
        self.standby.stderr.wait_for(f"ft standby: waiting for a primary on tcp:127.0.0.1:{port}".encode())
        self.relay = Relay(("127.0.0.1", port))
        self.primary = VmmProcess("run", "kv", "--disk", self.primary_disk, "--net", f"socket:{self.link}",
                                  "--ft", self.relay.uri, "--ft-witness", witness_uri,
                                  "--control", str(tmp_path / "p.ctl"), *patience, *primary_options, env=primary_env)
        self.primary.stderr.wait_for(f"ft primary: protected by {self.relay.uri}".encode())

    def first_to_exit(self, timeout: float = 120) -> VmmProcess:
        exits: queue.Queue[VmmProcess] = queue.Queue()
        for vmm in (self.primary, self.standby):
            threading.Thread(target=lambda v=vmm: (v.proc.wait(), exits.put(v)), daemon=True).start()
        return exits.get(timeout=timeout)

    def close(self) -> None:
        stop_pair(self.primary, self.standby, self.relay)


def _assert_one_survivor(pair: Pair, witness_uri: str, epoch_before: int) -> VmmProcess:
    """The first side to exit fenced itself; the other runs, and holds the witness's next epoch."""
    loser = pair.first_to_exit()
    winner = pair.standby if loser is pair.primary else pair.primary
    assert loser.wait() == FENCED, loser.errors
    assert "\nfenced: " in "\n" + loser.errors, loser.errors
    assert winner.proc.poll() is None, winner.errors
    record = open_witness(witness_uri).read()
    winner_role = "standby" if winner is pair.standby else "primary"
    assert record.number == epoch_before + 1 and record.owner.startswith(winner_role), (record, winner.errors)
    if winner is pair.standby:
        assert "took over from sync" in winner.errors
    return winner


def test_a_cut_link_leaves_exactly_one_side_running(tmp_path, witness):
    pair = Pair(tmp_path, witness.uri)
    try:
        epoch = open_witness(witness.uri).read().number  # the primary's, won at its start-up
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            rng = random.Random(7)
            for seq in range(1, 41):
                if seq == 20:  # cut somewhere inside a put, its sync, or between
                    threading.Timer(rng.uniform(0, 0.02), pair.relay.cut).start()
                assert client.put(seq, f"record-{seq}-{rng.getrandbits(32):08x}"), f"put {seq} never acknowledged"
            _assert_one_survivor(pair, witness.uri, epoch)
            client.check_all_served()
    finally:
        pair.close()


def test_an_unreachable_witness_holds_every_output_until_it_answers(tmp_path, witness):
    pair = Pair(tmp_path, witness.uri)
    try:
        epoch = open_witness(witness.uri).read().number
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            for seq in range(1, 11):
                assert client.put(seq, f"before-{seq}")
            witness.make_unreachable()
            pair.relay.cut()
            for side in (pair.standby, pair.primary):  # each found the link gone and asks in vain
                side.stderr.wait_for(b"cannot ask the witness", timeout=60)
            assert not client.put(11, "during", patience=3), "a side released an output without the witness"
            assert pair.primary.proc.poll() is None and pair.standby.proc.poll() is None
            witness.restore()
            _assert_one_survivor(pair, witness.uri, epoch)
            assert client.put(11, "during")
            client.check_all_served()
    finally:
        pair.close()


@pytest.mark.parametrize("disk", ["replicated", "shared"])
def test_an_ft_thread_that_dies_fences_its_primary(tmp_path, disk):
    """The injected crash hits the FT thread at the guest's first output: the primary exits 75
    with the traceback, and the standby takes over and serves. With replicated disks a write is
    no output (the primary's own disk has kv's header, written at start-up) and the first output
    is a frame, which never left; with a shared disk it is that header write. (Whether the shared
    file saw it cannot be read here: the standby, taking over, writes the same header at once;
    tests/test_output_gate.py shows a held write is not in the file.)"""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, primary_env={"PYKVM_FT_FAULT": "primary-thread-crash"}, disk=disk)
    try:
        assert pair.primary.wait() == FENCED
        assert "Traceback" in pair.primary.errors and "injected fault" in pair.primary.errors
        assert "\nfenced: the primary's FT thread failed" in pair.primary.errors
        if disk == "replicated":
            assert Path(pair.primary_disk).read_bytes()[:8] == b"PYKVMKV1"
        _the_standby_takes_over_and_serves(pair, tmp_path)
    finally:
        pair.close()


def _the_standby_takes_over_and_serves(pair: Pair, tmp_path: Path) -> None:
    """The primary is gone: the standby takes over, and serves a new record and every acknowledged one."""
    pair.standby.stderr.wait_for(b"took over from sync")
    pair.standby.wait_for(b"kv: ready")
    with FrameSocket(tmp_path / "client.sock", pair.link) as link:
        client = KvClient(link)
        assert client.put(1, "after-the-primary-fenced")
        client.check_all_served()


@pytest.mark.parametrize("mode", ["pipelined", "cow"])
def test_a_capture_that_fails_on_the_vcpu_fences_its_primary(tmp_path, mode):
    """In pipelined and cow modes the vCPU that parks last takes the sync (RunControl.run_paused).
    The injected failure inside that capture reaches the FT thread, which fences (75) with the
    fault's own traceback, not one chained to the vCPU's EINTR; the held reply never leaves, and
    the standby takes over and serves."""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, primary_env={"PYKVM_FT_FAULT": "primary-capture-fails"},
                primary_options=("--ft-mode", mode))
    try:
        assert pair.primary.wait() == FENCED
        assert "injected fault" in pair.primary.errors and "During handling" not in pair.primary.errors
        assert "\nfenced: the primary's FT thread failed" in pair.primary.errors
        _the_standby_takes_over_and_serves(pair, tmp_path)
    finally:
        pair.close()


def test_the_standby_follows_the_primarys_options_and_ft_protect_is_refused_while_protected(tmp_path):
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri, primary_options=("--ft-mode", "pipelined", "--ft-interval", "500"))
    try:
        stats = json.loads(run_pykvm("ctl", str(tmp_path / "s.ctl"), "ft-stats").stdout)
        assert (stats["mode"], stats["interval_ms"], stats["disk_mode"]) == ("pipelined", 500, "replicated"), stats
        result = run_pykvm("ctl", str(tmp_path / "p.ctl"), "ft-protect", f"tcp:127.0.0.1:{_free_port()}")
        reply = json.loads(result.stdout)
        assert result.returncode == 1 and not reply["ok"] and "already protected" in reply["error"], reply
        assert json.loads(run_pykvm("ctl", str(tmp_path / "p.ctl"), "ft-stats").stdout)["protected"]
    finally:
        pair.close()


def test_reprotection_starts_the_new_pair_from_the_primarys_current_epoch(tmp_path):
    """The standby dies; the primary wins the next epoch and goes on; a new standby on the same
    witness admits it (its epoch is the witness's current one) and takes over when it dies."""
    witness = MovableFileWitness(tmp_path)
    pair = Pair(tmp_path, witness.uri)
    second = None
    try:
        with FrameSocket(tmp_path / "client.sock", pair.link) as link:
            client = KvClient(link)
            assert client.put(1, "first-pair")
            pair.standby.kill()
            pair.primary.stderr.wait_for(b"; continuing unprotected")
            assert client.put(2, "alone")
            port = _free_port()
            second = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk",
                                _disks(tmp_path, "s2.img")[0], "--net", f"socket:{pair.link}",
                                "--ft-witness", witness.uri)
            second.stderr.wait_for(b"waiting for a primary")
            reply = json.loads(run_pykvm("ctl", str(tmp_path / "p.ctl"), "ft-protect", f"tcp:127.0.0.1:{port}").stdout)
            assert reply["ok"] and reply["protected"], reply
            assert client.put(3, "second-pair")
            epoch = open_witness(witness.uri).read().number
            pair.primary.kill()
            second.stderr.wait_for(b"took over from sync")
            assert open_witness(witness.uri).read().number == epoch + 1
            client.check_all_served()
    finally:
        pair.close()
        if second is not None:
            second.kill()


@pytest.mark.parametrize("theirs, ours", [("other", "mine"), ("", "mine"), ("mine", "")])
def test_a_standby_refuses_a_primary_with_another_witness(tmp_path, theirs, ours):
    uris = {"mine": f"file:{tmp_path}/mine", "other": f"file:{tmp_path}/other", "": None}
    port = _free_port()
    standby_witness = ("--ft-witness", uris[ours]) if uris[ours] else ()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", *standby_witness)
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary_witness = ("--ft-witness", uris[theirs]) if uris[theirs] else ()
        result = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}", *primary_witness)
        assert result.returncode == 1 and b"refused" in result.stderr and b"witness" in result.stderr
        assert result.stdout == b""  # the guest never ran
        assert standby.wait() == 1
    finally:
        standby.kill()


def _damaged(tmp_path: Path) -> str:
    path = tmp_path / "damaged"
    path.write_bytes(b'{"pykvm-witness": 1, "record": "{\\"epoch\\": 3}", "xxh3": "0"}')
    return f"file:{path}"


BAD_WITNESSES = {
    "unknown-uri": lambda tmp_path: "zk:127.0.0.1:2181",
    "unreachable-file": lambda tmp_path: f"file:{tmp_path}/no/such/folder/epoch",
    "unreachable-etcd": lambda tmp_path: f"etcd:127.0.0.1:{_free_port()}",
    "damaged-record": _damaged,
}


@pytest.mark.parametrize("role", ["primary", "standby"])
@pytest.mark.parametrize("case", BAD_WITNESSES)
def test_a_bad_witness_at_start_up_is_one_line_and_status_2(tmp_path, role, case):
    uri = BAD_WITNESSES[case](tmp_path)
    before = Path(uri[5:]).read_bytes() if case == "damaged-record" else None
    if role == "primary":
        result = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{_free_port()}", "--ft-witness", uri)
    else:
        result = run_pykvm("ft", "standby", "--listen", f"tcp:127.0.0.1:{_free_port()}", "--ft-witness", uri)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("pykvm: error: --ft-witness"), lines
    assert result.stdout == b""  # no guest output: nothing ran
    if before is not None:
        assert Path(uri[5:]).read_bytes() == before  # left as found, for the operator


@pytest.mark.parametrize("option", [("--ft-mode", "sync"), ("--ft-interval", "10"), ("--metrics", "m.jsonl"),
                                    ("--ft-disk", "shared")])
def test_the_standby_refuses_the_primarys_options(option):
    result = run_pykvm("ft", "standby", "--listen", f"tcp:127.0.0.1:{_free_port()}", *option)
    lines = result.stderr.decode().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and option[0] in lines[0], lines
    assert option[0] not in run_pykvm("ft", "standby", "--help").stdout.decode()


def test_without_a_witness_the_primary_warns_once(tmp_path):
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        result = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}")
        assert result.returncode == 0
        assert result.stderr.count(b"no --ft-witness") == 1 and b"two live copies of the guest" in result.stderr
        assert standby.wait() == 0
    finally:
        standby.kill()
