"""Command lines and control requests generated from the grammar of pykvm's options, valid and
broken, and the rule every outcome must follow. Shared by tests/test_cli_sweep.py (a few dozen
cases) and bench/fuzz_cli.py (as many as asked).

A command line ends in one of: exit 0 (the hello guest, the embedded one or the junk file as a
flat binary ran), or exactly one line `pykvm: error: ...` on stderr and exit 2; never a
traceback, never past TIME_LIMIT.
A control request gets one reply, a JSON object with a boolean "ok" (and an "error" string when
false), and the VMM answers query-status after it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
TIME_LIMIT = 30.0  # seconds for one command line: parsing, and booting hello when it is valid


class Files:
    """Ordinary and special files to name as values: a FIFO, a directory, a socket, devices, an
    empty and a junk file, a path that is not there, one too long for a socket."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.fifo = root / "fifo"
        os.mkfifo(self.fifo)
        self.dir = root / "dir"
        self.dir.mkdir()
        self.empty = root / "empty"
        self.empty.touch()
        # Junk in every format but one: with --load-addr any bytes are a flat-binary guest, and
        # these would triple-fault (exit 1) in protected mode or run for ever in real mode. So it
        # opens with `mov al, 0; out 0xf4, al`, the same bytes in both modes: that guest ends, 0.
        self.junk = root / "junk.bin"
        self.junk.write_bytes(b"\xb0\x00\xe6\xf4" + bytes(range(256)) * 16)
        self.disk = root / "disk.img"
        with open(self.disk, "wb") as disk:
            disk.truncate(1 << 20)
        self.socket_file = root / "bound.sock"
        self._bound = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._bound.bind(str(self.socket_file))
        self.long = root / ("l" * 120)
        self.missing = root / "missing" / "file"

    def special(self) -> list[str]:
        return [str(p) for p in (self.fifo, self.dir, self.empty, self.junk, self.socket_file, self.long,
                                 self.missing)] + ["/dev/zero", "/dev/null", "/dev/full", ""]

    def fresh(self, name: str) -> str:
        return str(self.root / name)

    def close(self) -> None:
        self._bound.close()


def _numbers() -> st.SearchStrategy[str]:
    return st.one_of(st.integers(-(1 << 70), 1 << 70).map(str), st.floats(allow_nan=True).map(str),
                     st.sampled_from(["", "0x10", "1e3", " 7", "seven", "-0", "00"]))


def _sizes() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["64M", "2M", "1G", "100T", "-64M", "4097K", "lots", "", "0", "1M", "96M"]),
                     st.builds(lambda n, unit: f"{n}{unit}", st.integers(-5, 1 << 66),
                               st.sampled_from(["", "K", "M", "G", "T", "X"])))


def _cpus() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["1", "2", "255", "256", "257", "1024", "0", "-1"]), _numbers())


def _millis() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(["200", "nan", "inf", "-5", "0", "1e300"]), _numbers())


BROKEN_URIS = ["", "tcp:a..b:7000", "tcp:127.0.0.1:0", "tcp:127.0.0.1:99999", "udp:x:1", "tcp:ä:1", "tcp::1",
               "tcp:[zz]:1", "tcp:" + "a" * 300 + ":1"]


def option_values(files: Files) -> dict[str, st.SearchStrategy[str]]:
    """`run`'s options and values for each: valid ones and broken ones, special files among them."""
    special = st.sampled_from(files.special())
    mac = st.sampled_from(["52:54:00:aa:bb:01", "00:00:00:00:00:00", "01:00:5e:00:00:01", "zz", "52:54:00:12:34:56"])
    net = st.one_of(
        st.builds(lambda name, m: f"socket:{files.fresh(name)}" + (f",mac={m}" if m else ""),
                  st.sampled_from(["n1.sock", "n2.sock"]), st.none() | mac),
        st.builds(lambda path: f"socket:{path}", special),
        st.sampled_from(["tap:lo", "tap:bad/name", "tap:" + "t" * 20, "tap:", "bogus:x", "socket:", "tap:a b"]),
        st.builds(lambda path: f"socket:{files.fresh('n3.sock')},peer={path}", special))
    disk = st.one_of(st.just(str(files.disk)), st.just(f"{files.disk},readonly"), special,
                     st.builds(lambda path: f"{path},bogus", st.just(str(files.disk))))
    return {
        "--mem": _sizes(),
        "--cpus": _cpus(),
        "--append": st.text(max_size=20).filter(lambda text: "\0" not in text),
        "--load-addr": st.one_of(st.sampled_from(["0x100000", "0x7c00", "-1", "0x7c01", "nope"]), _numbers()),
        "--kernel": special,
        "--initrd": special,
        "--disk": disk,
        "--net": net,
        "--serial": st.one_of(st.sampled_from(["stdio", "none", "tcp:1", "", "file:"]),
                              st.builds(lambda path: f"file:{path}", special | st.just(files.fresh("serial.log")))),
        "--control": st.one_of(special, st.just(files.fresh("ctl.sock"))),
        "--ft": st.sampled_from(BROKEN_URIS),
        "--incoming": st.sampled_from(BROKEN_URIS),
        "--ft-timeout": _millis(),
        "--ft-interval": _millis(),
        "--ft-mode": st.sampled_from(["sync", "pipelined", "cow", ""]),
        "--ft-witness": st.one_of(st.builds(lambda path: f"file:{path}", special),
                                  st.sampled_from(["etcd:a..b:1", "x"])),
        "--metrics": special,
        "--tls-creds": special,
        "--trace": st.none(),
        "--ft-verify": st.none(),
        "--insecure": st.none(),
        "--bogus": st.none(),
    }


@st.composite
def run_command_lines(draw, files: Files) -> list[str]:
    """`pykvm run` with a guest (or an image that is no guest) and up to five options, which may
    repeat (duplicates) and clash (conflicts)."""
    values = option_values(files)
    line = ["run"]
    image = draw(st.sampled_from([None, "hello", "hello", "nosuch", "kv", *files.special()]))
    if image is not None:
        line.append(image)
    for option in draw(st.lists(st.sampled_from(sorted(values)), max_size=5)):
        value = draw(values[option])
        line += [option] if value is None else [option, value]
    return line


@st.composite
def other_command_lines(draw, files: Files) -> list[str]:
    """The other commands, each with at least one thing wrong (a valid standby would wait for a
    primary, a valid demo run for minutes)."""
    special = st.sampled_from(files.special())
    return draw(st.one_of(
        st.builds(lambda listen, extra: ["ft", "standby", "--listen", listen, *extra], st.sampled_from(BROKEN_URIS),
                  st.lists(st.sampled_from(["--mem", "1T", "--cpus", "257", "--metrics", "m", "--ft-mode", "sync"]),
                           max_size=2)),
        st.just(["ft", "standby"]), st.just(["ft"]),
        st.builds(lambda path: ["restore", path], special),
        st.builds(lambda path, cmd: ["ctl", path, cmd], special, st.sampled_from(["query-status", "bogus", ""])),
        st.builds(lambda records: ["demo", "--records", records],
                  st.one_of(st.sampled_from(["0", "-1", "100001", "x", ""]), st.integers(max_value=0).map(str))),
        st.just(["bogus"]), st.just([]), st.just(["guests", "path", "nosuch"]),
    ))


@dataclass
class Outcome:
    args: list[str]
    status: int | None  # None: still running at the time limit (killed)
    stdout: bytes
    stderr: bytes

    def problem(self) -> str | None:
        """What is wrong with this outcome, or None."""
        err = self.stderr.decode(errors="replace")
        if self.status is None:
            return f"no end within {TIME_LIMIT:.0f} s"
        if "Traceback" in err:
            return "a traceback:\n" + err
        if self.status == 0:
            return None
        lines = err.splitlines()
        if self.status != 2:
            return f"exit {self.status} (expected 0 or 2):\n{err}"
        if len(lines) != 1 or not lines[0].startswith("pykvm: error: "):
            return f"exit 2 without exactly one `pykvm: error:` line:\n{err}"
        return None


def run_cli(args: list[str], cwd: Path) -> Outcome:
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", *args], cwd=cwd, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        stdout, stderr = proc.communicate(timeout=TIME_LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        return Outcome(args, None, stdout, stderr)
    return Outcome(args, proc.returncode, stdout, stderr)


# -- control requests ---------------------------------------------------------------------------------

CONTROL_COMMANDS = ["query-status", "stop", "cont", "query-vcpus", "snapshot", "migrate", "ft-stats", "ft-protect",
                    "bogus", ""]  # not quit: the VMM must stay to answer the next


def _json_values() -> st.SearchStrategy:
    return st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
                        lambda inner: (st.lists(inner, max_size=3)
                                       | st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                        max_leaves=8)


@st.composite
def control_lines(draw, files: Files, snapshot_dir: Path, vmm_paths: list[str]) -> bytes:
    """One request line: a well-formed request with good or bad fields, or bytes that are not one."""
    paths = st.sampled_from([*files.special(), *vmm_paths, "relative.snap", "/tmp/a\0b",
                             str(snapshot_dir / "new.snap"), str(snapshot_dir)])
    fields = st.dictionaries(st.sampled_from(["file", "uri", "overwrite", "arg", "x"]),
                             st.one_of(paths, st.sampled_from(BROKEN_URIS + ["tcp:127.0.0.1:1"]), _json_values()),
                             max_size=3)
    request = st.builds(lambda cmd, extra: json.dumps({"cmd": cmd, **extra}).encode() + b"\n",
                        st.sampled_from(CONTROL_COMMANDS) | _json_values(), fields)
    broken = st.one_of(
        st.binary(max_size=200).map(lambda data: data.replace(b"\n", b"") + b"\n"),
        _json_values().map(lambda value: json.dumps(value).encode() + b"\n"),
        st.integers(1, 60_000).map(lambda depth: b"[" * depth + b"\n"),
        st.just(b"x" * 70_000 + b"\n"),
        st.just(b'{"cmd": "query-status"}'),  # no newline: answered once the client closes its side
    )
    return draw(st.one_of(request, request, broken))


def control_exchange(path: str, line: bytes, timeout: float = 30.0) -> dict | str:
    """Send one line, half-close, and return the reply (or why there is none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(line)
        sock.shutdown(socket.SHUT_WR)
        try:
            reply_line = sock.makefile("rb").readline()
        except TimeoutError:
            return f"no reply within {timeout:.0f} s"
    try:
        reply = json.loads(reply_line)
    except ValueError:
        return f"reply is not JSON: {reply_line[:200]!r}"
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        return f"reply is not {{'ok': bool, ...}}: {reply!r}"
    if reply["ok"] is False and not isinstance(reply.get("error"), str):
        return f"error reply without an error string: {reply!r}"
    return reply


def control_problem(path: str, line: bytes, snapshot_dir: Path) -> str | None:
    """Send `line`; then query-status must answer. Returns what went wrong, or None."""
    reply = control_exchange(path, line)
    if isinstance(reply, str):
        return f"{line[:100]!r}: {reply}"
    status = control_exchange(path, b'{"cmd": "query-status"}\n', timeout=10.0)
    if isinstance(status, str) or status.get("ok") is not True:
        return f"after {line[:100]!r}: query-status got {status}"
    leftovers = [p.name for p in snapshot_dir.iterdir() if p.name.endswith(".tmp")]
    if leftovers:
        return f"after {line[:100]!r}: left behind {leftovers}"
    return None
