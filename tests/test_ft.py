"""Fault tolerance on the real thing: primary and standby VMM processes, the kv guest on virtio
disks and a datagram link, SIGKILL at random moments; the standby's RAM checked against the
primary's at every sync; a lost standby and re-protection; a standby that refuses another
machine."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from pykvm.ft.demo import run_demo
from pykvm.testing.ft_pair import stop_pair
from pykvm.testing.kv import records_on_disk
from pykvm.testing.netframes import FrameSocket, Peer
from tests.conftest import VmmProcess, requires_kvm, run_pykvm

pytestmark = requires_kvm

TRIALS = 20


def _assert_on_the_standby_disk(result) -> None:
    """The disk the standby ran the guest on (its own copy, or the one shared file) holds every
    acknowledged record, byte for byte."""
    on_disk = records_on_disk(result.standby_disk)
    assert {seq: on_disk.get(seq) for seq in result.acked} == {
        seq: value.encode() for seq, value in result.acked.items()}


@pytest.mark.parametrize("disk", ["replicated", "shared"])
@pytest.mark.parametrize("trial", range(TRIALS // 2))
def test_kill_the_primary_at_a_random_moment(tmp_path, guest_images, trial, disk):
    """Each trial kills the primary somewhere else (seeded): inside a put, a sync, between.
    Replicated disks: a write is no output (only the reply frames cause syncs); shared: it is."""
    result = run_demo(records=40, seed=1000 + trial, workdir=tmp_path, say=lambda line: None, disk=disk)
    assert result.lost == []
    assert result.verified == result.records == 40
    assert result.takeover_ms < 1000
    triggers = {s["trigger"] for s in result.syncs} - {"full"}
    assert triggers == ({"blk", "net"} if disk == "shared" else {"net"})
    assert {s["disk_mode"] for s in result.syncs} == {disk}
    _assert_on_the_standby_disk(result)


@pytest.mark.parametrize("disk", ["replicated", "shared"])
@pytest.mark.parametrize("trial", range(3))
def test_kill_the_primary_in_pipelined_mode(tmp_path, guest_images, trial, disk):
    """Pipelined syncs (the guest runs on while a sync travels): outputs still wait for the ack."""
    result = run_demo(records=40, seed=2000 + trial, workdir=tmp_path, say=lambda line: None, mode="pipelined",
                      disk=disk)
    assert result.lost == [] and result.verified == 40
    _assert_on_the_standby_disk(result)


def test_demo_command(guest_images):
    result = run_pykvm("demo", "--records", "60", "--seed", "7", timeout=300)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "records verified      60 of 60" in out and "OK" in out


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _disks(tmp_path: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = tmp_path / name
        path.write_bytes(b"")
        with open(path, "r+b") as f:
            f.truncate(4 << 20)
        paths.append(str(path))
    return paths


def _kill_the_primary_and_check_dirty_runs_on(primary: VmmProcess, standby: VmmProcess) -> None:
    """SIGKILL to a primary running `dirty`: its standby takes over and the guest runs on,
    checking every page it wrote; no page check failed (`FAIL`), nor the standby's --ft-verify."""
    primary.proc.send_signal(signal.SIGKILL)
    primary.wait()
    standby.stderr.wait_for(b"took over")
    standby.wait_for(b"pages/s")
    standby.wait_for(b"\n", count=2)
    assert "FAIL" not in standby.output and "VERIFY FAILED" not in standby.errors


def test_standby_memory_equals_primary_at_every_sync(tmp_path, guest_images):
    """--ft-verify: the primary sends a hash of all its RAM with each sync; the standby compares
    its committed RAM. `dirty` rewrites pages all the time and periodic syncs (every 20 ms) carry
    them over; then the standby takes over and the guest's own page check must hold."""
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--ft-verify",
                         "--control", str(tmp_path / "sb.ctl"))
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "dirty", "--append", "pages=2048", "--ft", f"tcp:127.0.0.1:{port}",
                             "--ft-verify", "--ft-interval", "20", "--metrics", str(tmp_path / "m.jsonl"))
        primary.wait_for(b"\n", count=4)  # a few seconds of dirtying, dozens of syncs
        stats = json.loads(run_pykvm("ctl", str(tmp_path / "sb.ctl"), "ft-stats").stdout)
        assert stats["verified"] >= 20 and stats["mismatches"] == 0, stats
        _kill_the_primary_and_check_dirty_runs_on(primary, standby)
    finally:
        stop_pair(primary, standby)
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[0]["trigger"] == "full" and sum(r["trigger"] == "timer" for r in records) >= 20


def test_standby_loss_and_reprotection(tmp_path, guest_images):
    """Kill the standby: the primary goes on unprotected. Protect it again with a new standby
    (full sync), kill the primary: the new standby serves every acknowledged record."""
    primary_disk, first_disk, second_disk = _disks(tmp_path, "p.img", "a.img", "b.img")
    link = str(tmp_path / "link.sock")
    first_port, second_port = _free_port(), _free_port()
    first = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{first_port}", "--disk", first_disk,
                       "--net", f"socket:{link}")
    second = primary = None
    try:
        first.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", primary_disk, "--net", f"socket:{link}",
                             "--ft", f"tcp:127.0.0.1:{first_port}", "--control", str(tmp_path / "p.ctl"))
        primary.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "client.sock", link) as sock:
            peer = Peer(sock, timeout=1.0)
            for seq in range(1, 11):
                assert peer.udp(9000, f"put {seq} before-{seq}".encode()) == f"ok {seq}".encode()
            first.proc.send_signal(signal.SIGKILL)
            first.wait()
            for seq in range(11, 21):  # unprotected, but serving
                assert peer.udp(9000, f"put {seq} alone-{seq}".encode()) == f"ok {seq}".encode()
            primary.stderr.wait_for(b"standby lost")
            second = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{second_port}", "--disk", second_disk,
                                "--net", f"socket:{link}")
            second.stderr.wait_for(b"waiting for a primary")
            reply = json.loads(run_pykvm("ctl", str(tmp_path / "p.ctl"), "ft-protect",
                                         f"tcp:127.0.0.1:{second_port}").stdout)
            assert reply["ok"] and reply["protected"], reply
            for seq in range(21, 31):
                assert peer.udp(9000, f"put {seq} after-{seq}".encode()) == f"ok {seq}".encode()
            primary.proc.send_signal(signal.SIGKILL)
            primary.wait()
            second.stderr.wait_for(b"took over")
            peer.guest_mac = None
            for seq in range(1, 31):
                label = "before" if seq <= 10 else "alone" if seq <= 20 else "after"
                reply = _get_with_retries(peer, seq)
                assert reply == f"val {seq} {label}-{seq}".encode()
    finally:
        for vmm in (primary, first, second):
            if vmm is not None:
                vmm.kill()


def _get_with_retries(peer: Peer, seq: int, attempts: int = 50) -> bytes:
    for _ in range(attempts):
        try:
            if peer.guest_mac is None:
                peer.resolve()
            return peer.udp(9000, f"get {seq}".encode(), timeout=0.2)
        except TimeoutError:
            peer.guest_mac = None
    raise TimeoutError(f"get {seq}: no answer")


def test_standby_with_another_config_refuses(tmp_path, guest_images):
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--mem", "128M")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        result = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}")
        assert result.returncode == 1
        assert b"refused" in result.stderr and b"128 MiB" in result.stderr
        assert standby.wait() == 1
        assert b"refusing the primary" in standby.stderr.data
    finally:
        standby.kill()


def test_primary_without_a_standby_fails_clearly():
    result = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{_free_port()}")
    assert result.returncode == 1
    assert re.search(rb"cannot reach the standby at tcp:127\.0\.0\.1:\d+", result.stderr)


def test_clean_guest_exit_ends_the_standby_without_takeover(tmp_path, guest_images):
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        result = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}")
        assert result.returncode == 0 and b"Hello from pykvm guest!" in result.stdout
        assert standby.wait() == 0
        assert b"said goodbye" in standby.stderr.data and b"took over" not in standby.stderr.data
        assert standby.output == ""
    finally:
        standby.kill()


def test_a_hung_primary_is_replaced_after_the_timeout(tmp_path, guest_images):
    """SIGSTOP, not SIGKILL: the connection stays open but the heartbeats stop. After --ft-timeout
    the standby takes over (and takes the link's socket from the frozen primary)."""
    primary_disk, standby_disk = _disks(tmp_path, "p.img", "s.img")
    link = str(tmp_path / "link.sock")
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", standby_disk,
                         "--net", f"socket:{link}", "--ft-timeout", "300")
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", primary_disk, "--net", f"socket:{link}",
                             "--ft", f"tcp:127.0.0.1:{port}", "--ft-timeout", "300")
        primary.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "client.sock", link) as sock:
            peer = Peer(sock, timeout=1.0)
            for seq in range(1, 6):
                assert peer.udp(9000, f"put {seq} v{seq}".encode()) == f"ok {seq}".encode()
            primary.proc.send_signal(signal.SIGSTOP)
            standby.stderr.wait_for(b"no word from the primary for 300 ms")
            standby.stderr.wait_for(b"took over")
            peer.guest_mac = None
            for seq in range(1, 6):
                assert _get_with_retries(peer, seq) == f"val {seq} v{seq}".encode()
    finally:
        if primary is not None:
            primary.proc.send_signal(signal.SIGCONT)
            primary.kill()
        standby.kill()


@pytest.mark.parametrize("case", ["another size", "a copy", "a hard link", "gone"])
def test_standby_refuses_a_shared_disk_that_is_not_the_primarys(tmp_path, guest_images, case):
    """With --ft-disk shared the standby's disk must be the primary's file: a file of another
    size, or a copy of the same size, is refused (one line saying why, on both sides, exit 1);
    a hard link is the same file and is accepted; a path that no longer opens is refused."""
    primary_disk, = _disks(tmp_path, "p.img")
    standby_disk = tmp_path / "s.img"
    if case == "another size":
        _disks(tmp_path, "s.img")
        with open(standby_disk, "r+b") as f:
            f.truncate(8 << 20)
    elif case == "a copy":
        standby_disk.write_bytes(Path(primary_disk).read_bytes())
    else:
        os.link(primary_disk, standby_disk)
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(standby_disk),
                         "--net", f"socket:{tmp_path / 'link.sock'}")
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        if case == "gone":
            standby_disk.unlink()  # the standby holds it open, but could not open it to take over
        primary = VmmProcess("run", "kv", "--disk", primary_disk, "--net", f"socket:{tmp_path / 'link.sock'}",
                             "--ft", f"tcp:127.0.0.1:{port}", "--ft-disk", "shared")
        if case == "a hard link":
            primary.wait_for(b"kv: ready")
            assert "protected by" in primary.errors
            return
        reason = {"another size": "has 8388608 bytes, the primary's 4194304: not the same disk",
                  "a copy": "is not the primary's file",
                  "gone": "cannot open shared disk 0"}[case]
        assert primary.wait() == 1 and standby.wait() == 1
        refusals = [line for line in standby.errors.splitlines() if "refusing the primary" in line]
        assert len(refusals) == 1 and reason in refusals[0], standby.errors
        refused = next(line for line in primary.errors.splitlines() if "refused: " in line)
        assert reason in refused and str(standby_disk) in refused, primary.errors
        assert "took over" not in standby.errors
    finally:
        for vmm in (primary, standby):
            if vmm is not None:
                vmm.kill()


def test_a_replicated_standby_refuses_a_primary_when_its_disk_is_read_only(tmp_path, guest_images):
    """Replicated disks (the default) are written by each sync: a standby whose disk is
    `,readonly` refuses the primary at its Hello, one line on each side saying why, both exit 1,
    and the standby's disk is untouched (the primary's holds other bytes: a sync would show)."""
    primary_disk, standby_disk = tmp_path / "p.img", tmp_path / "s.img"
    primary_disk.write_bytes(os.urandom(4 << 20))
    before = os.urandom(4 << 20)
    standby_disk.write_bytes(before)
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", f"{standby_disk},readonly")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        result = run_pykvm("run", "hello", "--disk", str(primary_disk), "--ft", f"tcp:127.0.0.1:{port}")
        reason = (f"disk 0 ({standby_disk}) is read-only here: a standby of replicated disks writes each sync's "
                  "disk changes to its copy")
        assert result.returncode == 1, result.stderr
        assert result.stderr.decode().splitlines()[-1] == (
            f"pykvm: error: the standby at tcp:127.0.0.1:{port} refused: {reason}"), result.stderr
        assert b"Hello from pykvm guest!" not in result.stdout  # unprotected, the guest never ran
        assert standby.wait() == 1
        assert f"\nft standby: refusing the primary: {reason}\n" in standby.errors, standby.errors
        assert "Bad file descriptor" not in standby.errors and "Traceback" not in standby.errors
        assert standby_disk.read_bytes() == before
        assert not Path(f"{standby_disk}.ft-undo").exists()
    finally:
        standby.kill()


def test_a_guest_that_only_writes_its_disk_starts_syncs_of_its_own(tmp_path, guest_images):
    """Replicated disks: writes complete at once and nothing else makes a sync here (no NIC), so
    the primary starts one whenever 2 MiB were written (trigger "disk"). Each carries what the
    written ranges hold, once however often they were rewritten: no sync carries more than the
    disk, and the standby follows to the end (a goodbye, not a fault)."""
    size = 32 << 20
    primary_disk, standby_disk = (tmp_path / "p.img", tmp_path / "s.img")
    for path in (primary_disk, standby_disk):
        with open(path, "wb") as f:
            f.truncate(size)
    port = _free_port()
    # A patient standby: syncs that carry MiBs of disk data take their time on a loaded host
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(standby_disk),
                         "--ft-timeout", "2000")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        result = run_pykvm("run", "blkbench", "--disk", str(primary_disk), "--append", "region=24 ms=300 gap=0 depth=4",
                           "--ft", f"tcp:127.0.0.1:{port}", "--ft-timeout", "2000", "--metrics", str(tmp_path / "m.jsonl"),
                           timeout=300)
        assert result.returncode == 0 and b"blkbench: ok" in result.stdout, result.stderr.decode()
        assert standby.wait() == 0 and "said goodbye" in standby.errors, standby.errors
    finally:
        standby.kill()
    records = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert records[0]["trigger"] == "full" and {r["trigger"] for r in records[1:]} == {"disk"}, records
    assert all(r["bytes"] < size for r in records[1:]), [r["bytes"] for r in records]
