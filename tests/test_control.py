"""The control socket: every command, and bad requests that get an error reply while the VMM runs on."""

from __future__ import annotations

import json
import socket

import pytest

from tests.conftest import VmmProcess, requires_kvm, run_pykvm


def _raw(sock_path: str, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(sock_path)
        sock.sendall(line)
        return json.loads(sock.makefile("rb").readline())


@requires_kvm
def test_commands_and_bad_requests(tmp_path, guest_images):
    path = str(tmp_path / "ctl.sock")
    vmm = VmmProcess("run", "dirty", "--cpus", "2", "--control", path)
    try:
        vmm.wait_for(b"pages/s")
        assert _raw(path, b'{"cmd": "query-status"}\n') == {"ok": True, "status": "running", "paused_by": []}
        assert _raw(path, b"not json\n") == {"ok": False, "error": "not a JSON object"}
        assert _raw(path, b'{"cmd": "reboot-the-world"}\n')["error"].startswith("unknown command 'reboot-the-world'")
        assert _raw(path, b'["cmd"]\n')["ok"] is False
        assert "needs a 'file' string" in _raw(path, b'{"cmd": "snapshot"}\n')["error"]
        assert "expected tcp:HOST:PORT" in _raw(path, b'{"cmd": "migrate", "uri": "udp:x"}\n')["error"]
        vcpus = _raw(path, b'{"cmd": "query-vcpus"}\n')["vcpus"]
        assert [v["index"] for v in vcpus] == [0, 1] and all(v["rip"] for v in vcpus)
        running = {"ok": True, "status": "running", "paused_by": []}
        stopped = {"ok": True, "status": "paused", "paused_by": ["ctl stop"]}
        assert _raw(path, b'{"cmd": "stop"}\n') == stopped
        assert _raw(path, b'{"cmd": "stop"}\n') == stopped  # a second stop changes nothing
        # a snapshot's own pause ends with the snapshot; the user's stop holds on
        assert _raw(path, b'{"cmd": "snapshot", "file": "%s"}\n' % str(tmp_path / "s.snap").encode())["ok"]
        assert _raw(path, b'{"cmd": "query-vcpus"}\n')["ok"]
        assert _raw(path, b'{"cmd": "query-status"}\n') == stopped
        assert _raw(path, b'{"cmd": "cont"}\n') == running  # one cont undoes any number of stops
        assert _raw(path, b'{"cmd": "cont"}\n') == running  # cont without a stop changes nothing
        # the CLI client: prints the reply, exits non-zero on an error reply
        ok = run_pykvm("ctl", path, "query-status")
        assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "running"
        bad = run_pykvm("ctl", path, "bogus")
        assert bad.returncode == 1 and json.loads(bad.stdout)["ok"] is False
        # a second VMM may not take the same socket
        second = run_pykvm("run", "--control", path)
        assert second.returncode == 2 and b"in use by another process" in second.stderr
        assert _raw(path, b'{"cmd": "quit"}\n')["ok"]
        assert vmm.wait() == 0
    finally:
        vmm.kill()


@pytest.mark.nokvm
def test_ctl_without_a_vmm(tmp_path):
    result = run_pykvm("ctl", str(tmp_path / "nothing.sock"), "query-status")
    assert result.returncode == 2 and b"no pykvm is listening there" in result.stderr
