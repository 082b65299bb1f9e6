"""What an FT pair's control sockets accept. The standby's answers for itself (its status, its FT
counts) and refuses whatever acts on a running guest, until it takes over: then the guest's own
socket, at the same path, serves every command. A protected primary refuses `migrate`, which
would leave the standby holding a second copy of the guest (and would take the dirty log the
syncs need); once its standby has gone, the guest migrates."""

from __future__ import annotations

import contextlib
import json
import signal

from pykvm.testing.ft_pair import stop_pair
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.test_cli_sweep import _wait_for_socket
from tests.test_ft import _free_port

pytestmark = requires_kvm

STANDBY_REFUSAL = "this VMM is an FT standby: no guest runs here until it takes over"


def _ctl(path: str, *command: str) -> tuple[int, dict]:
    result = run_pykvm("ctl", path, *command)
    return result.returncode, json.loads(result.stdout)


@contextlib.contextmanager
def _protected_guest_and_a_target(tmp_path, *standby_options: str):
    """A `dirty` primary (control socket p.ctl) protected by a standby, and a migration target
    waiting: (standby, primary, target, the target's URI)."""
    port, target_uri = _free_port(), f"tcp:127.0.0.1:{_free_port()}"
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", *standby_options)
    primary = target = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "dirty", "--ft", f"tcp:127.0.0.1:{port}", "--control", str(tmp_path / "p.ctl"))
        primary.wait_for(b"pages/s")
        target = VmmProcess("run", "dirty", "--incoming", target_uri)
        target.stderr.wait_for(b"waiting for a migration")
        yield standby, primary, target, target_uri
    finally:
        stop_pair(primary, standby)
        if target is not None:
            target.kill()


def test_the_standby_serves_only_what_concerns_a_standby_until_it_takes_over(tmp_path, guest_images):
    standby_ctl, primary_ctl, snapshot = str(tmp_path / "sb.ctl"), str(tmp_path / "p.ctl"), tmp_path / "sb.snap"
    with _protected_guest_and_a_target(tmp_path, "--control", standby_ctl) as (standby, primary, target, target_uri):
        assert _ctl(standby_ctl, "query-status") == (0, {"ok": True, "status": "standby", "paused_by": []})
        assert _ctl(standby_ctl, "ft-stats")[1]["role"] == "standby"
        for command in (("stop",), ("cont",), ("query-vcpus",), ("quit",), ("snapshot", str(snapshot)),
                        ("migrate", target_uri)):
            assert _ctl(standby_ctl, *command) == (1, {"ok": False, "error": f"{command[0]}: {STANDBY_REFUSAL}"})
        assert not snapshot.exists()
        assert target.proc.poll() is None and target.stdout.data == b""  # still waiting: no guest came

        status, reply = _ctl(primary_ctl, "migrate", target_uri)
        assert status == 1 and "protects the guest" in reply["error"], reply
        stats = _ctl(primary_ctl, "ft-stats")[1]
        assert stats["protected"] and stats["standby_losses"] == 0, stats
        checks = primary.stdout.data.count(b"pages/s")
        primary.wait_for(b"pages/s", count=checks + 1)  # still here, running and checking its pages

        primary.kill()  # the standby takes over: the guest's own control socket replaces the standby's
        standby.stderr.wait_for(b"took over from sync")
        _wait_for_socket(standby_ctl)
        assert _ctl(standby_ctl, "query-status")[1]["status"] == "running"
        assert _ctl(standby_ctl, "snapshot", str(snapshot))[0] == 0 and snapshot.stat().st_size > 0


def test_a_primary_whose_standby_has_gone_migrates(tmp_path, guest_images):
    with _protected_guest_and_a_target(tmp_path) as (standby, primary, target, target_uri):
        standby.proc.send_signal(signal.SIGTERM)  # the user ends the standby, as the refusal says
        assert standby.wait() == 128 + signal.SIGTERM
        primary.stderr.wait_for(b"continuing unprotected")
        status, reply = _ctl(str(tmp_path / "p.ctl"), "migrate", target_uri)
        assert status == 0 and reply["status"] == "migrated", reply
        assert primary.wait() == 0
        target.wait_for(b"pages/s")  # the guest runs on at the target, checking its pages
        assert "FAIL" not in target.output
