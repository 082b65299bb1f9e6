"""An FT pair on a GuestLan, as the TCP failover tests and bench/ft_tcp.py run it: the standby on
`tap1`, the primary on `tap0`, both VMMs inside the LAN's namespace (their own connection on its
loopback), optionally through a Relay (a link that can be cut) and with a file witness."""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path
from typing import Callable

from pykvm.testing.lan import GuestLan
from pykvm.testing.relay import Relay
from pykvm.testing.tcp import KvLines
from pykvm.testing.vmm_process import VmmProcess

FT_PORT = 7000  # on the namespace's own loopback: nothing else listens there
DISK_SIZE = 4 << 20


class FtPair:
    """`guest` (with a disk each when `disks`) run by a primary protected by a standby in `mode`.
    `witness`: both name a file witness in `root`; `relay`: their connection crosses a Relay."""

    def __init__(self, lan: GuestLan, root: Path, guest: str, mode: str, *, disks: bool = False,
                 witness: bool = False, relay: bool = False) -> None:
        self.relay: Relay | None = None
        self.primary: VmmProcess | None = None
        common: list[str] = ["--ft-witness", f"file:{root / 'witness'}"] if witness else []
        sides = {}
        for side in ("primary", "standby"):
            sides[side] = [*common]
            if disks:
                disk = root / f"{side}.img"
                with open(disk, "wb") as f:
                    f.truncate(DISK_SIZE)
                sides[side] += ["--disk", str(disk)]
        self.standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{FT_PORT}", "--net", "tap:tap1",
                                  *sides["standby"], prefix=lan.prefix)
        try:
            self.standby.stderr.wait_for(b"waiting for a primary", timeout=60)
            uri = f"tcp:127.0.0.1:{FT_PORT}"
            if relay:
                self.relay = lan.inside(lambda: Relay(("127.0.0.1", FT_PORT)))
                uri = self.relay.uri
            self.primary = VmmProcess("run", guest, "--net", "tap:tap0", "--ft", uri, "--ft-mode", mode,
                                      *sides["primary"], prefix=lan.prefix)
            self.primary.wait_for(b": ready", timeout=60)
            self.primary.stderr.wait_for(b"protected by", timeout=60)
        except BaseException:
            self.close()
            raise

    def kill_primary(self) -> None:
        """SIGKILL to the primary, without waiting for it (from a timer, inside a put)."""
        self.primary.proc.send_signal(signal.SIGKILL)

    def report(self) -> str:
        """What both VMMs said, for a failure's message."""
        return "".join(f"\n--- {name}:\n{vmm.output}{vmm.errors}" for name, vmm in
                       (("primary", self.primary), ("standby", self.standby)) if vmm is not None)

    def close(self) -> None:
        stop_pair(self.primary, self.standby, self.relay)


def stop_pair(primary: VmmProcess | None, standby: VmmProcess | None, relay: Relay | None = None) -> None:
    """Kill whichever VMMs of an FT pair started, and close the relay between them if any."""
    for vmm in (primary, standby):
        if vmm is not None:
            vmm.kill()
    if relay is not None:
        relay.close()


def put_kv_records_across_a_fault(lan: GuestLan, records: int, rng: random.Random,
                                  fault: Callable[[], object]) -> KvLines:
    """Records 1 to `records` put to the kv guest on one TCP connection, `fault` (the primary
    killed, the link cut) striking a random few ms after a random put of the middle half was
    sent; the connection, to ask it what it serves."""
    kv = KvLines(lan.connect(9000))
    strike_at = rng.randrange(records // 4, 3 * records // 4)
    for seq in range(1, records + 1):
        if seq == strike_at:
            threading.Timer(rng.uniform(0, 0.02), fault).start()
        kv.put(seq, f"record-{seq}-{rng.getrandbits(32):08x}")
    return kv
