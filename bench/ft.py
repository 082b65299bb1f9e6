"""Fault-tolerance benchmarks: the script that runs them all, in this order.

1. Sync cost (bench/ft_sync.py): the guest pause of a sync of 80 and 3000 random dirty pages
   between this process's primary and a standby VMM process over loopback, the vCPU running.
   `sync3000_ratio`: the whole 3000-page sync (request to pause -> vCPUs running again, outputs
   released, the standby's commit and ack included) / the bare transfer of the same scattered
   pages by a pair of processes (sendmsg of the runs / recvmsg_into), alternating with the syncs in
   the same run (goal <= 1.5). (The Kemari prototype needed ~150 ms for 3000 pages.)
   `sync3000_floor`: the same bare pair checking a digest of the bytes on each side, as a sync
   must to refuse a damaged stream, over the bare pair: what the check alone costs on this host.
   The 3000-page sync again over mutual TLS, and `tls_ratio`: TLS pause / plaintext pause (goal <= 2).
   Cow mode (--ft-mode cow): the guest pause of a 3000-page sync while the guest writes, and
   `cow_pause_ratio`: it over an empty pause and resume of the same running vCPUs (goal <= 5).
2. Output latency added by FT (bench/ft_kv.py): kv puts (a disk write, a flush and a reply frame
   each) with FT on and off, and the per-output sync delays from the primary's metrics.
3. Takeover (bench/ft_kv.py): SIGKILL of the primary -> the guest answering on the standby.
4. Overhead: kv requests per second with FT on vs off (2.), and the `dirty` guest's rate (here).
5. Group commit (bench/ft_kv.py): kv with 8 clients writing at once, FT off and in every mode
   (`kv_ratio`: the best FT mode with replicated disks over the FT-off runs just before and
   after it, the median of three such runs, goal >= 0.5), and a table of
   every mode.
6. TCP (bench/ft_tcp.py): tcp-echo's rate and latency with FT on and off, and `tcp_stall_ms:`,
   the longest stall a TCP client sees across a takeover.

    python bench/ft.py
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ft_kv import kv_group_commit, print_kv_outputs  # noqa: E402
from bench.ft_sync import print_cow_pause, print_sync_costs  # noqa: E402
from bench.harness import Child, free_port  # noqa: E402


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


def print_dirty_rates() -> None:
    """The `dirty` guest's rate with FT off and on."""
    rate_off, rate_on = dirty_rate(False), dirty_rate(True)
    print(f"dirty guest: {rate_off / 1e6:.1f} M pages/s without FT, {rate_on / 1e6:.1f} M pages/s with FT "
          f"(ratio {rate_on / rate_off:.2f}; no output, so no syncs: the cost of dirty logging)")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print_sync_costs()
    print_cow_pause()
    print_kv_outputs()
    print_dirty_rates()
    kv_group_commit()
    tcp_figures()


def tcp_figures() -> None:
    """TCP through the guest (bench/ft_tcp.py): echo rate and latency with FT on and off, and the
    longest stall a TCP client sees across a takeover (`tcp_stall_ms:`)."""
    from bench.ft_tcp import main as tcp_main

    if tcp_main([]):
        raise SystemExit("a TCP connection did not survive a takeover intact")


if __name__ == "__main__":
    main()
