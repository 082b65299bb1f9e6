"""A long fuzzing run of the wire's receiving side: random streams (random headers, well-hashed
frames of every kind with random payloads, claimed lengths at the limits, valid streams damaged)
fed to migration's decoder and to both sides of an FT connection, a random number of bytes per
read. A failure is any exception but ProtocolError, or an allocation beyond the frame limits.

    python bench/fuzz_wire.py [CASES] [--seed N]      (default 100,000 cases)
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.wire_fuzzing import check, random_case  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="?", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    failures: list[str] = []
    started = time.perf_counter()
    tracemalloc.start()  # once: check() measures each case's allocations against the frame limits
    for case in range(args.cases):
        data = random_case(rng)
        problem = check(data, rng.choice([7, 64, 4096, 1 << 20]))  # bytes a read: headers split anywhere
        if problem is not None:
            failures.append(f"case {case}: {problem} (stream {data[:64].hex()}...)")
    elapsed = time.perf_counter() - started
    print(f"fuzz_wire: seed {seed}: {args.cases} cases tried in {elapsed:.1f} s, {len(failures)} failures found")
    for failure in failures[:20]:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
