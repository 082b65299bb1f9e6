"""The control socket: every command, and bad requests that get an error reply while the VMM runs on."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path

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
        # a lone surrogate (valid JSON) is a bad path, not an internal error
        assert "not a file name" in _raw(path, b'{"cmd": "snapshot", "file": "/tmp/\\ud800"}\n')["error"]
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


def _as_nobody(sock_path: str, line: bytes) -> dict | str:
    """Send `line` from a forked child that has dropped to uid nobody; its reply, or the error
    it met, comes back through a pipe."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            answer = json.dumps(_raw(sock_path, line))
        except OSError as error:
            answer = json.dumps(type(error).__name__)
        os.write(writer, answer.encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        answer = json.loads(pipe.read())
    os.waitpid(pid, 0)
    return answer


@requires_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_the_control_socket_is_private(guest_images):
    """0600 whatever the umask; a client of another uid is refused by its credentials even if the
    mode is loosened; a snapshot never replaces a file unless asked to."""
    directory = Path(tempfile.mkdtemp(prefix="pykvm-ctl-"))  # not under pytest's 0700 tmp: nobody must reach it
    directory.chmod(0o755)
    path = str(directory / "ctl.sock")
    vmm = VmmProcess("run", "dirty", "--control", path, prefix=("sh", "-c", 'umask 000; exec "$@"', "sh"))
    try:
        vmm.wait_for(b"pages/s")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert _as_nobody(path, b'{"cmd": "query-status"}\n') == "PermissionError"
        os.chmod(path, 0o666)  # as if someone loosened it: the peer's uid is still checked
        refused = _as_nobody(path, b'{"cmd": "quit"}\n')
        assert refused["ok"] is False and "may not control this VMM" in refused["error"]
        assert _raw(path, b'{"cmd": "query-status"}\n') == {"ok": True, "status": "running", "paused_by": []}

        existing = directory / "precious"
        existing.write_bytes(b"keep me")
        kept = run_pykvm("ctl", path, "snapshot", str(existing))
        assert kept.returncode == 1 and "exists" in json.loads(kept.stdout)["error"]
        assert existing.read_bytes() == b"keep me"
        replaced = run_pykvm("ctl", path, "snapshot", str(existing), "--overwrite")
        assert replaced.returncode == 0 and existing.read_bytes().startswith(b"PYKVMSNP")
        assert _raw(path, b'{"cmd": "quit"}\n')["ok"]
        assert vmm.wait() == 0
    finally:
        vmm.kill()
        shutil.rmtree(directory)
