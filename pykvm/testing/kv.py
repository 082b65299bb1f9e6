"""The `kv` guest's client, as the FT tests, the fault campaign and a user's script would write
it: UDP requests on the guest's link, each sent again until its own answer comes, the guest
resolved again after a silence (a takeover moves it to another VMM)."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

from pykvm.testing.netframes import FrameSocket, Peer

SECTOR = 512
_RECORD = struct.Struct("<IIQI")  # magic, length, seq, crc of the sector before (guests/kv/kv.c)
RECORD_MAGIC, STORE_MAGIC = 0x3152564B, b"PYKVMKV1"
TRY = 0.2  # the client's first patience before it sends a request again (it is UDP)
LONGEST_TRY = 3.2  # each unanswered try doubles the patience up to this (RFC 8085's backoff): on a
#                    slow link, resending faster than the answers can come only piles up work


class KvClient:
    """Remembers every record it saw acknowledged (`acked`), to check they are all served."""

    def __init__(self, link: FrameSocket, patience: float = TRY) -> None:
        self.peer = Peer(link, timeout=patience)
        self.patience = patience
        self.acked: dict[int, str] = {}

    def ask(self, text: str, deadline: float) -> bytes | None:
        """Send `text` until its answer comes (None when the deadline passed first)."""
        seq, patience = text.split()[1].encode(), self.patience
        while time.monotonic() < deadline:
            try:
                if self.peer.guest_mac is None:
                    self.peer.timeout = patience
                    self.peer.resolve()
                self.peer.send_udp(9000, text.encode())
                until = time.monotonic() + patience
                while (left := until - time.monotonic()) > 0:
                    reply = self.peer.receive_udp(9000, timeout=left).udp.payload
                    if reply.split(b" ")[1:2] == [seq]:  # not a late answer to an earlier request
                        return reply
            except TimeoutError:
                self.peer.guest_mac = None
                patience = min(patience * 2, LONGEST_TRY)
            except (ConnectionRefusedError, FileNotFoundError):
                # Nobody holds the link's socket this instant (a standby is binding it): the pace
                # of a client's resends, not synchronisation; the deadline bounds it.
                self.peer.guest_mac = None
                time.sleep(self.patience / 10)
        return None

    def put(self, seq: int, value: str, patience: float = 60) -> bool:
        """Store record `seq`; True once acknowledged (then it is in `acked`)."""
        reply = self.ask(f"put {seq} {value}", time.monotonic() + patience)
        if reply is None:
            return False
        if reply != f"ok {seq}".encode():
            raise AssertionError(f"put {seq}: the guest answered {reply!r}")
        self.acked[seq] = value
        return True

    def unserved(self, patience: float = 60) -> list[int]:
        """The acknowledged records that whoever runs the guest now does not serve as written."""
        return [seq for seq, value in self.acked.items()
                if self.ask(f"get {seq}", time.monotonic() + patience) != f"val {seq} {value}".encode()]

    def check_all_served(self) -> None:
        """Every record the client saw acknowledged is served (by whoever runs the guest now)."""
        unserved = self.unserved()
        assert not unserved, f"acknowledged records not served: {unserved}"


def records_on_disk(path: str | Path) -> dict[int, bytes]:
    """The records a kv disk image holds, read as the guest replays its log: from the header, each
    sector that names the checksum of the one before, up to the first that does not."""
    image = Path(path).read_bytes()
    header = image[:SECTOR]
    if header[:8] != STORE_MAGIC or _crc(header) != int.from_bytes(header[-4:], "little"):
        return {}
    records, last_crc = {}, _crc(header)
    for at in range(SECTOR, len(image) - SECTOR + 1, SECTOR):
        sector = image[at : at + SECTOR]
        magic, length, seq, prev_crc = _RECORD.unpack_from(sector)
        if (magic, prev_crc) != (RECORD_MAGIC, last_crc) or length > 400 or _crc(sector) != int.from_bytes(
                sector[-4:], "little"):
            break
        records.setdefault(seq, sector[_RECORD.size : _RECORD.size + length])
        last_crc = _crc(sector)
    return records


def _crc(sector: bytes) -> int:
    return zlib.crc32(sector[: SECTOR - 4])
