"""A pykvm VMM as a child process, for the tests and the benchmarks: its serial output (stdout)
and stderr kept as they come, and waited on for a line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pykvm

# Where the child's `python -m pykvm` finds the pykvm this process imported (a checkout, also
# when a test's working directory is elsewhere).
PACKAGE_PARENT = Path(pykvm.__file__).resolve().parent.parent


class SerialCapture:
    """A serial_output sink that tests can wait on: wait_for(b"ready") blocks until the guest
    printed it (condition variable, no polling), or fails after `timeout`."""

    def __init__(self) -> None:
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
    """A `pykvm` child process whose serial output (stdout) and stderr a test can wait on;
    `prefix` goes before its command line (`ip netns exec NAME`)."""

    def __init__(self, *args: str, env: dict | None = None, prefix: tuple[str, ...] = ()) -> None:
        self.args = args
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "pykvm", *args], cwd=PACKAGE_PARENT,
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
