"""TCP through an FT-protected guest, against the host kernel's TCP on a bridged TAP in a network
namespace (pykvm.testing.lan; needs root):

1. `tcp-echo`'s rate (1 MiB streamed through it) and latency (64-byte round trips on one
   connection), without FT and with FT in each mode, in the same run: the ratios are FT's cost.
2. Takeovers: in each trial a client streams through `tcp-echo`, or writes records to `kv` on one
   TCP connection, while the primary is killed at a random point. A trial fails if the connection
   is reset, a byte comes back wrong, twice or not at all, or an acknowledged record is not served
   on that connection afterwards. `tcp_stall_ms:` is the longest wait for echoed bytes a client
   saw across the takeovers.

    python bench/ft_tcp.py [--trials N] [--seed S]      (bench/ft.py runs it with its defaults)

Exits 1 if a trial lost, reset or duplicated anything, else 0.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm import guestbuild  # noqa: E402
from pykvm.ft.protocol import SYNC_MODES  # noqa: E402
from pykvm.testing.ft_pair import FtPair, put_kv_records_across_a_fault  # noqa: E402
from pykvm.testing.lan import GuestLan  # noqa: E402
from pykvm.testing.tcp import EchoStream  # noqa: E402
from pykvm.testing.vmm_process import VmmProcess  # noqa: E402

RATE_BYTES = 1 << 20
ROUND_TRIPS = 300
STALL_STREAM = 400_000
RECORDS = 40


def _serve(lan: GuestLan, root: Path, mode: str | None) -> FtPair | VmmProcess:
    """tcp-echo without FT (mode None) or protected in `mode`."""
    if mode is not None:
        return FtPair(lan, root, "tcp-echo", mode)
    vmm = VmmProcess("run", "tcp-echo", "--net", "tap:tap0", prefix=lan.prefix)
    vmm.wait_for(b": ready", timeout=60)
    return vmm


def echo_figures(mode: str | None) -> tuple[float, list[float]]:
    """Bytes/s through tcp-echo, and the round-trip times (s) of 64-byte messages."""
    with GuestLan(taps=("tap0", "tap1")) as lan, tempfile.TemporaryDirectory() as tmp:
        server = _serve(lan, Path(tmp), mode)
        try:
            started = time.perf_counter()
            result = EchoStream(lan.connect(7), RATE_BYTES, seed=1).start().wait()
            rate = RATE_BYTES / (time.perf_counter() - started)
            if not result.intact:
                raise SystemExit(f"tcp echo {mode or 'without FT'}: the stream broke: {result}")
            message, times = os.urandom(64), []
            with lan.connect(7) as sock:
                for _ in range(ROUND_TRIPS):
                    t0 = time.perf_counter()
                    sock.sendall(message)
                    echoed = b""
                    while len(echoed) < len(message):
                        echoed += sock.recv(64)
                    times.append(time.perf_counter() - t0)
                    assert echoed == message
            return rate, times
        finally:
            server.close() if isinstance(server, FtPair) else server.kill()


def echo_takeover(mode: str, rng: random.Random) -> tuple[bool, float, str]:
    """One trial: (intact, the longest stall in s, what went wrong or the standby's takeover time)."""
    with GuestLan(taps=("tap0", "tap1")) as lan, tempfile.TemporaryDirectory() as tmp:
        pair = FtPair(lan, Path(tmp), "tcp-echo", mode)
        try:
            stream = EchoStream(lan.connect(7), STALL_STREAM, seed=rng.getrandbits(32)).start()
            if not stream.wait_received(int(STALL_STREAM * rng.uniform(0.05, 0.8))):
                return False, 0.0, f"no echo before the kill: {stream.error}"
            pair.kill_primary()
            result = stream.wait()
            took = re.search(r"took over from sync \d+ in ([\d.]+) ms", pair.standby.errors)
            note = result.error or (f"standby took over in {took.group(1)} ms" if took else "no takeover")
            return result.intact and took is not None, result.longest_stall_s, note
        finally:
            pair.close()


def kv_takeover(mode: str, rng: random.Random) -> tuple[bool, str]:
    """One trial of kv on one TCP connection: (every acknowledged record served, what went wrong)."""
    with GuestLan(taps=("tap0", "tap1")) as lan, tempfile.TemporaryDirectory() as tmp:
        pair = FtPair(lan, Path(tmp), "kv", mode, disks=True)
        try:
            kv = put_kv_records_across_a_fault(lan, RECORDS, rng, pair.kill_primary)
            unserved = kv.unserved()
            kv.close()
            return not unserved, f"unserved: {unserved}" if unserved else ""
        except (OSError, AssertionError) as error:
            return False, repr(error)
        finally:
            pair.close()


def _ms(values: list[float], q: float) -> float:
    return sorted(values)[min(int(len(values) * q), len(values) - 1)] * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3, help="takeover trials per guest and FT mode (default 3)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("tcp: skipped (the LAN's network namespace needs root)")
        return 0
    guestbuild.build(["tcp-echo", "kv"], log=lambda line: None)
    rng = random.Random(args.seed)
    rate_off, times_off = echo_figures(None)
    for mode in SYNC_MODES:
        rate_on, times_on = echo_figures(mode)
        print(f"tcp echo rate ({mode}): {rate_off / 1e6:.2f} MB/s without FT, {rate_on / 1e6:.2f} MB/s with FT "
              f"(ratio {rate_on / rate_off:.2f})")
        print(f"tcp echo latency ({mode}, 64-byte round trip, median/p99): {_ms(times_off, .5):.2f}/"
              f"{_ms(times_off, .99):.2f} ms without FT, {_ms(times_on, .5):.2f}/{_ms(times_on, .99):.2f} ms with FT "
              f"(median ratio {statistics.median(times_on) / statistics.median(times_off):.1f})")
    stalls, failures = [], 0
    for mode in SYNC_MODES:
        for trial in range(args.trials):
            intact, stall, why = echo_takeover(mode, rng)
            stalls.append(stall)
            failures += not intact
            print(f"takeover {mode} tcp-echo #{trial + 1}: {'intact' if intact else 'BROKEN'}, "
                  f"longest stall {stall * 1000:.0f} ms ({why})", flush=True)
            served, why = kv_takeover(mode, rng)
            failures += not served
            print(f"takeover {mode} kv #{trial + 1}: {'every acknowledged record served' if served else 'LOST ' + why}",
                  flush=True)
    print(f"tcp_stall_ms: {max(stalls) * 1000:.0f} (the longest wait for echoed bytes across {len(stalls)} "
          f"takeovers; median {statistics.median(stalls) * 1000:.0f}); trials failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
