"""A long bad-input sweep of the pykvm command and its control socket: command lines generated
from the options' grammar (valid and broken values, special files, duplicates, conflicts), each
run as a user would, must end in exit 0 or one `pykvm: error:` line and exit 2, within the time
limit, without a traceback; control requests (well-formed or not) sent to a running VMM must
each be answered, and query-status after them. Prints the cases tried and `failures: N`; exits 0
only with none.

    python bench/fuzz_cli.py [--cases N] [--requests N] [--seed N]   (default 300 command lines, 2000 requests)
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hypothesis import HealthCheck, given, seed as hypothesis_seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pykvm import guestbuild  # noqa: E402
from tests.cli_fuzzing import (  # noqa: E402
    Files, control_lines, control_problem, other_command_lines, run_cli, run_command_lines)
from tests.conftest import VmmProcess  # noqa: E402


def _sweep(cases: int, seed: int, body) -> None:
    """Run `body(data)` for `cases` generated examples (no shrinking: every failure is kept)."""
    wrapped = settings(max_examples=cases, deadline=None, database=None, phases=["generate"],
                       suppress_health_check=list(HealthCheck))(given(data=st.data())(body))
    hypothesis_seed(seed)(wrapped)()


def fuzz_command_lines(cases: int, seed: int, root: Path, failures: list[str]) -> int:
    files = Files(root)
    tried = 0

    def body(data) -> None:
        nonlocal tried
        args = data.draw(st.one_of(run_command_lines(files), run_command_lines(files), other_command_lines(files)))
        tried += 1
        problem = run_cli(args, files.root).problem()
        if problem is not None:
            failures.append(f"pykvm {' '.join(map(repr, args))}: {problem}")
    try:
        _sweep(cases, seed, body)
    finally:
        files.close()
    return tried


def fuzz_control(requests: int, seed: int, root: Path, failures: list[str]) -> int:
    control, disk = str(root / "vm.sock"), root / "disk.img"
    with open(disk, "wb") as image:
        image.truncate(1 << 20)
    (root / "files").mkdir()
    snapshots = root / "snapshots"
    snapshots.mkdir()
    files = Files(root / "files")
    vmm = VmmProcess("run", "dirty", "--append", "pages=64 seconds=100000", "--control", control, "--disk", str(disk),
                     "--serial", "none", "--mem", "16M")
    tried = 0
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(control)
                break
            except OSError:
                if time.monotonic() > deadline or vmm.proc.poll() is not None:
                    raise RuntimeError("the VMM never opened its control socket:\n" + vmm.stderr.data.decode())
                time.sleep(0.05)

        def body(data) -> None:
            nonlocal tried
            line = data.draw(control_lines(files, snapshots, [control, str(disk)]))
            tried += 1
            problem = control_problem(control, line, snapshots)
            if problem is not None:
                failures.append(problem)
            for snap in snapshots.glob("*.snap"):
                snap.unlink()  # keep the disk use flat
        _sweep(requests, seed, body)
        if vmm.proc.poll() is not None:
            failures.append(f"the VMM exited ({vmm.proc.returncode}):\n{vmm.stderr.data.decode()}")
    finally:
        vmm.kill()
        files.close()
    return tried


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300, help="command lines (default 300)")
    parser.add_argument("--requests", type=int, default=2000, help="control requests (default 2000)")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    guestbuild.build(log=lambda line: None)
    failures: list[str] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pykvm-fuzz-cli-") as tmp:
        (Path(tmp) / "cli").mkdir()
        (Path(tmp) / "ctl").mkdir()
        lines = fuzz_command_lines(args.cases, seed, Path(tmp) / "cli", failures) if args.cases else 0
        found_in_lines = len(failures)
        requests = fuzz_control(args.requests, seed, Path(tmp) / "ctl", failures) if args.requests else 0
    elapsed = time.perf_counter() - started
    print(f"fuzz_cli: seed {seed}: {lines} command lines ({found_in_lines} failures), {requests} control requests "
          f"({len(failures) - found_in_lines} failures) in {elapsed:.0f} s")
    print(f"cases tried: {lines + requests}")
    print(f"failures: {len(failures)}")
    for failure in failures[:20]:
        print(f"  {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
