"""Fuzz the register surface as a hostile guest would: random port and MMIO reads and writes
(sizes 1, 2, 4, and 8 for MMIO; aligned and not; inside, straddling and just outside each
window) at every device of the PC (UART, CMOS, i8042, debug exit, ACPI PM, PCI configuration
mechanism 1, and every BAR of the virtio-blk and virtio-net functions: common config, ISR,
device config, notify, MSI-X table and PBA, legacy registers), through the I/O bus dispatch of
a vCPU exit. A case is up to 64 accesses and then one state round trip into fresh devices
(pykvm.testing.register_fuzz says what counts as a crash). No KVM: the devices sit on a
FakePlatform.

    python bench/fuzz_devices.py [--cases N] [--seed S]   # exit 0 only without a crash
    python bench/fuzz_devices.py --seed S --case I        # one case again, its accesses listed
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm.testing.fake_pc import FakePc  # noqa: E402
from pykvm.testing.register_fuzz import Access, random_case, register_surface, run_case  # noqa: E402

SHOWN_CRASHES = 3  # printed in full; the rest are counted
PROGRESS_EVERY = 30.0  # seconds


def case_rng(seed: int, index: int) -> random.Random:
    """Each case draws from its own generator, so any one can be run again alone (--case)."""
    return random.Random((seed << 32) | index)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=100_000, help="sequences to run (default 100000)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the whole run (default: random)")
    parser.add_argument("--case", type=int, default=None, help="run only this case of --seed, and list it")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 31)
    # A misbehaving guest makes devices log (a virtio device that needs a reset, say): expected
    # here by the thousand. One case run again alone shows them.
    logging.basicConfig(level=logging.DEBUG if args.case is not None else logging.CRITICAL, stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="fuzz-devices-") as scratch:
        disk = str(Path(scratch) / "disk.img")
        Path(disk).write_bytes(bytes(1 << 20))
        with FakePc(disk) as pc:
            surface = register_surface(pc)
        if args.case is not None:
            accesses = random_case(case_rng(seed, args.case), surface)
            print("\n".join(f"  {i:2d}  {access}" for i, access in enumerate(accesses)))
            result = run_case(disk, accesses)
            print(result.crash or f"case {args.case}: no crash ({result.stop_requests} stop requests)")
            return 1 if result.crash else 0
        return fuzz(disk, surface, seed, args.cases)


def fuzz(disk: str, surface: list, seed: int, cases: int) -> int:
    print(f"fuzz_devices: {cases} cases of up to 64 accesses at {len(surface)} register windows, seed {seed}",
          flush=True)
    crashes = stops = accesses = 0
    slowest: tuple[float, Access] | None = None
    started = last_progress = time.monotonic()
    for index in range(cases):
        result = run_case(disk, random_case(case_rng(seed, index), surface))
        accesses += len(result.accesses)
        stops += result.stop_requests
        if result.slowest is not None and (slowest is None or result.slowest[0] > slowest[0]):
            slowest = result.slowest
        if result.crash is not None:
            crashes += 1
            if crashes <= SHOWN_CRASHES:
                print(f"CRASH in case {index} (again: --seed {seed} --case {index}): {result.crash}", flush=True)
        now = time.monotonic()
        if now - last_progress >= PROGRESS_EVERY:
            last_progress = now
            print(f"  {index + 1} cases, {crashes} crashes, {now - started:.0f} s", flush=True)
    elapsed = time.monotonic() - started
    print(f"cases: {cases} ({accesses} accesses, {stops} stop requests by the guest) in {elapsed:.0f} s")
    if slowest is not None:
        print(f"slowest access: {slowest[0] * 1e3:.2f} ms ({slowest[1]})")
    print(f"crashes: {crashes}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
