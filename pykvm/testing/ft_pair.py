"""An FT pair on a GuestLan, as the TCP failover tests and bench/ft_tcp.py run it: the standby on
`tap1`, the primary on `tap0`, both VMMs inside the LAN's namespace (their own connection on its
loopback), optionally through a Relay (a link that can be cut) and with a file witness."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from pykvm.testing.lan import GuestLan
from pykvm.testing.relay import Relay

FT_PORT = 7000  # on the namespace's own loopback: nothing else listens there
DISK_SIZE = 4 << 20


class Vmm:
    """A pykvm child process whose serial output (stdout) and stderr are kept and waited on."""

    def __init__(self, args: list[str], prefix: tuple[str, ...] = ()) -> None:
        self.args = args
        self.proc = subprocess.Popen([*prefix, sys.executable, "-m", "pykvm", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out, self.err = bytearray(), bytearray()
        self._cond = threading.Condition()
        self._readers = [threading.Thread(target=self._pump, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream, sink: bytearray) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            with self._cond:
                sink += chunk
                self._cond.notify_all()

    def wait_for(self, text: str, *, stderr: bool = False, timeout: float = 60) -> None:
        """Until the guest (or, with stderr, the VMM) said `text`; an error naming both otherwise."""
        sink = self.err if stderr else self.out
        with self._cond:
            if self._cond.wait_for(lambda: text.encode() in sink, timeout):
                return
        raise TimeoutError(f"{' '.join(self.args[:2])} never said {text!r}:\n{self.output}\n{self.errors}")

    def said(self, text: str) -> bool:
        with self._cond:
            return text.encode() in self.err or text.encode() in self.out

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
        return self.out.decode(errors="replace")

    @property
    def errors(self) -> str:
        return self.err.decode(errors="replace")


class FtPair:
    """`guest` (with a disk each when `disks`) run by a primary protected by a standby in `mode`.
    `witness`: both name a file witness in `root`; `relay`: their connection crosses a Relay."""

    def __init__(self, lan: GuestLan, root: Path, guest: str, mode: str, *, disks: bool = False,
                 witness: bool = False, relay: bool = False) -> None:
        self.relay: Relay | None = None
        self.primary: Vmm | None = None
        common: list[str] = ["--ft-witness", f"file:{root / 'witness'}"] if witness else []
        sides = {}
        for side in ("primary", "standby"):
            sides[side] = [*common]
            if disks:
                disk = root / f"{side}.img"
                with open(disk, "wb") as f:
                    f.truncate(DISK_SIZE)
                sides[side] += ["--disk", str(disk)]
        self.standby = Vmm(["ft", "standby", "--listen", f"tcp:127.0.0.1:{FT_PORT}", "--net", "tap:tap1",
                            *sides["standby"]], lan.prefix)
        try:
            self.standby.wait_for("waiting for a primary", stderr=True)
            uri = f"tcp:127.0.0.1:{FT_PORT}"
            if relay:
                self.relay = lan.inside(lambda: Relay(("127.0.0.1", FT_PORT)))
                uri = self.relay.uri
            self.primary = Vmm(["run", guest, "--net", "tap:tap0", "--ft", uri, "--ft-mode", mode,
                                *sides["primary"]], lan.prefix)
            self.primary.wait_for(": ready")
            self.primary.wait_for("protected by", stderr=True)
        except BaseException:
            self.close()
            raise

    def report(self) -> str:
        """What both VMMs said, for a failure's message."""
        return "".join(f"\n--- {name}:\n{vmm.output}{vmm.errors}" for name, vmm in
                       (("primary", self.primary), ("standby", self.standby)) if vmm is not None)

    def close(self) -> None:
        for vmm in (self.primary, self.standby):
            if vmm is not None:
                vmm.kill()
        if self.relay is not None:
            self.relay.close()
