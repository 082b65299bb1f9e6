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


class SerialCapture:
    """A serial_output sink that tests can wait on: wait_for(b"ready") blocks until the guest
    printed it (condition variable, no polling), or fails after `timeout`."""

    def __init__(self) -> None:
        import threading

        self.data = bytearray()
        self._cond = threading.Condition()

    def __call__(self, chunk: bytes) -> None:
        with self._cond:
            self.data += chunk
            self._cond.notify_all()

    def wait_for(self, marker: bytes, timeout: float = 30, count: int = 1) -> None:
        """Until `marker` appeared `count` times."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.data.count(marker) >= count, timeout):
                raise TimeoutError(f"guest never printed {marker!r} x{count}; output so far:\n"
                                   f"{self.data.decode(errors='replace')}")


class VmmProcess:
    """A `pykvm` child process whose serial output (stdout) and stderr a test can wait on."""

    def __init__(self, *args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> None:
        import threading

        self.args = args
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "pykvm", *args], cwd=REPO,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})})
        self.stdout, self.stderr = SerialCapture(), SerialCapture()
        self._readers = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _pump(stream, sink: SerialCapture) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            sink(chunk)

    def wait_for(self, marker: bytes, timeout: float = 30, count: int = 1) -> None:
        try:
            self.stdout.wait_for(marker, timeout, count)
        except TimeoutError as error:
            raise TimeoutError(f"{error}\nstderr:\n{self.stderr.data.decode(errors='replace')}") from None

    def wait(self, timeout: float = 60) -> int:
        status = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return status

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    @property
    def output(self) -> str:
        return self.stdout.data.decode(errors="replace")

    @property
    def errors(self) -> str:
        return self.stderr.data.decode(errors="replace")


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
