"""One trial of the study: the `iozone` guest in one workload under one FT mode, as a user would
run it (a `pykvm run` primary and, when protected, a `pykvm ft standby`, both child processes),
driven by the client; what comes back is the client's session and the primary's metrics file.

The modes are data: each is the `pykvm run` options that select it. A mode is tried only if the
CLI offers it (`--ft-mode cow` exists where the FT speed work has landed)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from pykvm import guestbuild
from pykvm.study.client import IozoneClient, Session

MEMORY = "64M"
DISK_BYTES = 32 << 20  # the workload's file is 16 MiB of it
START_PATIENCE = 60.0  # seconds for a VMM to say it is up (the standby's full sync included)
# The standby's patience with a silent primary. Above the default (200 ms): on a loaded 2-core host
# the first sync after the guest fills its cache (~4000 pages) can leave the standby without a
# word for longer than that in pipelined mode, and a takeover would end the trial. It changes no
# figure measured: heartbeats only fill silences, and no fault is injected.
FT_TIMEOUT_MS = "2000"

# name -> the `pykvm run` options that select it (None: no FT at all)
MODES: dict[str, list[str] | None] = {
    "none": None,
    "sync": ["--ft-mode", "sync"],
    "pipelined": ["--ft-mode", "pipelined"],
    "cow": ["--ft-mode", "cow"],
    "periodic": ["--ft-mode", "sync", "--ft-interval", "25"],
}
MODE_TITLES = {"none": "no FT", "sync": "sync (Kemari)", "pipelined": "pipelined", "cow": "cow (two in flight)",
               "periodic": "periodic 25 ms (Remus)"}


@dataclass(frozen=True)
class Workload:
    name: str
    append: str  # the guest's command line


# Kemari's IOzone runs: buffered writes with an fsync after 3000 pages (~3000 dirtied pages per
# sync), and O_SYNC writes (one 4 KiB record, written and flushed, per report).
WORKLOADS = (Workload("buffered", "mode=buffered record=4096 fsync=3000 file=16"),
             Workload("sync", "mode=sync record=4096 file=16"))
WORKLOAD_TITLES = {"buffered": "buffered + fsync", "sync": "O_SYNC"}


def offered_modes() -> list[str]:
    """The modes of MODES whose `--ft-mode` value `pykvm run` accepts."""
    from pykvm import cli  # the command is above this module; asked only when a study starts

    choices = _option_choices(cli._parser(), "run", "--ft-mode")
    return [name for name, options in MODES.items() if options is None or options[1] in choices]


def _option_choices(parser, command: str, option: str) -> tuple[str, ...]:
    for action in parser._actions:
        if getattr(action, "choices", None) and command in action.choices:
            for inner in action.choices[command]._actions:
                if option in inner.option_strings:
                    return tuple(inner.choices or ())
    return ()


class TrialFailed(Exception):
    """A VMM of a trial failed to start or the guest did not answer; the message says which and why."""


class _Vmm:
    """A pykvm child process; its stderr lines are kept, so one can wait for a line and show them."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        threading.Thread(target=self._read, args=(log,), daemon=True).start()

    def _read(self, log: Path) -> None:
        with open(log, "w", buffering=1) as copy:  # kept for a post-mortem
            for raw in self.proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                copy.write(line + "\n")
                with self._cond:
                    self.lines.append(line)
                    self._cond.notify_all()

    def wait_for(self, text: str, timeout: float = START_PATIENCE) -> None:
        with self._cond:
            said = self._cond.wait_for(lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                                       timeout)
            if not said or not any(text in line for line in self.lines):
                raise TrialFailed(f"pykvm {self.proc.args[3]} never said {text!r}:\n" + "\n".join(self.lines))

    def finish(self, timeout: float) -> int:
        """Its exit status, once it has ended (killed if it has not within `timeout`)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def said(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


@dataclass
class TrialResult:
    workload: str
    mode: str
    session: Session
    syncs: list[dict]  # the primary's metrics lines (none unprotected)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _blank_disk(path: Path) -> None:
    with open(path, "wb") as disk:
        disk.truncate(DISK_BYTES)


def run_trial(workload: Workload, mode: str, seconds: float, workdir: Path, *, keep_disks: bool = False) -> TrialResult:
    """Boot the guest under `mode`, run `workload` for `seconds`, and gather what was measured.
    The disk images (WORKDIR/WORKLOAD-MODE/primary.img, standby.img) are removed unless kept."""
    root = workdir / f"{workload.name}-{mode}"
    root.mkdir(parents=True, exist_ok=True)
    image = str(guestbuild.image_path("iozone"))
    link, metrics = root / "link.sock", root / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    common = ["--mem", MEMORY, "--net", f"socket:{link}"]
    _blank_disk(root / "primary.img")
    standby = None
    ft: list[str] = []
    if MODES[mode] is not None:
        _blank_disk(root / "standby.img")
        uri = f"tcp:127.0.0.1:{_free_port()}"
        standby = _Vmm(["ft", "standby", "--listen", uri, "--ft-timeout", FT_TIMEOUT_MS,
                        "--disk", str(root / "standby.img"), *common,
                        "--serial", f"file:{root / 'standby-serial.log'}"], root / "standby.log")
        standby.wait_for("waiting for a primary")
        ft = ["--ft", uri, "--ft-timeout", FT_TIMEOUT_MS, *MODES[mode], "--metrics", str(metrics)]
    primary = _Vmm(["run", image, "--disk", str(root / "primary.img"), *common, "--append", workload.append, *ft,
                    "--serial", f"file:{root / 'serial.log'}"], root / "primary.log")
    client = IozoneClient(root / "client.sock", link)
    try:
        if standby is not None:
            primary.wait_for("protected by")
        try:
            session = client.run(seconds)
        except Exception as error:
            raise TrialFailed(f"{workload.name}/{mode}: {error}\nprimary said:\n{primary.said()}"
                              + (f"\nstandby said:\n{standby.said()}" if standby else "")) from None
        status = primary.finish(30)
        if standby is not None and "took over" in standby.said():
            raise TrialFailed(f"{workload.name}/{mode}: the standby took over, so the figures are not one "
                              f"protected run's:\n{standby.said()}\nprimary said:\n{primary.said()}")
        if status != 0:
            raise TrialFailed(f"{workload.name}/{mode}: the primary exited {status}:\n{primary.said()}")
    finally:
        client.close()
        primary.finish(0)
        if standby is not None:
            standby.finish(10)  # told Goodbye by an orderly primary: it ends by itself
        for disk in () if keep_disks else ("primary.img", "standby.img"):  # 16 MiB written to each
            (root / disk).unlink(missing_ok=True)
    syncs = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    return TrialResult(workload.name, mode, session, syncs)
