"""The fault campaign (bench/ft_faults.py) in brief, as CI runs it: one trial of each fault on
real VMMs, the kv guest and a file witness. It must pass, and its table must show no lost record
and no trial with two live copies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.ft_faults import FAULTS
from tests.conftest import REPO, requires_kvm


@requires_kvm
@pytest.mark.skipif(os.geteuid() != 0, reason="the standby-disk-full trial mounts a small tmpfs (root)")
def test_one_trial_of_each_fault_loses_nothing_and_never_runs_two_copies(guest_images):
    result = subprocess.run([sys.executable, "bench/ft_faults.py", "--per-fault", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=len(FAULTS) * 60,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout + result.stderr
    header = next(line for line in result.stdout.splitlines() if line.startswith("fault "))
    assert header.split()[3:6] == ["acked", "lost", "two"], header
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.split()[:1]
            and line.split()[0] in (*FAULTS, "all")}
    assert set(rows) == {*FAULTS, "all"}, result.stdout
    for fault, row in rows.items():
        trials, acked, lost, two_copies = int(row[1]), int(row[3]), int(row[4]), int(row[5])
        assert trials == (len(FAULTS) if fault == "all" else 1) and acked > 0, row
        assert lost == 0 and two_copies == 0, result.stdout
