"""A randomized FT fault campaign: trials of a primary and a standby VMM running the `kv` guest,
replicating through a relay, with a file witness, while a client writes records; one fault a
trial, at a random moment, the faults taken in turn:

    primary-kill       the primary gets SIGKILL
    link-cut           the relay stops forwarding, closing nothing
    standby-kill       the standby gets SIGKILL
    standby-disk-full  the standby's disk file lives on a small tmpfs that fills up
    slow-link          the relay delays every byte by 5-400 ms from then on (log-uniform; the
                       standby's patience is 200 ms: a long round trip looks like a lost primary)

After the fault the client writes a few more records, then reads back every record it saw
acknowledged from whoever runs the guest, and looks for each in the disk file that VMM runs the
guest on. A trial fails if one of them is not served as written or not on that disk byte for
byte (lost), or if both VMMs still run the guest once the loser has had time to stand down
(two live copies: a live primary that has not fenced itself, and a standby that took over).
`--ft-disk shared` runs every trial with one disk file both VMMs open (no standby-disk-full then).
Prints a line a trial and one table; exits 1 if any record was lost or two copies ran, 2 if a
trial could not be run (set-up failed), else 0.

    python bench/ft_faults.py [--trials N | --per-fault N] [--seed S] [--ft-disk replicated|shared]
                              [--ft-mode sync|pipelined|cow]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Child, free_port  # noqa: E402
from pykvm.ft.protocol import SYNC_MODES  # noqa: E402
from pykvm.testing.kv import KvClient, records_on_disk  # noqa: E402
from pykvm.testing.netframes import FrameSocket  # noqa: E402
from pykvm.testing.relay import Relay  # noqa: E402

FAULTS = ("primary-kill", "link-cut", "standby-kill", "standby-disk-full", "slow-link")
TRIAL_SECONDS = 40  # a trial's budget, set-up to verdict
DISK_SIZE = 8 << 20
SMALL_TMPFS = 2 << 20  # where the standby's disk fills up
RECORDS_AFTER = 10  # records written once the fault has struck
STAND_DOWN = 10.0  # seconds the side that lost has to exit before two running copies count


@dataclass
class Trial:
    fault: str
    detail: str  # the fault's random parameters
    took_over: bool = False
    acked: int = 0
    lost: int = 0
    two_copies: bool = False
    service_ms: float | None = None  # from the fault (a full disk: the standby's exit) to the first
    #                                  acknowledgement of a put sent after it
    outcome: str = ""
    error: str = ""


class Side:
    """A VMM of the pair: a Child and what its exit and its stderr say about it."""

    def __init__(self, role: str, child: Child) -> None:
        self.role, self.child = role, child
        self.exited_at: float | None = None
        self.exited = threading.Event()
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        self.child.proc.wait()
        self.exited_at = time.monotonic()
        self.exited.set()

    def said(self, text: str) -> bool:
        with self.child.cond:
            return any(text in line for line in self.child.lines)

    @property
    def runs_the_guest(self) -> bool:
        """A live copy: alive, and (for a standby) taken over."""
        return self.child.proc.poll() is None and (self.role == "primary" or self.said("took over from sync"))

    def describe(self) -> str:
        status = self.child.proc.poll()
        if status is None:
            return f"{self.role} runs" if self.runs_the_guest else f"{self.role} follows"
        named = {-signal.SIGKILL: "killed", 75: "fenced (75)"}.get(status, f"exit {status}")
        return f"{self.role} {named}"


def run_trial(fault: str, rng: random.Random, root: Path, logs: Path | None = None,
              disk: str = "replicated", mode: str = "sync") -> Trial:
    """One trial in `root`: set up the pair, write, strike, write, verify. With `logs`, the
    VMMs' stderr is kept there (primary.log, standby.log). `disk`: the pair's --ft-disk."""
    deadline = time.monotonic() + TRIAL_SECONDS
    primary_disk, standby_disk = root / "p.img", root / ("p.img" if disk == "shared" else "s.img")
    _sparse(primary_disk)
    detail, mount = "", None
    if fault == "standby-disk-full":
        slack = rng.randrange(16, 160) << 10  # what the records may fill after the full sync
        filler = SMALL_TMPFS - slack
        with open(primary_disk, "r+b") as image:  # data the full sync must copy onto the small tmpfs
            image.seek(DISK_SIZE - filler)
            image.write(os.urandom(filler))
        mount = root / "small"
        mount.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_TMPFS}", "tmpfs", str(mount)], check=True)
        standby_disk = mount / "s.img"
        detail = f"{slack >> 10} KiB free"
    if disk != "shared":
        _sparse(standby_disk)
    link, witness, port = root / "link.sock", f"file:{root / 'witness'}", free_port()
    common = ["--mem", "64M", "--net", f"socket:{link}", "--ft-witness", witness, "--serial", "stdio"]
    relay = Relay(("127.0.0.1", port))
    sides: list[Side] = []
    try:
        standby = Side("standby", Child("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}",
                                        "--disk", str(standby_disk), *common))
        sides.append(standby)
        standby.child.wait_line("waiting for a primary")
        primary = Side("primary", Child("run", "kv", "--disk", str(primary_disk), *common, "--ft", relay.uri,
                                        "--ft-disk", disk, "--ft-mode", mode))
        sides.append(primary)
        primary.child.wait_line("protected by")
        with FrameSocket(root / "client.sock", link) as sock:
            client = KvClient(sock)
            trial = Trial(fault, detail)
            struck = _write_through_the_fault(client, fault, rng, relay, primary, standby, trial, deadline)
            if not struck:
                trial.error = "the fault never struck within the trial's time"
            trial.took_over = standby.said("took over from sync")
            on_disk = records_on_disk(standby_disk if trial.took_over else primary_disk)
            missing = {seq for seq, value in client.acked.items() if on_disk.get(seq) != value.encode()}
            trial.lost = len(missing | set(_unserved(client, deadline))) if struck else 0
            trial.acked = len(client.acked)
            trial.two_copies = _two_copies(primary, standby)
            trial.outcome = ", ".join(side.describe() for side in sides)
            return trial
    finally:
        for side in sides:
            side.child.stop()
            if logs is not None:
                logs.mkdir(parents=True, exist_ok=True)
                (logs / f"{side.role}.log").write_text("\n".join(side.child.lines) + "\n")
        relay.close()
        if mount is not None:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def _write_through_the_fault(client: KvClient, fault: str, rng: random.Random, relay: Relay, primary: Side,
                             standby: Side, trial: Trial, deadline: float) -> bool:
    """Put records; strike at a random one (the disk strikes on its own when full); then put
    RECORDS_AFTER more. Records `trial.service_ms`; returns whether the fault struck."""
    strike_at = rng.randrange(5, 30)
    struck_at: list[float] = []
    if fault == "slow-link":
        delay = 0.005 * 80 ** rng.random()  # 5 to 400 ms, as many below 45 ms as above
        trial.detail = f"{delay * 1000:.0f} ms"

    def strike() -> None:
        struck_at.append(time.monotonic())
        if fault == "primary-kill":
            primary.child.proc.send_signal(signal.SIGKILL)
        elif fault == "standby-kill":
            standby.child.proc.send_signal(signal.SIGKILL)
        elif fault == "link-cut":
            relay.cut()
        elif fault == "slow-link":
            relay.slow_down(delay)

    after = 0
    for seq in range(1, 100_000):
        sent = time.monotonic()
        if seq == strike_at and fault != "standby-disk-full":
            threading.Timer(rng.uniform(0, 0.03), strike).start()  # inside a put, its syncs, or between
        if fault == "standby-disk-full" and not struck_at and standby.exited_at is not None:
            struck_at.append(standby.exited_at)  # the moment the standby gave up
        if not client.put(seq, f"record-{seq}-{rng.getrandbits(32):08x}", patience=max(deadline - sent, 0.1)):
            return bool(struck_at)  # out of time: availability lost; what was acknowledged is checked
        if struck_at and sent > struck_at[0]:
            if trial.service_ms is None:
                trial.service_ms = (time.monotonic() - struck_at[0]) * 1000
            after += 1
            if after == RECORDS_AFTER:
                return True
    return bool(struck_at)


def _two_copies(primary: Side, standby: Side) -> bool:
    """Whether both run the guest once the primary, if the standby won, had STAND_DOWN to exit."""
    if standby.runs_the_guest:
        primary.exited.wait(STAND_DOWN)
    return primary.runs_the_guest and standby.runs_the_guest


def _unserved(client: KvClient, deadline: float) -> list[int]:
    """Acknowledged records not served as written (once nobody answers, the rest count too)."""
    unserved, silent = [], 0
    for seq, value in client.acked.items():
        reply = None if silent >= 3 else client.ask(f"get {seq}", max(deadline, time.monotonic() + 5))
        silent = silent + 1 if reply is None else 0
        if reply != f"val {seq} {value}".encode():
            unserved.append(seq)
    return unserved


def _sparse(path: Path) -> None:
    with open(path, "wb") as disk:
        disk.truncate(DISK_SIZE)


def table(trials: list[Trial]) -> list[str]:
    header = (f"{'fault':<18} {'trials':>6} {'takeovers':>9} {'acked':>7} {'lost':>5} {'two copies':>10} "
              f"{'fault to service ms (median, max)':>34}")
    rows = [header, "-" * len(header)]
    for fault in (*FAULTS, "all"):
        group = [t for t in trials if fault in ("all", t.fault)]
        if not group:
            continue
        times = [t.service_ms for t in group if t.service_ms is not None]
        service = f"{statistics.median(times):.0f}, {max(times):.0f}" if times else "-"
        rows.append(f"{fault:<18} {len(group):>6} {sum(t.took_over for t in group):>9} "
                    f"{sum(t.acked for t in group):>7} {sum(t.lost for t in group):>5} "
                    f"{sum(t.two_copies for t in group):>10} {service:>34}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description="Randomized FT fault campaign (kv guest, file witness).")
    parser.add_argument("--trials", type=int, default=200, help="trials, the faults taken in turn (default 200)")
    parser.add_argument("--per-fault", type=int, metavar="N", help="N trials of each fault (instead of --trials)")
    parser.add_argument("--seed", type=int, default=None, help="for the random moments and parameters")
    parser.add_argument("--fault", action="append", choices=FAULTS, help="only this fault (repeatable)")
    parser.add_argument("--ft-mode", choices=SYNC_MODES, default="sync", help="the primary's sync mode (default sync)")
    parser.add_argument("--logs", type=Path, help="keep each trial's VMM stderr in this folder")
    parser.add_argument("--ft-disk", choices=("replicated", "shared"), default="replicated",
                        help="the pair's disk mode (shared: one file, and no standby-disk-full trials)")
    args = parser.parse_args()
    faults = [fault for fault in args.fault or FAULTS if args.ft_disk != "shared" or fault != "standby-disk-full"]
    count = args.per_fault * len(faults) if args.per_fault else args.trials
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    print(f"ft fault campaign: {count} trials, seed {seed}, {args.ft_disk} disks", flush=True)
    trials = []
    started = time.monotonic()
    for index in range(count):
        fault = faults[index % len(faults)]
        with tempfile.TemporaryDirectory(prefix="pykvm-ft-faults-") as tmp:
            try:
                trial = run_trial(fault, rng, Path(tmp), args.logs and args.logs / f"trial-{index + 1}", args.ft_disk,
                                  args.ft_mode)
            except (Exception, SystemExit) as error:  # a trial that could not run says why; the campaign goes on
                trial = Trial(fault, "", error=f"{type(error).__name__}: {error}".splitlines()[0])
        trials.append(trial)
        service = f"{trial.service_ms:.0f} ms" if trial.service_ms is not None else "-"
        verdict = ("ERROR " + trial.error if trial.error else
                   "LOST RECORDS" if trial.lost else "TWO COPIES" if trial.two_copies else "ok")
        what = f"{fault} ({trial.detail})" if trial.detail else fault
        print(f"trial {index + 1}/{count} {what}: {trial.outcome}; {trial.acked} acked, "
              f"{trial.lost} lost; service {service} after the fault: {verdict}", flush=True)
    print(f"\n{count} trials in {(time.monotonic() - started) / 60:.1f} min (seed {seed})")
    print("\n".join(table(trials)))
    if any(t.lost or t.two_copies for t in trials):
        return 1
    return 2 if any(t.error for t in trials) else 0


if __name__ == "__main__":
    sys.exit(main())
