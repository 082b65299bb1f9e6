"""Fault-tolerance benchmarks.

1. Sync cost for 80 and 3000 random dirty pages of random contents (pause, transfer, ack) between
   this process's primary and a standby VMM process over loopback, the vCPU running (halted in
   KVM_RUN). `sync3000_ratio`: the whole 3000-page sync (request to pause -> vCPUs released,
   outputs released, the standby's commit and ack included) / the bare transfer of the same
   scattered pages by a pair of processes (sendmsg of the runs / recvmsg_into), alternating with
   the syncs in the same run (goal <= 1.5). (The Kemari prototype needed ~150 ms for 3000 pages.)
   The 3000-page sync again over mutual TLS, and `tls_ratio`: TLS pause / plaintext pause (goal <= 2).
2. Output latency added by FT: kv puts (a disk write, a flush and a reply frame each) with FT
   on and off, and the per-output sync delays from the primary's metrics.
3. Takeover: SIGKILL of the primary -> the guest answering on the standby.
4. Overhead: the `dirty` guest's rate and kv requests per second with FT on vs off.

    python bench/ft.py
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.state import loopback_limit  # noqa: E402
from pykvm.ft import Primary  # noqa: E402
from pykvm.machine import Machine, MachineConfig  # noqa: E402
from pykvm.memory import PAGE_SIZE  # noqa: E402
from pykvm.testing.netframes import FrameSocket, Peer  # noqa: E402
from pykvm.transfer.tls import TlsCredentials, make_credentials  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Child:
    """A pykvm process; stderr lines kept so we can wait for one."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
        self.out = bytearray()
        threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True).start()

    def _read(self, stream, is_err: bool) -> None:
        for raw in stream:
            with self.cond:
                if is_err:
                    self.lines.append(raw.decode(errors="replace").rstrip())
                else:
                    self.out += raw
                self.cond.notify_all()

    def wait_line(self, text: str, timeout: float = 30) -> str:
        with self.cond:
            if not self.cond.wait_for(lambda: any(text in line for line in self.lines), timeout):
                raise SystemExit(f"never saw {text!r}: {self.lines}")
            return next(line for line in self.lines if text in line)

    def wait_out(self, text: bytes, count: int = 1, timeout: float = 30) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.out.count(text) >= count, timeout):
                raise SystemExit(f"never printed {text!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


IDLE_GUEST = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back: a vCPU halted in KVM_RUN, kicked out by each pause
BARE_RECEIVER = """
import socket, sys
import numpy as np
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
size = int(sys.argv[1])
into = memoryview(np.ones(size, dtype=np.uint8)).cast("B")  # faulted in once, as the standby's staging
while True:
    got = 0
    while got < size:
        count = conn.recvmsg_into([into[got:]])[0]
        if count == 0:
            sys.exit(0)
        got += count
    conn.sendall(b"k")
"""


class BareTransfer:
    """The wire's limit for scattered pages: another process receiving with recvmsg_into, this
    one sending the page runs with sendmsg (1024 a call), nothing else; timed from the first
    sendmsg to the receiver's one-byte word that every byte has arrived."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.proc = subprocess.Popen([sys.executable, "-c", BARE_RECEIVER, str(size)], stdout=subprocess.PIPE)
        self.sock = socket.create_connection(("127.0.0.1", int(self.proc.stdout.readline())))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, views: list[memoryview]) -> float:
        assert sum(len(view) for view in views) == self.size
        started = time.perf_counter()
        for first in range(0, len(views), 1024):
            batch = views[first : first + 1024]
            sent = self.sock.sendmsg(batch)
            assert sent == sum(len(view) for view in batch)  # a blocking socket sends it all
        self.sock.recv(1)
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self.sock.close()
        self.proc.wait()


def sync_cost(pages: int, repeats: int = 40, tls: Path | None = None, bare: bool = False) -> dict:
    """The median sync record (pause, transfer, ack; ms) for `pages` random dirty pages of random
    contents, between this process's primary and a standby VMM process, with the guest's vCPU
    running (halted in KVM_RUN); with `tls` (a credentials directory), over mutual TLS. With
    `bare`, each sync alternates with the bare transfer of the same pages (`bare_ms`; `ratio`: the
    median over the pairs of sync / bare)."""
    port = free_port()
    secure = ("--tls-creds", str(tls)) if tls else ()
    standby = Child("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--mem", "1024M", "--serial", "none",
                    "--ft-timeout", "60000", *secure)  # we drive the syncs: no heartbeats between them
    standby.wait_line("waiting for a primary")
    pair = BareTransfer(pages * PAGE_SIZE) if bare else None
    bare_ms = []
    with tempfile.NamedTemporaryFile("w+") as metrics_file:
        with Machine(MachineConfig(memory=1 << 30), serial_output=lambda data: None) as machine:
            machine.load(IDLE_GUEST, load_addr=0x100000)
            machine.vm.start()
            primary = Primary(machine, metrics=metrics_file, log=lambda line: None,
                              tls=TlsCredentials.load(tls) if tls else None)
            primary.protect(f"tcp:127.0.0.1:{port}")
            with primary._cond:
                primary._stopping = True  # we drive the syncs; the FT thread stays out of the way
                primary._cond.notify_all()
            primary._thread.join()
            memory = machine.vm.memory
            slot = memory.slots[0]
            ram = np.frombuffer(slot.view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
            rng = np.random.default_rng(pages)
            contents = rng.integers(0, 256, (2 * pages, PAGE_SIZE), dtype=np.uint8)
            for repeat in range(repeats):
                numbers = np.sort(rng.choice(np.arange(1024, len(ram)), pages, replace=False))
                with machine.quiesced("bench"):  # the pages' new contents, as the guest would write them
                    ram[numbers] = contents[(start := int(rng.integers(pages))) : start + pages]
                    for number in numbers.tolist():
                        memory.mark(slot, number * PAGE_SIZE, PAGE_SIZE)
                if pair is not None and repeat % 2:
                    bare_ms.append(pair.send([slot.view[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in numbers.tolist()]))
                primary._sync("bench")
                if pair is not None and not repeat % 2:
                    bare_ms.append(pair.send([slot.view[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in numbers.tolist()]))
            primary.close()
            machine.vm.stop(0, "bench done")
        metrics_file.seek(0)
        rows = [json.loads(line) for line in metrics_file if '"bench"' in line]
    standby.stop()
    if pair is not None:
        pair.close()
    result = {key: statistics.median(r[key] for r in rows) for key in ("pages", "pause_ms", "transfer_ms", "ack_ms")}
    if bare_ms:  # each sync against the bare transfer next to it: both saw the same load on the host
        result["bare_ms"] = statistics.median(bare_ms)
        result["ratio"] = statistics.median(r["pause_ms"] / bare for r, bare in zip(rows, bare_ms))
    return result


def kv_run(tmp: Path, puts: int, ft: bool) -> dict:
    """Puts/s and put latency for the kv guest, with or without a standby."""
    for name in ("p.img", "s.img"):
        with open(tmp / name, "wb") as disk:
            disk.truncate(4 << 20)
    link = tmp / "link.sock"
    children = []
    args = ["run", "kv", "--disk", str(tmp / "p.img"), "--net", f"socket:{link}"]
    metrics = tmp / "metrics.jsonl"
    if metrics.exists():
        metrics.unlink()
    if ft:
        port = free_port()
        standby = Child("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(tmp / "s.img"),
                        "--net", f"socket:{link}", "--serial", "none")
        children.append(standby)
        standby.wait_line("waiting for a primary")
        args += ["--ft", f"tcp:127.0.0.1:{port}", "--metrics", str(metrics)]
    primary = Child(*args)
    children.append(primary)
    try:
        primary.wait_out(b"kv: ready")
        with FrameSocket(tmp / "client.sock", link) as sock:
            peer = Peer(sock, timeout=5)
            peer.resolve()
            latencies = []
            started = time.perf_counter()
            for seq in range(1, puts + 1):
                t0 = time.perf_counter()
                assert peer.udp(9000, f"put {seq} value-{seq}".encode()) == f"ok {seq}".encode()
                latencies.append(time.perf_counter() - t0)
            elapsed = time.perf_counter() - started
            result = {"puts_per_s": puts / elapsed, "put_ms": statistics.median(latencies) * 1000}
            if ft:
                rows = [json.loads(line) for line in metrics.read_text().splitlines()]
                for trigger in ("blk", "net"):
                    delays = [r["output_delay_ms"] for r in rows if r["trigger"] == trigger]
                    result[f"{trigger}_delay_ms"] = statistics.median(delays) if delays else 0.0
                # takeover: SIGKILL the primary, time until the guest answers from the standby
                killed = time.perf_counter()
                primary.proc.send_signal(signal.SIGKILL)
                peer.guest_mac = None
                peer.timeout = 0.02
                while True:
                    try:
                        peer.resolve()
                        break
                    except TimeoutError:
                        continue
                    except (ConnectionRefusedError, FileNotFoundError):
                        time.sleep(0.001)  # nobody holds the link's socket yet: the standby is taking over
                result["takeover_client_ms"] = (time.perf_counter() - killed) * 1000
                line = children[0].wait_line("took over")
                result["takeover_standby_ms"] = float(re.search(r"in ([\d.]+) ms", line).group(1))
            return result
    finally:
        for child in children:
            child.stop()


def dirty_rate(ft: bool) -> float:
    """Median pages/s the `dirty` guest reports over a few seconds."""
    args = ["run", "dirty", "--append", "pages=4096"]
    children = []
    if ft:
        port = free_port()
        standby = Child("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--serial", "none")
        children.append(standby)
        standby.wait_line("waiting for a primary")
        args += ["--ft", f"tcp:127.0.0.1:{port}"]
    child = Child(*args)
    children.append(child)
    try:
        child.wait_out(b"pages/s", count=5, timeout=60)
        rates = [int(r) for r in re.findall(rb"dirty: (\d+) pages/s", bytes(child.out))[1:]]
        return statistics.median(rates)
    finally:
        for c in children:
            c.stop()


def main() -> None:
    limit = loopback_limit()
    print(f"loopback TCP limit (one Python sender/receiver pair): {limit / 1e6:.0f} MB/s")
    with tempfile.TemporaryDirectory() as creds:
        make_credentials(creds)
        rows = {}
        for pages, tls in ((80, None), (3000, None), (3000, Path(creds))):
            rows[pages, bool(tls)] = row = sync_cost(pages, tls=tls, bare=pages == 3000 and not tls)
            data_ms = pages * PAGE_SIZE / limit * 1000
            print(f"sync of {pages:4} random dirty pages{' over TLS' if tls else ''}: guest pause {row['pause_ms']:6.2f} "
                  f"ms = transfer {row['transfer_ms']:5.2f} + ack {row['ack_ms']:5.2f} + release/resume; the data "
                  f"alone at the loopback limit: {data_ms:5.2f} ms")
    plain = rows[3000, False]
    print(f"bare transfer of the same 3000 scattered pages (sendmsg of the runs / recvmsg_into, process to "
          f"process): {plain['bare_ms']:.2f} ms")
    print(f"sync3000_ratio: {plain['ratio']:.2f}  (the whole 3000-page sync, from the request to pause the vCPUs "
          "to their release with the outputs, standby's commit and ack included / the bare transfer next to it, "
          "same run, median of the pairs; goal <= 1.5)")
    print(f"tls_ratio: {rows[3000, True]['pause_ms'] / plain['pause_ms']:.2f}  (the 3000-page sync's "
          "guest pause over TLS / in the clear, same pages, same run; goal <= 2.0)")
    with tempfile.TemporaryDirectory() as tmp:
        off = kv_run(Path(tmp), 200, ft=False)
        on = kv_run(Path(tmp), 200, ft=True)
    print(f"kv puts: {off['puts_per_s']:.0f}/s without FT, {on['puts_per_s']:.0f}/s with FT "
          f"(ratio {on['puts_per_s'] / off['puts_per_s']:.2f}); put latency {off['put_ms']:.2f} -> {on['put_ms']:.2f} ms")
    print(f"output delay added by FT (median): disk output {on['blk_delay_ms']:.2f} ms, "
          f"network frame {on['net_delay_ms']:.2f} ms")
    print(f"takeover: SIGKILL -> guest answering on the standby {on['takeover_client_ms']:.1f} ms "
          f"(standby's own figure, detection -> vCPUs running: {on['takeover_standby_ms']:.1f} ms; goal <= 200 ms)")
    rate_off, rate_on = dirty_rate(False), dirty_rate(True)
    print(f"dirty guest: {rate_off / 1e6:.1f} M pages/s without FT, {rate_on / 1e6:.1f} M pages/s with FT "
          f"(ratio {rate_on / rate_off:.2f}; no output, so no syncs: the cost of dirty logging)")


if __name__ == "__main__":
    main()
