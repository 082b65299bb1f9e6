"""Shared fixtures: the real /dev/kvm, the built guests, and a way to run the pykvm CLI.

Tests marked `nokvm` run on a host without KVM (`pytest -m nokvm`): nothing here touches
/dev/kvm or builds a guest unless a test asks for it, and a nokvm test may not ask.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pykvm import guestbuild
from pykvm.kvm import Kvm, KvmUnavailable
from pykvm.testing.vmm_process import SerialCapture, VmmProcess  # noqa: F401  (the tests import them from here)

REPO = Path(__file__).resolve().parent.parent

# Fixtures that need a usable /dev/kvm or the guest build, which a nokvm test must not use.
KVM_OR_GUEST_FIXTURES = {"guest_images"}


def kvm_usable() -> bool:
    """Whether KVM answers, not just whether /dev/kvm opens (a file bound over it opens too)."""
    try:
        Kvm().close()
    except KvmUnavailable:
        return False
    return True


requires_kvm = pytest.mark.skipif(not kvm_usable(), reason="/dev/kvm is not usable here")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    misplaced = [item.nodeid for item in items if item.get_closest_marker("nokvm")
                 and KVM_OR_GUEST_FIXTURES & set(getattr(item, "fixturenames", ()))]
    if misplaced:
        raise pytest.UsageError("tests marked nokvm use a fixture that needs KVM or the guest build:\n  "
                                + "\n  ".join(misplaced))


@pytest.fixture(scope="session")
def guest_images() -> dict[str, Path]:
    """Every bundled guest, built once per session (cached across sessions)."""
    return guestbuild.build(log=lambda line: None)


def run_pykvm(*args: str, timeout: float = 60, input: bytes | None = None, env: dict | None = None,
              prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the CLI as a user would, in a child process; returns its status and text output."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "pykvm", *args],
        cwd=REPO, capture_output=True, timeout=timeout, input=input if input is not None else b"",
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(REPO), os.environ.get("PYTHONPATH")))),
             **(env or {})},  # this checkout's pykvm, also from another working directory (`env -C`)
    )


needs_netns = pytest.mark.skipif(shutil.which("ip") is None or os.geteuid() != 0,
                                 reason="needs root and iproute2 for a network namespace")


@pytest.fixture
def netns():
    """A private network namespace for one test (a TAP, a capture, a host address inside)."""
    name = f"pykvm-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
