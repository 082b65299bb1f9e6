"""Pauses have owners: the control socket's stop, cont, snapshot and query-vcpus, hammered from
several clients while an FT primary syncs every 20 ms under --ft-verify, never let the guest run
while one of them (or a sync) is looking at it: the standby's RAM matches the primary's at every
sync and it never sees a sync's pages change under their checksum (it would drop the primary),
every snapshot restores, and the guest runs on after a last cont."""

from __future__ import annotations

import json
import random
import socket
import threading
from pathlib import Path

from pykvm.testing.ft_pair import stop_pair
from pykvm.transfer.snapshot import open_snapshot
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.test_ft import _free_port

pytestmark = requires_kvm

CLIENTS = 4
REQUESTS_PER_CLIENT = 80
KEPT_SNAPSHOTS = 2  # restored and run at the end; the others are checked and deleted


class ControlClient:
    """One connection to the control socket, one request at a time."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")

    def request(self, cmd: str, **fields: str) -> dict:
        self.sock.sendall(json.dumps({"cmd": cmd, **fields}).encode() + b"\n")
        return json.loads(self.reader.readline())

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _hammer(path: str, workdir: Path, client: int, snapshots: list[Path], problems: list[str]) -> None:
    """REQUESTS_PER_CLIENT random commands; each reply checked as a user would read it."""
    rng = random.Random(client)
    conn = ControlClient(path)
    try:
        for n in range(REQUESTS_PER_CLIENT):
            cmd = rng.choices(["stop", "cont", "query-vcpus", "snapshot"], weights=[3, 3, 2, 1])[0]
            if cmd == "snapshot":
                file = workdir / f"client{client}-{n}.snap"
                reply = conn.request(cmd, file=str(file))
            else:
                reply = conn.request(cmd)
            if not reply.get("ok"):
                problems.append(f"{cmd}: {reply}")
            elif cmd == "stop" and (reply["status"] != "paused" or "ctl stop" not in reply["paused_by"]):
                problems.append(f"stop left {reply}")
            elif cmd == "cont" and "ctl stop" in reply["paused_by"]:
                problems.append(f"cont left {reply}")
            elif cmd == "snapshot":
                open_snapshot(file, verify_memory=True).close()  # the checksums of every section
                snapshots.append(file)
    except Exception as error:  # reported by the test, not lost in a thread
        problems.append(f"client {client}: {error!r}")
    finally:
        conn.close()


def test_control_commands_during_ft_syncs(tmp_path, guest_images):
    port = _free_port()
    primary_ctl, standby_ctl = str(tmp_path / "p.ctl"), str(tmp_path / "sb.ctl")
    # A generous --ft-timeout: a snapshot holds the machine (and so the FT thread's next sync or
    # heartbeat) while it writes, which on a loaded CI host can outlast the 200 ms default; what
    # is under test is who may resume the guest, not how fast a takeover starts.
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--ft-verify",
                         "--ft-timeout", "5000", "--control", standby_ctl)
    primary = None
    snapshots: list[Path] = []
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "dirty", "--append", "pages=2048", "--ft", f"tcp:127.0.0.1:{port}",
                             "--ft-verify", "--ft-interval", "20", "--ft-timeout", "5000", "--control", primary_ctl)
        primary.wait_for(b"pages/s")
        verified_before = _ft_stats(standby_ctl)["verified"]

        problems: list[str] = []
        clients = [threading.Thread(target=_hammer, args=(primary_ctl, tmp_path, client, snapshots, problems))
                   for client in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()
        assert problems == []
        assert snapshots, "the random mix took no snapshot"

        reply = json.loads(run_pykvm("ctl", primary_ctl, "cont").stdout)
        assert reply["ok"] and "ctl stop" not in reply["paused_by"], reply
        checks = primary.stdout.data.count(b"pages/s")
        primary.wait_for(b"pages/s", count=checks + 2)  # the guest runs on, checking its pages
        stats = _ft_stats(standby_ctl)
        assert stats["role"] == "standby", standby.errors  # still following: no sync was torn
        assert stats["mismatches"] == 0 and stats["verified"] > verified_before, stats
        assert "VERIFY FAILED" not in standby.errors and "primary lost" not in standby.errors
        assert "FAIL" not in primary.output
    finally:
        stop_pair(primary, standby)

    for file in snapshots[KEPT_SNAPSHOTS:]:
        file.unlink()
    for file in snapshots[:KEPT_SNAPSHOTS]:
        restored = VmmProcess("restore", str(file), "--verify")
        try:
            restored.wait_for(b"pages/s")  # a whole generation of pages checked by the guest
            assert "FAIL" not in restored.output
        finally:
            restored.kill()


def _ft_stats(path: str) -> dict:
    return json.loads(run_pykvm("ctl", path, "ft-stats").stdout)
