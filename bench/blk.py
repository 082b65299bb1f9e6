"""virtio-blk throughput and IOPS: pykvm against QEMU (KVM), the same guest image in the same run.

The `blkbench` guest (guests/blkbench) times its own tests with the TSC, so neither VMM's start-up
counts: sequential 64 KiB writes and reads over a region, then 4 KiB random reads and writes at
queue depth 1 and at a deeper depth. Each round runs it under QEMU (`-accel kvm`, virtio-blk-pci,
raw file, QEMU's default cache and aio), under pykvm with queue notifications as exits to Python
that serve the queue on the vCPU thread (`MachineConfig(ioeventfd=False)`, virtio-blk's default)
and under pykvm with KVM ioeventfds (`ioeventfd=True`: the notify wakes the device's I/O
thread), each on a fresh disk file, in an order that rotates from round to round. Figures are
medians over the rounds with their min-max; a ratio is pykvm / QEMU, the median of the rounds'
ratios (the runs of a round are back to back, under the same host load).

Exits per request: KVM's count of every exit of the vCPU during the test, also those the kernel
handles itself (an ioeventfd notify, an interrupt), and for pykvm the exits that reached Python.
VMM CPU per request: the CPU time the VMM spent outside the guest (harness.vmm_cpu_ns: its
threads but the vCPU, exactly, plus the vCPU thread's time outside guest mode - exit handling,
in the kernel too - sampled at the clock tick). It is the cost that decides the figures when the
host's CPUs are busy, because the guest's vCPU spins while it waits. Counters are read in the
guest's idle gap between tests; QEMU's (QMP query-stats, /proc) include the ~2 exits per
character of printing the result line, which are subtracted; pykvm's are read at the first and
last byte of each line.

    python bench/blk.py [--rounds N] [--ms MS] [--depth D] [--region MIB]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    CONFIGS, LABELS, KvmStats, QemuGuest, Series, add_costs, mark_default_config, print_lowest_ratios, pykvm_cpu_ns,
    table_rows,
)
from pykvm import guestbuild  # noqa: E402
from pykvm.devices.virtio.blk import Blk, DiskSpec  # noqa: E402
from pykvm.machine import Machine, MachineConfig  # noqa: E402

MEMORY_MIB = 64
DISK_MIB = 64
RESULT = re.compile(r"^blkbench: (\S+) depth=(\d+) MB/s=([\d.]+) iops=(\d+) requests=(\d+) ")
QEMU_EXITS_PER_CHAR = 2  # the guest's serial driver: a line-status read and a data write per byte


@dataclass
class TestResult:
    depth: int
    mbps: float
    iops: int
    requests: int
    exits: int | None  # all KVM exits of the vCPU during the test
    py_exits: int | None  # pykvm: those that reached the Python loop
    cpu_ns: int | None  # CPU time of the VMM's threads other than the vCPU


@dataclass
class Figures:
    mbps: Series = field(default_factory=Series)
    iops: Series = field(default_factory=Series)
    exits: Series = field(default_factory=Series)
    py_exits: Series = field(default_factory=Series)
    cpu_us: Series = field(default_factory=Series)


def fresh_disk(path: Path) -> Path:
    """A zero-filled (allocated) disk file: the first writes do not pay for block allocation."""
    with path.open("wb") as f:
        chunk = bytes(1 << 20)
        for _ in range(DISK_MIB):
            f.write(chunk)
    return path


Counters = tuple  # (KVM exits, Python exits or None, VMM CPU ns), each None if unknown


def parse(lines: list[tuple[str, Counters, Counters]], *, print_exits: int = 0) -> dict[str, TestResult]:
    """Result lines -> results. lines: (text, counters at its first byte, counters after its
    newline); a test's figures are the counters' changes between the previous line's end and its
    result line's start."""
    results = {}
    for i, (text, start, _) in enumerate(lines):
        match = RESULT.match(text)
        if not match or i == 0:
            continue
        name, depth, mbps, iops, requests = match.groups()
        before = lines[i - 1][2]
        delta = [b - a if None not in (a, b) else None for a, b in zip(before, start)]
        if delta[0] is not None:
            delta[0] -= print_exits * (len(text) + 1)
        results[name] = TestResult(int(depth), float(mbps), int(iops), int(requests), *delta)
    return results


def check(lines: list[str], status: int, who: str) -> None:
    if status != 0 or not any(line.startswith("blkbench: ok") for line in lines):
        raise SystemExit(f"blkbench failed under {who} (status {status}):\n" + "\n".join(lines))


def run_qemu(image: Path, disk: Path, append: str, workdir: Path, timeout: float) -> dict[str, TestResult]:
    lines: list[tuple[str, Counters, Counters]] = []

    def on_line(guest: QemuGuest, _: float, text: str) -> None:  # read while the guest idles after the line
        try:
            cpu = guest.vmm_cpu_ns()
        except OSError:
            cpu = None
        counters = (guest.exits(), None, cpu)
        lines.append((text, counters, counters))

    guest = QemuGuest(image, append, ["-drive", f"if=none,id=d0,file={disk},format=raw",
                                      "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"],
                      workdir, on_line=on_line, memory_mib=MEMORY_MIB)
    try:
        status = guest.wait(timeout)
    finally:
        guest.close()
    check([text for text, _, _ in lines], status, "QEMU")
    return parse(lines, print_exits=QEMU_EXITS_PER_CHAR)


def run_pykvm(image: Path, disk: Path, append: str, *, ioeventfd: bool) -> dict[str, TestResult]:
    lines: list[tuple[str, Counters, Counters]] = []
    pending = bytearray()
    start: list[Counters] = []

    def counters() -> Counters:
        return stats.exits(), vcpu.exit_count, pykvm_cpu_ns(machine)

    def on_output(data: bytes) -> None:  # on the vCPU thread, inside the exit: the guest waits
        if not pending:
            start[:] = [counters()]
        pending.extend(data)
        if pending.endswith(b"\n"):
            lines.append((pending[:-1].decode(errors="replace"), start[0], counters()))
            pending.clear()

    config = MachineConfig(memory=MEMORY_MIB << 20, disks=(DiskSpec(str(disk)),), ioeventfd=ioeventfd)
    with Machine(config, serial_output=on_output) as machine:
        machine.load(image, cmdline=append)
        vcpu = machine.vm.vcpus[0]
        stats = KvmStats(vcpu.fd.fd)
        try:
            stop = machine.run()
        finally:
            stats.close()
    check([text for text, _, _ in lines], stop.status, "pykvm")
    return parse(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (default 3)")
    parser.add_argument("--ms", type=int, default=1000, help="duration of each test in the guest (default 1000)")
    parser.add_argument("--depth", type=int, default=16, help="requests in flight for the deep tests (default 16)")
    parser.add_argument("--region", type=int, default=32, help="MiB of the disk the tests cover (default 32)")
    parser.add_argument("--only", choices=CONFIGS, action="append", help="run only these configurations")
    args = parser.parse_args()
    if not 2 <= args.depth <= 32:
        parser.error("--depth: 2 to 32 (the guest's limit; 1 would repeat the queue-depth-1 tests)")

    mark_default_config(Blk)
    image = guestbuild.image_path("blkbench")
    append = f"ms={args.ms} depth={args.depth} region={args.region} gap=100"
    timeout = 60 + 6 * (args.ms + 100) / 1000 * 3
    configs = args.only or list(CONFIGS)
    figures: dict[str, dict[str, Figures]] = {}
    order: list[str] = []
    print(f"blkbench {append}: {args.rounds} round(s) of {', '.join(LABELS[c] for c in configs)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-blk-") as tmp:
        workdir = Path(tmp)
        for round_ in range(args.rounds):
            for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
                disk = fresh_disk(workdir / "disk.img")
                if config == "qemu":
                    results = run_qemu(image, disk, append, workdir, timeout)
                else:
                    results = run_pykvm(image, disk, append, ioeventfd=config == "pykvm-ioeventfd")
                os.unlink(disk)
                for name, result in results.items():
                    if name not in order:
                        order.append(name)
                    f = figures.setdefault(name, {}).setdefault(config, Figures())
                    f.mbps.add(result.mbps)
                    f.iops.add(result.iops)
                    add_costs(f, result, result.requests)
            print(f"  round {round_ + 1} done", flush=True)

    print()
    print(f"{'':30} {'MB/s':>8} {'(min-max)':>15} {'IOPS':>7} {'(min-max)':>13} {'vs QEMU':>7} {'(min-max)':>11}"
          f" {'exits/req':>9} {'py-exits/req':>12} {'VMM CPU us/req':>14}")
    worst: dict[str, float] = {}
    for name in order:
        depth = "" if "qd" in name else f" (depth {args.depth})"
        print(f"{name}{depth}")
        for label, f, (ratio, spread), (exits, py_exits, cpu) in table_rows(figures[name], configs, "iops", worst):
            print(f"  {label:28} {f.mbps.median:8.1f} {f.mbps.spread('.0f'):>15} {f.iops.median:7.0f}"
                  f" {f.iops.spread('.0f'):>13} {ratio:>7} {spread:>11} {exits:>9} {py_exits:>12} {cpu:>14}")
    print_lowest_ratios(worst, configs, "blk_ratio")


if __name__ == "__main__":
    main()
