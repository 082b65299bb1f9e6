"""What the primary measures: one record per sync (the `--metrics` file has one JSON object a
line with SyncRecord's fields) and the running totals behind `Primary.summary()`."""

from __future__ import annotations

import json
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TextIO

from pykvm.devices.virtio.gate import GatedFunction
from pykvm.devices.virtio.net import Net
from pykvm.run_control import Pause
from pykvm.stats import summary


def output_trigger(function: GatedFunction) -> str:
    """A sync's trigger (SyncRecord.trigger) when an output is held: the kind of device holding it."""
    return "net" if isinstance(function.device, Net) else "blk"


@dataclass
class SyncRecord:
    """One sync, as the metrics file has it (one JSON object a line, these fields)."""

    sync: int
    time: float  # wall clock (time.time()) when it ended
    trigger: str  # "full", "blk" (a shared disk's output), "net", "timer" or "disk" (replicated disk data piling up)
    pages: int
    bytes: int  # sent, frame headers included
    # guest paused: from the request to pause the vCPUs to their running again (the last one out of
    # its park); where that was not known yet when last looked for, to then (a lower bound)
    pause_ms: float
    transfer_ms: float  # from that request to the last byte handed to the socket
    ack_ms: float  # from then to the standby's Ack
    output_delay_ms: float  # the longest any output this sync released was held
    disk_mode: str = "replicated"  # where the standby's disks come from: replicated | shared
    mode: str = "sync"  # the primary's --ft-mode (in cow mode, pause_ms runs from the request to pause)


@dataclass
class InFlight:
    """A sync sent and not yet acknowledged (cow mode has up to two), the outputs its Ack
    releases, and the primary's own flush of the disks the guest flushed in it (ft.disk_mode)."""

    sync: int
    trigger: str
    pages: int
    bytes: int
    covered: list
    flushing: Future | None
    pausing: float  # perf_counter() times: the pause asked for, the last byte sent, the guest resumed
    sent: float
    resumed: float = 0.0  # (a synchronous sync resumes after its Ack)
    pause: Pause | None = None  # its pause of the vCPUs (RunControl.ran_again tells when they ran again)

    def record(self, acked: float, delays: list[float], *, disk_mode: str, mode: str) -> SyncRecord:
        return SyncRecord(self.sync, time.time(), self.trigger, self.pages, self.bytes,
                          (self.resumed - self.pausing) * 1000, (self.sent - self.pausing) * 1000,
                          (acked - self.sent) * 1000, max(delays, default=0.0) * 1000, disk_mode=disk_mode, mode=mode)


@dataclass
class PrimaryStats:
    protected: bool = False
    standby: str = ""
    syncs: int = 0
    pages: int = 0
    bytes: int = 0
    heartbeats: int = 0
    standby_losses: int = 0
    pause_ms: list[float] = field(default_factory=list)
    output_delay_ms: list[float] = field(default_factory=list)
    pages_per_sync: list[int] = field(default_factory=list)

    def add(self, record: SyncRecord, metrics: TextIO | None) -> None:
        """Count one sync, and append its record to the metrics file (if any)."""
        self.syncs += 1
        self.pages += record.pages
        self.bytes += record.bytes
        self.pause_ms.append(record.pause_ms)
        self.pages_per_sync.append(record.pages)
        if record.trigger in ("blk", "net"):
            self.output_delay_ms.append(record.output_delay_ms)
        if metrics is not None:
            metrics.write(json.dumps(record.__dict__) + "\n")
            metrics.flush()

    def summary(self) -> dict:
        return {"protected": self.protected, "standby": self.standby, "syncs": self.syncs, "pages": self.pages,
                "bytes": self.bytes, "heartbeats": self.heartbeats, "standby_losses": self.standby_losses,
                "pause_ms": _rounded(summary(self.pause_ms)),
                "output_delay_ms": _rounded(summary(self.output_delay_ms)),
                "pages_per_sync": _rounded(summary([float(n) for n in self.pages_per_sync]))}


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in figures.items()}
