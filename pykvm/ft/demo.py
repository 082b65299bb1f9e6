"""`pykvm demo`: fault tolerance, end to end, on this machine.

A standby and a primary VMM (two processes) run the `kv` guest — a UDP key-value server that
acknowledges a record only once it is on its virtio disk and flushed. A client writes records;
at a random moment the primary is killed with SIGKILL. The standby notices, takes over from the
last acknowledged sync, and the client, retrying as UDP clients do, carries on against it. At
the end every record the client saw acknowledged is read back. The demo passes (exit 0) only if
all of them are served. The pair speaks mutual TLS, with credentials made for the occasion.

The two VMMs share a link of Unix datagrams (one Ethernet frame each), so no root network setup
is needed beyond /dev/kvm: the primary binds the link's socket, the standby binds it again when
it takes over, and the client's frames reach whichever VMM holds it.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pykvm import guestbuild
from pykvm.ft.choices import MAX_RECORDS, MIN_RECORDS
from pykvm.stats import summary
from pykvm.testing.netframes import FrameSocket, Peer
from pykvm.transfer.tls import make_credentials

DISK_SIZE = 4 << 20
REQUEST_TIMEOUT = 0.1  # a client's patience before it resends


@dataclass
class DemoResult:
    records: int = 0
    verified: int = 0
    lost: list[int] = field(default_factory=list)
    killed_after: int = 0
    takeover_ms: float = 0.0
    client_gap_ms: float = 0.0
    syncs: list[dict] = field(default_factory=list)
    standby_disk: Path | None = None  # the disk file the standby ran the guest on
    acked: dict[int, str] = field(default_factory=dict)  # the records the client saw acknowledged


class _Vmm:
    """A pykvm child whose stderr lines we keep and can wait for."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", *args], stdin=subprocess.DEVNULL,
                                     stdout=open(log, "wb"), stderr=subprocess.PIPE)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for raw in self.proc.stderr:
            with self._cond:
                self.lines.append(raw.decode(errors="replace").rstrip())
                self._cond.notify_all()

    def log(self) -> str:
        """What the VMM said on stderr so far (for a report when something goes wrong)."""
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60) -> str:
        with self._cond:
            found = self._cond.wait_for(lambda: any(text in line for line in self.lines) or self.proc.poll() is not None,
                                        timeout)
            match = next((line for line in self.lines if text in line), None)
        if not found or match is None:
            raise RuntimeError(f"{' '.join(self.proc.args[2:4])}: never said {text!r}:\n" + "\n".join(self.lines))
        return match

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _request(peer: Peer, text: str, deadline: float) -> bytes:
    """Send a kv request until its reply comes (retries, as any UDP client must). A reply names
    the request's sequence number; a late answer to an earlier try of an earlier request is
    not this one's (kv replies `ok SEQ`, `val SEQ ...`, `none SEQ`)."""
    seq = text.split()[1].encode()
    while time.monotonic() < deadline:
        try:
            if peer.guest_mac is None:
                peer.resolve()
            reply = peer.udp(9000, text.encode(), timeout=REQUEST_TIMEOUT)
            if reply.split()[1:2] == [seq]:
                return reply
        except TimeoutError:
            peer.guest_mac = None  # after a takeover, resolve again
        except (ConnectionRefusedError, FileNotFoundError):
            # the primary is gone and the standby has not bound the link yet: as with a cable
            # being replugged, wait a moment (bounded by the deadline) and send again
            peer.guest_mac = None
            time.sleep(REQUEST_TIMEOUT / 10)
    raise TimeoutError(f"no answer to {text!r}")


def run_demo(records: int = 200, seed: int | None = None, workdir: Path | None = None,
             say=print, mode: str = "sync", disk: str = "replicated") -> DemoResult:
    """`disk`: "replicated" (the standby has standby.img of its own) or "shared" (both open
    primary.img)."""
    rng = random.Random(seed)
    image = guestbuild.image_path("kv")
    with tempfile.TemporaryDirectory(prefix="pykvm-demo-") as tmp:
        root = Path(workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        for name in ("primary.img", "standby.img"):
            with open(root / name, "wb") as image_file:
                image_file.truncate(DISK_SIZE)
        link = root / "link.sock"
        uri = f"tcp:127.0.0.1:{_free_port()}"
        make_credentials(root / "tls", force=True)  # the pair speaks mutual TLS, as it should beyond loopback
        # A file witness here: a cut link would leave one copy of the guest running, not two
        common = ["--mem", "64M", "--net", f"socket:{link}", "--ft-witness", f"file:{root / 'witness'}",
                  "--tls-creds", str(root / "tls")]
        standby_disk = root / ("primary.img" if disk == "shared" else "standby.img")
        standby = _Vmm(["ft", "standby", "--listen", uri, "--disk", str(standby_disk), *common,
                        "--serial", f"file:{root / 'standby-serial.log'}"], root / "standby.out")
        primary = None
        try:
            standby.wait_for("waiting for a primary")
            # idle=halt: the guest halts while it waits for a put instead of spinning, as an
            # operating system idles (and the kills then also find its vCPU halted in the kernel)
            primary = _Vmm(["run", str(image), "--append", "idle=halt", "--disk", str(root / "primary.img"), *common,
                            "--ft", uri, "--ft-mode", mode, "--ft-disk", disk, "--metrics", str(root / "metrics.jsonl"),
                            "--serial", "stdio"], root / "primary.out")
            primary.wait_for("protected by")
            say(f"demo: primary (pid {primary.proc.pid}) protected by a standby (pid {standby.proc.pid}) on {uri}")
            result = _drive(primary, standby, records, rng, root, say)
            result.standby_disk = standby_disk
        finally:
            if primary is not None:
                primary.stop()
            standby.stop()
        metrics = root / "metrics.jsonl"
        result.syncs = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.exists() else []
        return result


def _drive(primary: _Vmm, standby: _Vmm, records: int, rng: random.Random, root: Path, say) -> DemoResult:
    result = DemoResult(records=records)
    kill_at = rng.randint(max(1, records // 4), max(1, 3 * records // 4))  # always one of 1..records
    kill_delay = rng.uniform(0, 0.02)  # somewhere inside a put, a sync, or between
    acked = result.acked
    last_ack = time.monotonic()
    with FrameSocket(root / "client.sock", root / "link.sock") as link:
        peer = Peer(link, timeout=REQUEST_TIMEOUT)
        for seq in range(1, records + 1):
            value = f"record-{seq}-{rng.getrandbits(32):08x}"
            if seq == kill_at:
                threading.Timer(kill_delay, primary.proc.send_signal, (signal.SIGKILL,)).start()
                result.killed_after = len(acked)
            try:
                reply = _request(peer, f"put {seq} {value}", time.monotonic() + 30)
            except TimeoutError as error:
                raise TimeoutError(f"{error}\nprimary said:\n{primary.log()}\nstandby said:\n{standby.log()}") from None
            if reply != f"ok {seq}".encode():
                raise RuntimeError(f"put {seq}: unexpected reply {reply!r}")
            acked[seq] = value
            now = time.monotonic()
            result.client_gap_ms = max(result.client_gap_ms, (now - last_ack) * 1000)  # the longest wait seen
            last_ack = now
        say(f"demo: {len(acked)} records acknowledged; primary killed (SIGKILL) after {result.killed_after}")
        line = standby.wait_for("took over")
        result.takeover_ms = float(line.split(" in ")[1].split(" ms")[0])
        for seq, value in acked.items():
            reply = _request(peer, f"get {seq}", time.monotonic() + 30)
            if reply == f"val {seq} {value}".encode():
                result.verified += 1
            else:
                result.lost.append(seq)
    return result


def _summary_line(values: list[float]) -> str:
    return "  ".join(f"{name} {value:.2f}" for name, value in summary(values).items()) or "-"


def main(records: int = 200, seed: int | None = None, mode: str = "sync", disk: str = "replicated") -> int:
    if not MIN_RECORDS <= records <= MAX_RECORDS:
        raise ValueError(f"records: {records} is not {MIN_RECORDS} to {MAX_RECORDS}")
    print("demo: building the kv guest", flush=True)
    try:
        result = run_demo(records, seed, say=lambda line: print(line, flush=True), mode=mode, disk=disk)
    except (RuntimeError, TimeoutError, OSError) as error:  # its VMMs are stopped and its folder removed
        print(f"demo: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    syncs = result.syncs
    outputs = [s for s in syncs if s["trigger"] in ("blk", "net")]
    print()
    print("pykvm FT demo summary")
    print(f"  syncs                 {len(syncs)} ({sum(s['trigger'] == 'blk' for s in syncs)} at disk output, "
          f"{sum(s['trigger'] == 'net' for s in syncs)} at network output)")
    print(f"  pages per sync        {_summary_line([s['pages'] for s in outputs])}  (mean {statistics.fmean([s['pages'] for s in outputs] or [0]):.1f})")
    print(f"  guest pause (ms)      {_summary_line([s['pause_ms'] for s in outputs])}")
    print(f"  output delay (ms)     {_summary_line([s['output_delay_ms'] for s in outputs])}")
    print(f"  takeover (ms)         {result.takeover_ms:.1f} from detection to running vCPUs on the standby")
    print(f"  client-seen gap (ms)  {result.client_gap_ms:.0f}: the longest wait for an acknowledgement")
    print(f"  records verified      {result.verified} of {result.records} acknowledged"
          f" (primary killed after {result.killed_after})")
    if result.lost:
        print(f"  LOST                  {result.lost}")
        return 1
    print("  every acknowledged record is served by the standby: OK")
    return 0
