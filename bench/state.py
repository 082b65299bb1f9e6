"""Machine state benchmarks: snapshot and restore time for a 64 MiB and a 1 GiB guest, live
migration downtime and throughput against the loopback TCP limit measured in the same run, and
the time to gather dirty pages from a bitmap.

`snapshot_save_ratio`: the 1 GiB snapshot's save time over the time to write 1 GiB of data to a
file on the same file system and fsync it (as `dd bs=1M count=1024 conv=fsync` does), measured
right before it; the median of --repeats pairs. `migration_ratio`: the 1 GiB migration's bulk
round (round 0: every populated page, the guest running) in bytes/s over the loopback limit
measured right before it; the median of --repeats pairs. That limit moves one cache-hot 4 MiB
buffer again and again; a migration reads and writes memory no cache holds, so the bench also
measures a pair moving distinct memory, and the bulk round against that.

    python bench/state.py [--skip-migration]
"""

from __future__ import annotations

import argparse
import json
import os
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

from pykvm import guestbuild  # noqa: E402
from pykvm.transfer import snapshot  # noqa: E402
from pykvm.machine import Machine, MachineConfig  # noqa: E402
from pykvm.memory import PAGE_SIZE, dirty_pages, page_runs  # noqa: E402

MIB = 1 << 20
COLD_BYTES = 512 * MIB  # more than any cache: the distinct-memory limit's transfer, each side


class Lines:
    """Collects serial output; wait() blocks until a marker shows up."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self.cond:
            self.data += chunk
            self.cond.notify_all()

    def wait(self, marker: bytes, count: int = 1, timeout: float = 30) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.data.count(marker) >= count, timeout):
                raise SystemExit(f"guest never printed {marker!r}")


def snapshot_restore(size: int, workdir: Path) -> tuple[float, float, float]:
    """(snapshot s, restore s, restore-to-guest-output s) for a guest of `size` bytes whose RAM is
    filled with data (so nothing is a hole)."""
    out = Lines()
    path = workdir / f"bench-{size >> 20}.snap"
    with Machine(MachineConfig(memory=size), serial_output=out) as machine:
        machine.load(guestbuild.image_path("dirty"), cmdline="pages=256")
        ram = np.frombuffer(machine.vm.memory.slots[0].view, dtype=np.uint8)
        ram[64 * MIB :] = 0xA5  # above the guest's working set: real data, not holes
        machine.vm.start()
        out.wait(b"pages/s")
        started = time.perf_counter()
        with machine.quiesced():
            snapshot.save(machine, path)
        saved = time.perf_counter() - started
        machine.vm.stop(0, "done")
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # restore from disk, not the page cache
    os.close(fd)
    out2 = Lines()
    started = time.perf_counter()
    snap = snapshot.open_snapshot(path)
    machine = snap.machine(serial_output=out2)
    restored = time.perf_counter() - started
    machine.vm.start()
    out2.wait(b"\n")
    first_output = time.perf_counter() - started
    machine.vm.stop(0, "done")
    machine.close()
    snap.close()
    path.unlink()
    return saved, restored, first_output


def plain_write(workdir: Path, size: int = 1 << 30) -> float:
    """Seconds to write `size` bytes of data in 1 MiB writes to a new file in `workdir` and fsync it."""
    path = workdir / "plain-write"
    chunk = memoryview(bytes([0xA5]) * MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        started = time.perf_counter()
        for offset in range(0, size, MIB):
            os.pwrite(fd, chunk, offset)
        os.fsync(fd)
        elapsed = time.perf_counter() - started
    finally:
        os.close(fd)
        path.unlink()
    return elapsed


def loopback_limit(total: int = 1 << 30, *, distinct: bool = False) -> float:
    """Bytes/s that one sendmsg/recvmsg_into pair moves over loopback TCP here, now: from one 4 MiB
    buffer into another, over and over (both stay in the cache), or with `distinct`, `total`
    bytes from memory of their own into memory of their own (faulted in first), as a migration
    reads guest RAM and writes the target's, neither of them in the cache."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    size = total if distinct else 4 * MIB
    source = memoryview(np.ones(size, dtype=np.uint8)).cast("B")
    sink = memoryview(np.ones(size, dtype=np.uint8)).cast("B")  # both faulted in before the clock starts
    received = [0]

    def receive() -> None:
        conn, _ = server.accept()
        with conn:
            while received[0] < total:
                at = received[0] % size
                n = conn.recv_into(sink[at : at + 4 * MIB])
                if not n:
                    return
                received[0] += n

    thread = threading.Thread(target=receive)
    thread.start()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        started = time.perf_counter()
        sent = 0
        while sent < total:
            at = sent % size
            sent += sock.send(source[at : at + 4 * MIB])
        thread.join()
        elapsed = time.perf_counter() - started
    server.close()
    return total / elapsed


def migration(memory: str, working_set: int) -> dict:
    """Migrate a running `dirty` guest that keeps rewriting `working_set` pages, between two
    pykvm processes."""
    with tempfile.TemporaryDirectory() as tmp:
        ctl = f"{tmp}/ctl.sock"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        uri = f"tcp:127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        common = ["--mem", memory, "--serial", "none"]
        target = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "dirty", *common, "--incoming", uri],
                                  stderr=subprocess.PIPE, env=env)
        target.stderr.readline()  # "waiting for a migration"
        pages = working_set
        source = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "dirty", *common, "--control", ctl,
                                   "--append", f"pages={pages}"], stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 30
        while not os.path.exists(ctl):  # the socket appears once the machine is built
            if time.monotonic() > deadline:
                raise SystemExit("source VMM did not start")
            time.sleep(0.01)
        time.sleep(1.0)  # let the guest touch its pages (a benchmark's warm-up, not synchronization)
        result = subprocess.run([sys.executable, "-m", "pykvm", "ctl", ctl, "migrate", uri],
                                capture_output=True, text=True, env=env)
        source.wait(30)
        target.kill()
        target.wait()
        reply = json.loads(result.stdout)
        if not reply.get("ok"):
            raise SystemExit(f"migration failed: {reply}")
        return reply


def gather(pages_dirty: int, ram_pages: int = (1 << 30) // PAGE_SIZE, repeats: int = 50) -> float:
    """Median seconds to turn a 1 GiB dirty bitmap with `pages_dirty` set bits into page numbers
    and page-frame buffers ready for sendmsg."""
    rng = np.random.default_rng(pages_dirty)
    bitmap = np.zeros(ram_pages // 64, dtype=np.uint64)
    for page in rng.choice(ram_pages, pages_dirty, replace=False):
        bitmap[page >> 6] |= np.uint64(1 << (int(page) & 63))
    ram = memoryview(bytearray(PAGE_SIZE * 8))  # views are cut, never read: a small stand-in
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        pages = dirty_pages(bitmap)
        page_runs(pages)
        times.append(time.perf_counter() - started)
    assert len(pages) == pages_dirty
    del ram
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-migration", action="store_true")
    parser.add_argument("--skip-snapshot", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of baseline and measurement (default 3)")
    args = parser.parse_args()
    if not args.skip_snapshot:
        with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
            save_ratios = []
            for repeat in range(args.repeats):
                for size in (64 * MIB, 1024 * MIB) if repeat == 0 else (1024 * MIB,):
                    if size == 1024 * MIB:
                        plain = plain_write(Path(tmp))
                    saved, restored, first = snapshot_restore(size, Path(tmp))
                    line = (f"snapshot {size >> 20:5} MiB: save {saved * 1000:7.1f} ms, restore {restored * 1000:6.1f} ms "
                            f"(goal <= 50 ms), restore to first guest output {first * 1000:6.1f} ms")
                    if size == 1024 * MIB:
                        save_ratios.append(saved / plain)
                        line += f"; writing 1 GiB + fsync {plain * 1000:7.1f} ms: {saved / plain:.2f}x"
                    print(line, flush=True)
            print(f"snapshot_save_ratio: {statistics.median(save_ratios):.2f}  (goal <= 1.5; median of "
                  f"{', '.join(f'{r:.2f}' for r in save_ratios)})", flush=True)
    if not args.skip_migration:
        bulk_ratios, against_cold = [], []
        for repeat in range(args.repeats):
            limit, cold = loopback_limit(), loopback_limit(COLD_BYTES, distinct=True)
            print(f"loopback TCP limit (one Python sender/receiver pair): {limit / 1e6:7.0f} MB/s; from and into "
                  f"{COLD_BYTES >> 20} MiB of distinct memory each, as a migration moves pages: {cold / 1e6:7.0f} MB/s")
            for memory, working_set in (("1024M", 200_000), ("256M", 256)) if repeat == 0 else (("1024M", 200_000),):
                reply = migration(memory, working_set)
                rate = reply["round0_mb_per_s"] * 1e6
                if memory == "1024M":
                    bulk_ratios.append(rate / limit)
                    against_cold.append(rate / cold)
                print(f"migration {memory:>5}, guest rewriting {working_set} pages: {reply['pages']} pages in "
                      f"{reply['rounds']} rounds, {reply['seconds']:.2f} s; bulk round {reply['round0_mb_per_s']:.0f} MB/s"
                      f" = {rate / limit:.2f} of loopback (goal >= 0.80), {rate / cold:.2f} of the distinct-memory"
                      f" limit; downtime {reply['downtime_ms']:.1f} ms ({reply['final_pages']} pages sent stopped)",
                      flush=True)
        print(f"migration_ratio: {statistics.median(bulk_ratios):.2f}  (goal >= 0.8; median of "
              f"{', '.join(f'{r:.2f}' for r in bulk_ratios)})", flush=True)
        print(f"bulk round against the distinct-memory limit: {statistics.median(against_cold):.2f}  (median of "
              f"{', '.join(f'{r:.2f}' for r in against_cold)})", flush=True)
    for count in (80, 3000, 30000):
        print(f"dirty-page gather, 1 GiB bitmap, {count:5} pages: {gather(count) * 1e3:6.3f} ms")


if __name__ == "__main__":
    main()
