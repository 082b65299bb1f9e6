"""docs/tour.md, run as a newcomer would: every ```sh block, in order, in one shell, in an empty
folder, with `pykvm` on the PATH; then what each step promises is checked in the files it left."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, requires_kvm

TOUR = REPO / "docs" / "tour.md"


def tour_script() -> str:
    blocks = re.findall(r"```sh\n(.*?)```", TOUR.read_text(), flags=re.S)
    assert len(blocks) >= 7, "the tour lost its steps"
    return "set -euo pipefail\n" + "\n".join(blocks)


@requires_kvm
@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (scripts/setup.sh test installs it)")
def test_every_command_of_the_tour_runs(tmp_path: Path, guest_images) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "pykvm"  # this checkout's pykvm, whatever the PATH holds
    shim.write_text(f'#!/bin/sh\nPYTHONPATH="{REPO}" exec "{sys.executable}" -m pykvm "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "tour"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    shell = subprocess.Popen(["bash", "-c", tour_script()], cwd=work, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = shell.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(shell.pid, signal.SIGKILL)
        output, _ = shell.communicate()
        logs = {name: (work / name).read_text(errors="replace")[-2000:] for name in
                ("primary.log", "standby.log", "compute.log") if (work / name).exists()}
        pytest.fail(f"the tour hung:\n{output.decode(errors='replace')[-3000:]}\n{logs}")
    finally:  # whatever a failed step left running in the background
        subprocess.run(["pkill", "-KILL", "-s", str(shell.pid)], capture_output=True)
    text = output.decode(errors="replace")
    assert shell.returncode == 0, text[-4000:]
    assert "Hello from pykvm guest!" in text
    assert (work / "exits.txt").read_text().count("port=0x0080") == 3
    crash = (work / "crash.txt").read_text()
    assert "exit status 1" in text and "triple fault" in crash and "rax=0x0000000000001234" in crash
    assert "ud2" in crash
    gdb = (work / "gdb.txt").read_text()
    assert "= 3" in gdb and "exited normally" in gdb, gdb
    primary, standby = (work / "primary.log").read_text(), (work / "standby.log").read_text()
    for phase in ("paused", "harvested", "sent", "ack", "resumed"):
        assert re.search(rf"ft trace: sync 3: .*{phase}", primary), (phase, primary[-3000:])
    for phase in ("staged", "committed"):
        assert re.search(rf"ft trace: sync 3: .*{phase}", standby), (phase, standby[-3000:])
    assert "took over from sync" in standby and "ft trace: takeover" in standby
    assert len(list((work / "report").glob("*.png"))) >= 2
