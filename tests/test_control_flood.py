"""A client that opens more control connections than the VMM can hold (here: a VMM with 64 file
descriptors, and 80 connections held open) gets an answer on every one, and the control socket
serves again once they are gone. Before: the accept loop took the first EMFILE for the socket's
close and ended, and the socket stayed dead for good (clients then found its backlog full)."""

from __future__ import annotations

import json
import socket

from pykvm.control import MAX_CLIENTS
from tests.conftest import VmmProcess, requires_kvm, run_pykvm

pytestmark = requires_kvm

CONNECTIONS = 80
ANSWER_DEADLINE = 20.0  # seconds: a bound on a hang, not a synchronization


def _ask(path: str, held: list[socket.socket]) -> dict | None:
    """query-status on a new connection, left open (kept in `held`); its reply, None if none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.append(sock)
    sock.settimeout(ANSWER_DEADLINE)
    try:
        sock.connect(path)
        sock.sendall(b'{"cmd": "query-status"}\n')
        with sock.makefile("rb") as reader:
            line = reader.readline()
    except OSError:
        return None
    return json.loads(line) if line else None


def test_every_connection_is_answered_and_the_socket_outlives_the_flood(tmp_path, guest_images):
    control = str(tmp_path / "ctl.sock")
    vmm = VmmProcess("run", "dirty", "--control", control, prefix=("prlimit", "--nofile=64", "--"))
    held: list[socket.socket] = []
    try:
        vmm.wait_for(b"pages/s")
        replies = [_ask(control, held) for _ in range(CONNECTIONS)]
        assert None not in replies, [i for i, reply in enumerate(replies) if reply is None]
        served = [reply for reply in replies if reply["ok"]]
        refused = [reply for reply in replies if not reply["ok"]]
        assert len(served) == MAX_CLIENTS and all(reply["status"] == "running" for reply in served)
        assert all(reply["error"].startswith(f"too many control connections ({MAX_CLIENTS} open)")
                   for reply in refused), refused
        for sock in held:
            sock.close()
        result = run_pykvm("ctl", control, "query-status", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["status"] == "running"
        assert "Traceback" not in vmm.errors
    finally:
        for sock in held:
            sock.close()
        vmm.kill()
