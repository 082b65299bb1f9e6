"""Bad input, swept: command lines and control requests generated from the options' grammar
(tests/cli_fuzzing.py) end in exit 0 or one line and exit 2, within a time limit, never a
traceback; a running VMM answers every request and query-status after it. Then the cases the
bad-input sweep (issue 17) found, each as a user meets it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import cli_fuzzing
from tests.cli_fuzzing import Files, control_lines, control_problem, other_command_lines, run_cli, run_command_lines
from tests.conftest import REPO, VmmProcess, requires_kvm, run_pykvm

pytestmark = requires_kvm

SWEEP = settings(max_examples=20, deadline=timedelta(seconds=cli_fuzzing.TIME_LIMIT * 2), derandomize=False,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                        HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def files(tmp_path_factory, guest_images):
    made = Files(tmp_path_factory.mktemp("sweep"))
    yield made
    made.close()


@SWEEP
@given(data=st.data())
def test_generated_command_lines_end_in_zero_or_one_line_and_two(files, data):
    args = data.draw(st.one_of(run_command_lines(files), run_command_lines(files), other_command_lines(files)))
    outcome = run_cli(args, files.root)
    assert outcome.problem() is None, f"pykvm {args}: {outcome.problem()}"


@pytest.fixture(scope="module")
def running_vmm(tmp_path_factory, guest_images):
    root = tmp_path_factory.mktemp("ctl")
    control, disk = str(root / "vm.sock"), root / "disk.img"
    with open(disk, "wb") as image:
        image.truncate(1 << 20)
    vmm = VmmProcess("run", "dirty", "--append", "pages=64 seconds=100000", "--control", control,
                     "--disk", str(disk), "--serial", "none", "--mem", "16M")
    (root / "files").mkdir()
    files = Files(root / "files")
    try:
        _wait_for_socket(control)
        snapshots = root / "snapshots"
        snapshots.mkdir()
        yield control, str(disk), snapshots, files
        assert vmm.proc.poll() is None, vmm.stderr.data.decode(errors="replace")
    finally:
        vmm.kill()
        files.close()


def _wait_for_socket(path: str, timeout: float = 30) -> None:
    """Until the VMM accepts on its control socket (a deadline, no fixed sleep)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(path)
                return
        except (FileNotFoundError, ConnectionRefusedError):
            threading.Event().wait(0.05)
    raise TimeoutError(f"{path}: no control socket after {timeout} s")


@settings(SWEEP, max_examples=60)  # in-process requests: cheap
@given(data=st.data())
def test_generated_control_requests_are_all_answered(running_vmm, data):
    control, disk, snapshots, files = running_vmm
    line = data.draw(control_lines(files, snapshots, [control, disk]))
    assert control_problem(control, line, snapshots) is None


# -- the sweep's own findings, one by one ---------------------------------------------------------------


def _one_line_exit_2(result: subprocess.CompletedProcess, *fragments: str) -> str:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and err.startswith("pykvm: error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


@pytest.mark.parametrize("args, fragment", [
    (["run", "{fifo}"], "is a FIFO"), (["run", "--kernel", "{fifo}"], "is a FIFO"),
    (["restore", "{fifo}"], "is a FIFO"), (["run", "--serial", "file:{fifo}"], "is a FIFO"),
    (["run", "--disk", "{fifo}"], "is a FIFO"), (["run", "/dev/zero"], "character device"),
    (["restore", "{dir}"], "is a directory"),
])
def test_special_files_are_refused_before_anything_opens_them(tmp_path, fifo, args, fragment):
    args = [arg.format(fifo=fifo, dir=tmp_path) for arg in args]
    _one_line_exit_2(run_pykvm(*args, timeout=20), fragment)


FINDINGS = [
    (["run", "hello", "--cpus", "257"], "1 to 255"), (["run", "--cpus", "100000"], "vCPUs"),
    (["run", "--mem", "100T"], "more than this host's"), (["run", "--mem", "99999999999999999999T"], "more than"),
    (["run", "--mem", "-64M"], "not a size"), (["ft", "standby", "--listen", "tcp:127.0.0.1:7", "--mem", "1T"], "RAM"),
    (["run", "--ft", "tcp:a..b:7000"], "not a host name"), (["run", "--ft", ""], "expected tcp:HOST:PORT"),
    (["run", "--incoming", ""], "expected tcp:HOST:PORT"), (["run", "--control", ""], "expected a socket path"),
    (["run", "--control", "/tmp/" + "x" * 110], "at most 107 bytes"),
    (["run", "--ft", "tcp:127.0.0.1:7", "--metrics", "/no/such/dir/m.jsonl"], "does not exist"),
    (["run", "--ft", "tcp:127.0.0.1:7", "--metrics", "/tmp"], "is a directory"),
    (["run", "--ft", "tcp:127.0.0.1:7", "--ft-timeout", "-5"], "--ft-timeout -5"),
    (["run", "--ft", "tcp:127.0.0.1:7", "--ft-timeout", "nan"], "--ft-timeout nan"),
    (["run", "--ft", "tcp:127.0.0.1:7", "--ft-timeout", "inf"], "--ft-timeout inf"),
    (["run", "--ft", "tcp:127.0.0.1:7", "--ft-interval", "-1"], "--ft-interval -1"),
    (["run", "--metrics", "m.jsonl"], "--metrics needs --ft"), (["run", "--ft-verify"], "--ft-verify needs --ft"),
    (["run", "--net", "socket:/tmp/x.sock,mac=00:00:00:00:00:00"], "all zeros"),
    (["run", "--net", "socket:/tmp/x.sock,mac=52:54:00:12:34:57", "--net", "socket:/tmp/y.sock"], "same MAC"),
    (["run", "--load-addr", "-1", "x.bin"], "--load-addr -1"),
    (["run", "hello", "--load-addr", "0x100000"], "is a multiboot image"),
    (["run", "--net", "tap:lo"], "not a TAP"), (["run", "hello", "--mem", "64M", "--mem", "128M"], "given twice"),
    (["run", "kv"], "needs --disk and --net"), (["run", "blk"], "needs --disk"),
    (["demo", "--records", "0"], "--records 0"), (["demo", "--records", "-1"], "--records -1"),
    (["ctl", ""], "expected a socket path"), (["ctl", "/tmp/" + "y" * 110, "query-status"], "at most 107 bytes"),
    (["run", "--kernel", "/bin/ls"], "not a Linux kernel"),
]


def test_each_bad_input_is_one_line_naming_its_cause():
    """Four at a time: each is a Python start-up and a parse."""
    def problem(case: tuple[list[str], str]) -> str | None:
        args, fragment = case
        try:
            _one_line_exit_2(run_pykvm(*args, timeout=30), fragment)
        except AssertionError as error:
            return f"pykvm {' '.join(args)}: {error}"
        return None

    with ThreadPoolExecutor(4) as pool:
        problems = [found for found in pool.map(problem, FINDINGS) if found]
    assert not problems, "\n".join(problems)


def test_the_same_file_as_two_writable_disks(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    _one_line_exit_2(run_pykvm("run", "--disk", str(disk), "--disk", str(disk)), "both are readonly")
    assert run_pykvm("run", "--disk", f"{disk},readonly", "--disk", f"{disk},readonly").returncode == 0


def test_forty_disks_do_not_fit_the_pci_bus(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    _one_line_exit_2(run_pykvm("run", *[f"--disk={disk},readonly"] * 40), "room for 31")


def test_an_empty_initrd_is_called_empty(tmp_path, guest_images):
    empty = tmp_path / "empty"
    empty.touch()
    _one_line_exit_2(run_pykvm("run", "--kernel", str(guest_images["hello"].with_suffix(".elf")), "--initrd",
                               str(empty)), "empty")


def test_pykvm_cache_on_a_file(tmp_path):
    cache = tmp_path / "cache"
    cache.touch()
    _one_line_exit_2(run_pykvm("run", "hello", env={"PYKVM_CACHE": str(cache)}), "PYKVM_CACHE")


def test_serial_output_onto_a_full_device_is_said_once():
    result = run_pykvm("run", "--serial", "file:/dev/full")
    assert result.returncode == 0 and result.stderr.count(b"\n") == 1 and b"No space left" in result.stderr


def test_version_and_help():
    assert run_pykvm("--version").stdout.decode().startswith("pykvm ")
    standby = run_pykvm("ft", "standby", "--help").stdout.decode()
    for absent in ("--ft-mode", "--ft-interval", "--metrics", "--incoming", "--kernel"):
        assert absent not in standby
    assert "example:" in standby and "exit status" in standby and "75" in standby
    ctl = run_pykvm("ctl", "--help").stdout.decode()
    for command in ("query-status", "snapshot FILE", "migrate tcp:HOST:PORT", "--timeout"):
        assert command in ctl


# -- ctl and the control socket ------------------------------------------------------------------------


def test_ctl_gives_up_on_a_socket_that_never_answers(tmp_path):
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(path)
        silent.listen()
        result = run_pykvm("ctl", path, "query-status", "--timeout", "0.5", timeout=20)
    err = result.stderr.decode()
    assert result.returncode == 1 and "no reply to 'query-status' within 0.5 s" in err and err.count("\n") == 1


def test_ctl_on_a_socket_that_answers_garbage(tmp_path):
    path = str(tmp_path / "garbage.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1024)
                conn.sendall(b"hello there\n")
        threading.Thread(target=answer, daemon=True).start()
        result = run_pykvm("ctl", path, "query-status", timeout=20)
    assert result.returncode == 1 and b"not a JSON object" in result.stderr and b"Traceback" not in result.stderr


def test_ctl_refuses_extra_and_missing_arguments(running_vmm):
    control = running_vmm[0]
    _one_line_exit_2(run_pykvm("ctl", control, "query-status", "extra"), "takes no argument")
    _one_line_exit_2(run_pykvm("ctl", control, "query-status", "a", "b"), "unrecognized arguments")
    _one_line_exit_2(run_pykvm("ctl", control, "snapshot"), "needs FILE")
    _one_line_exit_2(run_pykvm("ctl", control, "stop", "--overwrite"), "--overwrite is for snapshot")


def test_snapshot_refuses_the_vmms_own_files_and_leaves_nothing(running_vmm, tmp_path, fifo):
    control, disk, snapshots, _ = running_vmm
    for target in (control, disk, fifo, str(tmp_path)):
        before = os.stat(target)
        result = run_pykvm("ctl", control, "snapshot", target, "--overwrite")
        assert result.returncode == 1 and json.loads(result.stdout)["ok"] is False, result.stdout
        after = os.stat(target)
        assert (after.st_ino, after.st_mode, after.st_size) == (before.st_ino, before.st_mode, before.st_size)
    assert sorted(os.listdir(tmp_path)) == ["fifo"]
    ok = json.loads(run_pykvm("ctl", control, "query-status").stdout)
    assert ok["ok"] is True


def test_a_relative_snapshot_path_is_the_clients(running_vmm, tmp_path):
    control = running_vmm[0]
    result = run_pykvm("ctl", control, "snapshot", "here.snap", prefix=("env", "-C", str(tmp_path)))
    assert json.loads(result.stdout)["file"] == str(tmp_path / "here.snap")
    assert (tmp_path / "here.snap").stat().st_size > 0


def test_query_status_does_not_wait_behind_a_migration(running_vmm):
    """A migration whose target accepts and never reads holds the command lock; query-status is
    answered at once, another command is told the VMM is busy (after BUSY_WAIT)."""
    control = running_vmm[0]
    with socket.create_server(("127.0.0.1", 0)) as mute:
        port = mute.getsockname()[1]
        migrating = VmmProcess("ctl", control, "migrate", f"tcp:127.0.0.1:{port}")
        try:
            conn, _ = mute.accept()  # the migration is under way: it has connected
            with conn:
                status = run_pykvm("ctl", control, "query-status", "--timeout", "2", timeout=20)
                assert status.returncode == 0, status.stderr
                busy = json.loads(run_pykvm("ctl", control, "stop", "--timeout", "30", timeout=60).stdout)
                assert busy == {"ok": False, "error": "busy: migrate is still running (ask again when it is done)"}
        finally:
            migrating.kill()


# -- ends -------------------------------------------------------------------------------------------------


# The VMM starts with the signal's default action even if this runner ignores it (under `nohup`
# it ignores SIGHUP, which a VMM then keeps ignoring, as `nohup pykvm ...` should).
WITH_DEFAULT_SIGNALS = (sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
                        "signal.signal(signal.SIGTERM, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_ends_a_vmm_and_removes_its_sockets(tmp_path, guest_images, signum):
    control, link = tmp_path / "vm.sock", tmp_path / "link.sock"
    vmm = VmmProcess("run", "dirty", "--append", "pages=64 seconds=100000", "--control", str(control),
                     "--net", f"socket:{link}", "--serial", "none", prefix=WITH_DEFAULT_SIGNALS)
    try:
        _wait_for_socket(str(control))
        assert link.is_socket()
        vmm.proc.send_signal(signum)
        assert vmm.wait(30) == 128 + signum
    finally:
        vmm.kill()
    assert not control.exists() and not link.exists()
    assert vmm.stderr.data.decode() == f"pykvm: ended by {signal.Signals(signum).name}\n"


def test_a_short_demo_kills_its_primary_and_cleans_up(tmp_path):
    """Three records, seed 2: once it was killed after record 0 and hung with the primary alive."""
    result = run_pykvm("demo", "--records", "3", "--seed", "2", env={"TMPDIR": str(tmp_path)}, timeout=300)
    out = result.stdout.decode()
    assert result.returncode == 0, out + result.stderr.decode()
    assert "primary killed (SIGKILL) after" in out and "records verified      3 of 3" in out
    assert not list(tmp_path.glob("pykvm-demo-*"))


def test_a_terminated_demo_removes_its_folder(tmp_path):
    demo = subprocess.Popen([sys.executable, "-m", "pykvm", "demo", "--records", "100000"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp_path)})
    try:
        for line in demo.stdout:
            if b"protected by a standby" in line:
                break
        assert list(tmp_path.glob("pykvm-demo-*"))
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 128 + signal.SIGTERM
    finally:
        if demo.poll() is None:
            demo.kill()
    assert not list(tmp_path.glob("pykvm-demo-*"))


def _forge_config(snapshot: Path, forged: Path, old: bytes, new: bytes) -> None:
    """A copy of `snapshot` whose CONFIG section says `new` for `old` (same length), with every
    checksum made right again: well-formed, but not the machine its state came from."""
    from pykvm.transfer.snapshot import Header, SectionEntry, SectionKind

    data = bytearray(snapshot.read_bytes())
    header = Header.parse(data)
    entries = [dict(SectionEntry.parse(data[Header.sizeof() + i * SectionEntry.sizeof():]))
               for i in range(header.sections)]
    for entry in entries:
        entry.pop("_io", None)
        if entry["kind"] == SectionKind.CONFIG:
            at, length = entry["offset"], entry["length"]
            config = bytes(data[at:at + length]).replace(old, new, 1)
            assert len(config) == length and new in config
            data[at:at + length] = config
            entry["checksum"] = zlib.crc32(config)
    table = b"".join(SectionEntry.build(entry) for entry in entries)
    fields = dict(version=header.version, sections=header.sections, checksum=0, reserved=header.reserved)
    fields["checksum"] = zlib.crc32(Header.build(fields) + table)
    data[:Header.sizeof() + len(table)] = Header.build(fields) + table
    forged.write_bytes(data)


@pytest.mark.parametrize("old, new, fragment", [(b'"cpus":1,', b'"cpus":9,', "state has 1 vCPUs"),
                                                (b'"cpus":1,', b'"cpus":0,', "0 vCPUs"),
                                                (b'"memory":16777216', b'"memory":16777217', "memory sections")])
def test_a_snapshot_whose_state_does_not_fit_its_configuration(running_vmm, tmp_path, old, new, fragment):
    control, snap = running_vmm[0], tmp_path / "vm.snap"
    assert json.loads(run_pykvm("ctl", control, "snapshot", str(snap)).stdout)["ok"]
    _forge_config(snap, tmp_path / "forged.snap", old, new)
    _one_line_exit_2(run_pykvm("restore", str(tmp_path / "forged.snap")), fragment)
