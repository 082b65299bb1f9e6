"""The guest pause of an FT sync, measured in this process (its primary; the standby is a pykvm
process over loopback) against a baseline of the same run. bench/ft.py runs these.

Sync cost for 80 and 3000 random dirty pages of random contents (pause, transfer, ack), the vCPU
running (halted in KVM_RUN). `sync3000_ratio`: the whole 3000-page sync (request to pause ->
vCPUs running again, outputs released, the standby's commit and ack included) / the bare transfer of
the same scattered pages by a pair of processes (sendmsg of the runs / recvmsg_into), alternating
with the syncs in the same run (goal <= 1.5). `sync3000_floor`: the same pair with the two digests
that refusing a damaged stream takes (and nothing else a sync does) / the bare pair: the part of
the ratio that is the integrity check alone. (The Kemari prototype needed ~150 ms for 3000
pages.) The 3000-page sync again over mutual TLS, and `tls_ratio`: TLS pause / plaintext pause
(goal <= 2). Cow mode (--ft-mode cow): the guest pause of a 3000-page sync while the guest
writes, and `cow_pause_ratio`: it over an empty pause and resume of the same running vCPUs
(goal <= 5).
"""

from __future__ import annotations

import json
import mmap
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xxhash

from bench.harness import Child, free_port
from bench.state import loopback_limit
from pykvm import guestbuild
from pykvm.ft import Primary
from pykvm.machine import Machine, MachineConfig
from pykvm.memory import PAGE_SIZE
from pykvm.transfer.tls import TlsCredentials, make_credentials

IDLE_GUEST = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back: a vCPU halted in KVM_RUN, kicked out by each pause
BARE_RECEIVER = """
import socket, sys
import numpy as np
import xxhash
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
size, check = int(sys.argv[1]), sys.argv[2] == "digest"
into = memoryview(np.ones(size, dtype=np.uint8)).cast("B")  # faulted in once, as the standby's staging
digest = xxhash.xxh3_64()
while True:
    got = 0
    while got < size:
        count = conn.recvmsg_into([into[got:]])[0]
        if count == 0:
            sys.exit(0)
        if check:  # as the standby: hashed as it lands, still in cache
            digest.update(into[got : got + count])
        got += count
    if check:
        intact = conn.recv(8, socket.MSG_WAITALL) == digest.digest()
        digest.reset()
        conn.sendall(b"k" if intact else b"x")
    else:
        conn.sendall(b"k")
"""


class BareTransfer:
    """The wire's limit for scattered pages: another process receiving with recvmsg_into, this
    one sending the page runs with sendmsg (1024 a call), nothing else; timed from the first
    sendmsg to the receiver's one-byte word that every byte has arrived.

    With `digests`, the same pair also does what refusing a damaged stream takes, as a sync does
    it and nothing more: this side hashes each batch on another thread while it is sent (xxh3,
    the batch before finished first) and sends the digest after the pages; the receiver hashes
    the data as it lands and compares: what the check alone costs, below any sync's time."""

    def __init__(self, size: int, *, digests: bool = False) -> None:
        self.size = size
        self.proc = subprocess.Popen([sys.executable, "-c", BARE_RECEIVER, str(size), "digest" if digests else "bare"],
                                     stdout=subprocess.PIPE)
        self.sock = socket.create_connection(("127.0.0.1", int(self.proc.stdout.readline())))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.hasher = ThreadPoolExecutor(1) if digests else None

    def send(self, views: list[memoryview]) -> float:
        assert sum(len(view) for view in views) == self.size
        digest, hashing = xxhash.xxh3_64(), None
        started = time.perf_counter()
        for first in range(0, len(views), 1024):
            batch = views[first : first + 1024]
            if self.hasher is not None:
                if hashing is not None:
                    hashing.result()
                hashing = self.hasher.submit(deque, map(digest.update, batch), 0)  # sendmsg frees the GIL
            sent = self.sock.sendmsg(batch)
            assert sent == sum(len(view) for view in batch)  # a blocking socket sends it all
        if hashing is not None:
            hashing.result()
            self.sock.sendall(digest.digest())
        if self.sock.recv(1) != b"k":
            raise SystemExit("the bare pair's receiver found a digest that does not match")
        return (time.perf_counter() - started) * 1000

    def close(self) -> None:
        self.sock.close()
        self.proc.wait()
        if self.hasher is not None:
            self.hasher.shutdown()


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


def check_floor(pages: int = 3000, repeats: int = 40) -> dict:
    """The bare pair moving `pages` random scattered pages of a 1 GiB mapping (as the sync bench's
    guest RAM), alternating with the same pair checking digests (BareTransfer `digests`), new
    pages each time (medians, ms; `floor`: the median over the pairs of digests / bare)."""
    size = pages * PAGE_SIZE
    with mmap.mmap(-1, 1 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as mapping:
        ram = np.frombuffer(mapping, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        rng = np.random.default_rng(pages)
        contents = rng.integers(0, 256, (pages, PAGE_SIZE), dtype=np.uint8)
        bare, checked = BareTransfer(size), BareTransfer(size, digests=True)
        times: dict[BareTransfer, list[float]] = {bare: [], checked: []}
        view = memoryview(mapping)
        for repeat in range(repeats):
            numbers = np.sort(rng.choice(np.arange(1024, len(ram)), pages, replace=False))
            ram[numbers] = contents
            views = [view[n * PAGE_SIZE : (n + 1) * PAGE_SIZE] for n in numbers.tolist()]
            for pair in (bare, checked) if repeat % 2 else (checked, bare):
                times[pair].append(pair.send(views))
            del views
        view.release()
        del ram
        bare.close()
        checked.close()
    return {"bare_ms": statistics.median(times[bare]), "digest_ms": statistics.median(times[checked]),
            "floor": statistics.median(c / b for c, b in zip(times[checked], times[bare]))}


def print_sync_costs() -> None:
    """The loopback limit, the syncs of 80 and 3000 pages (3000 also over TLS), the bare transfer,
    `sync3000_ratio`, `sync3000_floor` and `tls_ratio`."""
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
          "to their running again with the outputs released, standby's commit and ack included / the bare transfer "
          "next to it, "
          "same run, median of the pairs; goal <= 1.5)")
    floor = check_floor()
    print(f"sync3000_floor: {floor['floor']:.2f}  (the bare pair checking the bytes as a sync must, a digest hashed "
          f"beside the sends and one as the data lands, compared: {floor['digest_ms']:.2f} ms / the bare pair, "
          f"{floor['bare_ms']:.2f} ms, alternating, median of the pairs: what checking every byte alone costs "
          "here, before anything else a sync does)")
    print(f"tls_ratio: {rows[3000, True]['pause_ms'] / plain['pause_ms']:.2f}  (the 3000-page sync's "
          "guest pause over TLS / in the clear, same pages, same run; goal <= 2.0)")


GUEST_PAGES_BELOW = (16 << 20) // PAGE_SIZE  # the `dirty` guest's code and 64 pages lie in its first 16 MiB


def cow_pause(pages: int = 3000, repeats: int = 30) -> dict:
    """Cow mode (--ft-mode cow): the guest pause of a sync of `pages` random dirty pages, and an
    empty pause and resume of the same running vCPUs, in the same run (medians, ms). The guest
    (`dirty`, 64 pages) keeps writing while each sync's pages are copied out; `wp_faults` and
    `copied_aside` count its writes that met a protected page, and those that copied one aside."""
    port = free_port()
    standby = Child("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--mem", "1024M", "--serial", "none",
                    "--ft-timeout", "60000")  # we drive the syncs: no heartbeats
    standby.wait_line("waiting for a primary")
    with tempfile.NamedTemporaryFile("w+") as metrics_file:
        output, running = bytearray(), threading.Event()

        def serial(data: bytes) -> None:
            output.extend(data)
            if b"pages/s" in output:
                running.set()

        with Machine(MachineConfig(memory=1 << 30), serial_output=serial) as machine:
            machine.load(guestbuild.image_path("dirty"), cmdline="pages=64")
            machine.vm.start()
            if not running.wait(60):  # calibrated and writing (a pause during its calibration could fail it)
                raise SystemExit(f"the dirty guest did not start: {output.decode(errors='replace')}")
            primary = Primary(machine, metrics=metrics_file, log=lambda line: None, mode="cow")
            primary.protect(f"tcp:127.0.0.1:{port}")
            with primary._cond:
                primary._stopping = True  # we drive the syncs; the FT thread stays out of the way
                primary._cond.notify_all()
            primary._thread.join()
            rng = np.random.default_rng(pages)
            memory = machine.vm.memory
            payload = bytes(range(256)) * (PAGE_SIZE // 256)
            empty = []
            above_guest = np.arange(GUEST_PAGES_BELOW, memory.size // PAGE_SIZE)  # the guest's own pages stay its own
            # The floor first, before any cow sync: each protection makes KVM drop its mappings of
            # guest RAM, so a pause soon after one waits for the guest to fault them back.
            for _ in range(repeats):
                for page in rng.choice(above_guest, pages, replace=False):
                    memory.write(int(page) * PAGE_SIZE, payload)
                started = time.perf_counter()  # paused, released and timed as a cow sync is
                _, hold = machine.vm.run_paused("bench", lambda: None)
                ran_again = machine.vm.control.ran_again(hold, 5)
                empty.append(((ran_again or time.perf_counter()) - started) * 1000)
            primary._sync("warm-up")  # what the loop above wrote
            for _ in range(repeats):
                for page in rng.choice(above_guest, pages, replace=False):
                    memory.write(int(page) * PAGE_SIZE, payload)
                while primary._in_flight:  # each sync finds the standby idle
                    primary._collect_acks(block=True)
                primary._sync("bench")
            while primary._in_flight:
                primary._collect_acks(block=True)
            summary = primary.summary()
            if b"FAIL" in output or b"does not count" in output:
                raise SystemExit(f"the dirty guest failed: {output[-300:].decode(errors='replace')}")
            machine.vm.stop(0, "bench done")
            primary.close()
        metrics_file.seek(0)
        rows = [json.loads(line) for line in metrics_file if '"bench"' in line]
    standby.stop()
    return {"pages": statistics.median(r["pages"] for r in rows), "pause_ms": statistics.median(r["pause_ms"] for r in rows),
            "pause_p99_ms": float(np.percentile([r["pause_ms"] for r in rows], 99)),
            "empty_ms": statistics.median(empty), "syncs": len(rows), "wp_faults": summary["wp_faults"],
            "copied_aside": summary["copied_aside"]}


def print_cow_pause() -> None:
    row = cow_pause()
    print(f"cow mode, sync of {row['pages']:.0f} dirty pages while the guest writes: guest pause {row['pause_ms']:.2f} ms "
          f"(p99 {row['pause_p99_ms']:.2f}); an empty pause and resume of its vCPUs {row['empty_ms']:.2f} ms; "
          f"{row['wp_faults']} write-protect faults, {row['copied_aside']} pages copied aside in {row['syncs']} syncs")
    print(f"cow_pause_ratio: {row['pause_ms'] / row['empty_ms']:.2f}  (cow sync's guest pause / an empty pause and "
          "resume, same run; goal <= 5)")
