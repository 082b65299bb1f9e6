"""A private etcd for the tests (Debian's etcd-server; scripts/setup.sh test installs it): its own
data folder and loopback ports, started and stopped by the test session."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
from pathlib import Path

READY = b"ready to serve client requests"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EtcdServer:
    """`stop()` then `start()` brings the same server back (same ports, same data): a witness
    that was unreachable for a while."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port, self.peer_port = _free_port(), _free_port()
        self.start()

    def start(self) -> None:
        etcd = shutil.which("etcd")
        if etcd is None:
            raise RuntimeError("etcd is not installed (apt-get install etcd-server; scripts/setup.sh test does)")
        client_url, peer_url = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer_port}"
        self.proc = subprocess.Popen(
            [etcd, "--name", "pykvm-test", "--data-dir", str(self.directory / "etcd"),
             "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"pykvm-test={peer_url}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._ready = threading.Event()
        threading.Thread(target=self._watch_log, daemon=True).start()
        if not self._ready.wait(30):
            self.stop()
            raise RuntimeError("etcd did not become ready within 30 s")

    def _watch_log(self) -> None:
        for line in self.proc.stderr:  # drained for the whole run, so etcd never blocks on its log
            if READY in line:
                self._ready.set()

    @property
    def uri(self) -> str:
        return f"etcd:127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
