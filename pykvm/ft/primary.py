"""The FT primary: runs the guest, and before any output leaves the machine, brings the standby
up to date and waits for its acknowledgement (event-driven sync, as in Kemari).

The output gate sits above the devices: when protection is on, this primary is every virtio
function's output gate (devices/virtio/gate.py). A device that meets an output request — a disk write,
flush, discard or write-zeroes, or a frame to transmit — holds that chain (taken from the ring,
not yet served) and tells the gate. The FT thread then syncs:

    pause the vCPUs and hold every device between requests       (Machine.quiesced)
    send the pages dirtied since the last sync (KVM's log | the VMM's bitmap), the disk changes
    completed since then, and the machine state (held chains are given back to their rings in
    it, so a standby that takes over serves them itself)
    wait for the Ack
    release the held outputs: the write reaches the disk, the frame the wire
    resume the vCPUs

What a sync carries is taken by ft.capture; its figures go to ft.metrics.

Between outputs, the FT thread sends heartbeats. If the standby is lost, the primary claims the
next epoch at the witness (ft.fencing): won, it releases what it holds and goes on unprotected
(`ft-protect` attaches a new standby with a full sync); lost, it fences itself. So does an FT
thread that fails: outputs it holds must never be released by accident, nor held forever silently.

The tests inject faults at points of a sync through ft.faults (PYKVM_FT_FAULT); each `faults.`
call below is one such point, and does nothing unless its fault was asked for.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import traceback
from typing import Callable, TextIO

from pykvm.transfer import channel, wire
from pykvm.transfer.tls import TlsCredentials
from pykvm.devices.virtio.blk import Blk
from pykvm.devices.virtio.gate import DiskChange, GatedFunction
from pykvm.devices.virtio.net import Net
from pykvm.ft import faults, protocol as p
from pykvm.ft.capture import capture
from pykvm.ft.fencing import EXIT_FENCED, Fenced, Fencing, Undecided
from pykvm.ft.metrics import PrimaryStats, SyncRecord
from pykvm.machine import Machine
from pykvm.run_control import StopKind
from pykvm.state import encode

CONNECT_TIMEOUT = 5.0


class FtError(Exception):
    """Protection could not be set up (the standby is unreachable or refused)."""


class Primary:
    """The output gate (`hold`) and the FT thread that syncs the standby and releases outputs."""

    def __init__(self, machine: Machine, *, timeout: float = 0.2, metrics: TextIO | None = None,
                 verify: bool = False, interval: float = 0.0, pipelined: bool = False,
                 fencing: Fencing | None = None, tls: TlsCredentials | None = None,
                 log: Callable[[str], None] = print) -> None:
        """`timeout` is the standby's patience: heartbeats go four times as often. `verify` sends
        a hash of all RAM with each sync; `interval` > 0 adds periodic syncs (trigger "timer") to
        the event-driven ones; `pipelined` resumes the guest before the sync is sent (see _sync).
        `fencing`: the witness and the epoch this primary won (None: no witness). `tls`: the
        credentials standbys are reached with (None: in the clear)."""
        self.machine = machine
        self.tls = tls
        self.fencing = fencing
        self.fenced = False
        self.interval = interval
        self.pipelined = pipelined
        self.timeout = timeout
        self.metrics = metrics
        self.verify = verify
        self.log = log
        self.stats = PrimaryStats()
        self._cond = threading.Condition()
        self._held: list[tuple[GatedFunction, int, float]] = []  # (function, queue index, when held)
        self._disk_changes: list[list[DiskChange]] = []
        self._sock: socket.socket | None = None
        self._protocol: p.FtConnection | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sync_lock = threading.Lock()  # one sync (or heartbeat) on the connection at a time
        self.devices = [f.device for f in machine.virtio]
        self.disks = [d for d in self.devices if isinstance(d, Blk)]

    # -- protection ------------------------------------------------------------------------------

    def protect(self, uri: str) -> None:
        """Connect to a standby, give it everything (full sync), and gate outputs from now on.
        Callable before the guest starts or while it runs, if not protected already."""
        if self.fenced or self.stats.protected:
            raise FtError("this primary has stood down (fenced)" if self.fenced else
                          f"already protected by {self.stats.standby}")
        try:
            sock = channel.connect(uri, self.tls, CONNECT_TIMEOUT)
        except OSError as error:
            if channel.is_tls_error(error):
                raise FtError(f"the standby at {uri} failed the TLS handshake: {channel.describe(error)}") from None
            raise FtError(f"cannot reach the standby at {uri}: {error.strerror or error}") from None
        sock.settimeout(max(self.timeout * 10, 2.0))
        protocol = p.FtConnection(p.Role.PRIMARY)
        try:
            wire.send_buffers(sock, protocol.send(self._hello()))
            reply = p.receive_event(sock, protocol)
        except (OSError, wire.ProtocolError) as error:
            sock.close()
            raise FtError(f"the standby at {uri} did not answer: {channel.describe(error)}") from None
        if isinstance(reply, p.Refused):
            sock.close()
            raise FtError(f"the standby at {uri} refused: {reply.reason}")
        with self._sync_lock:
            self._attach(uri, sock, protocol)

    def _hello(self) -> p.Hello:
        """What the standby must agree to: our machine, our witness and the epoch we hold there
        (the one we won at start-up or on losing the last standby), how we sync."""
        witness, epoch = (self.fencing.uri, self.fencing.epoch.number) if self.fencing else ("", 0)
        return p.Hello(encode(self.machine.config), witness, epoch, "pipelined" if self.pipelined else "sync",
                       self.interval * 1000)

    def _attach(self, uri: str, sock: socket.socket, protocol: p.FtConnection) -> None:
        self._sock, self._protocol = sock, protocol
        self.stats.standby = uri
        self.machine.vm.set_dirty_logging(True)
        for disk_index, disk in enumerate(self.disks):
            self._disk_changes.append([])
            disk.write_observer = lambda change, i=disk_index: self._disk_changes[i].append(change)
        # The gate goes in before the full sync quiesces the guest: an output from here on is
        # held, the full sync's state precedes it and its Ack releases it. (Installed after the
        # sync, an output could slip out between the guest's resumption and the gate.)
        for function in self.machine.virtio:
            function.set_output_gate(self)
        self.stats.protected = True
        try:
            self._sync("full", full=True)
        except (OSError, wire.ProtocolError) as error:
            self._lose_standby(str(error))
            if self.fenced:
                raise Fenced(f"the full sync to {uri} failed ({error}) and the standby won") from None
            raise FtError(f"the full sync to {uri} failed: {error}") from None
        self.log(f"ft primary: protected by {uri}")
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ft-primary", daemon=True)
            self._thread.start()

    def close(self, reason: str = "the primary's guest stopped") -> None:
        """An orderly end: the standby is told, and will not take over (a fenced primary tells
        it nothing: it has already lost)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.fencing is not None:
            self.fencing.give_up()
        if self._sock is not None and self._protocol is not None and not self.fenced:
            try:
                wire.send_buffers(self._sock, self._protocol.send(p.Goodbye(reason)))
            except (OSError, wire.ProtocolError):
                pass
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(5)

    # -- the gate (called from device I/O threads with their lock held: never blocks) --------------

    def hold(self, function: GatedFunction, queue_index: int) -> None:
        with self._cond:
            self._held.append((function, queue_index, time.perf_counter()))
            self._cond.notify_all()

    # -- the FT thread ----------------------------------------------------------------------------------

    def _run(self) -> None:
        """The FT thread. It must not die silently: the outputs it holds would wait forever, or
        go out unsynced if anything else released them. On an unexpected error it fences."""
        try:
            self._serve_outputs()
        except BaseException as error:
            self.log(traceback.format_exc().rstrip())
            self._fence(f"the primary's FT thread failed ({type(error).__name__}: {error}); "
                        "the outputs it held die with it")

    def _serve_outputs(self) -> None:
        heartbeat = self.timeout / 4
        wait = min(heartbeat, self.interval) if self.interval else heartbeat
        last_sync = time.monotonic()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._held or self._stopping, wait)
                if self._stopping:
                    return
                trigger = _trigger(self._held[0][0]) if self._held else None
            if trigger is None and self.interval and time.monotonic() - last_sync >= self.interval:
                trigger = "timer"
            if trigger is not None:
                last_sync = time.monotonic()
                faults.syncing_output(trigger)
            with self._sync_lock:  # _attach installs the gate under it: nothing slips out unsynced
                if self.fenced:
                    return
                if self._sock is None:
                    self._release_all()  # unprotected: outputs go at once
                    continue
                try:
                    if trigger is None:
                        self._heartbeat()
                    else:
                        self._sync(trigger)
                except (OSError, wire.ProtocolError) as error:
                    self._lose_standby(str(error))

    def _heartbeat(self) -> None:
        """A round trip: the standby hears that we live, and we hear that it does (a silent
        standby is lost like a failed sync, so a primary with no outputs notices a cut link)."""
        wire.send_buffers(self._sock, self._protocol.send(p.Heartbeat()))
        _expect(p.Heartbeat, p.receive_event(self._sock, self._protocol), "a heartbeat")
        self.stats.heartbeats += 1

    def _sync(self, trigger: str, *, full: bool = False) -> None:
        """One sync. Synchronous (Kemari): the guest stays paused until the standby's Ack.
        Pipelined: the guest resumes as soon as the sync is captured (its pages copied), and only
        the outputs that the captured state precedes wait for the Ack."""
        pipelined = self.pipelined and not full
        started = time.perf_counter()
        with contextlib.ExitStack() as quiesce:
            quiesce.enter_context(self.machine.quiesced("ft sync"))
            paused = time.perf_counter()
            covered = self._take_held()  # the outputs this sync's state precedes
            try:
                taken = capture(self.machine, self._protocol, trigger, self._disk_changes, self.disks,
                                full=full, copy=pipelined, verify=self.verify)
                sync = taken.sync
                if pipelined:
                    quiesce.close()  # the guest runs on while the sync travels
                resumed = time.perf_counter()
                sent_bytes = sum(faults.sending_sync(self._sock, sync, batch) for batch in taken.batches)
                sent = time.perf_counter()
                _expect(p.Ack, p.receive_event(self._sock, self._protocol), f"sync {sync}")
                faults.acknowledged(sync, self._sock)
            except BaseException:
                with self._cond:  # not acknowledged: they wait again (for whoever deals with the loss)
                    self._held[:0] = covered
                raise
            acked = time.perf_counter()
            delays = self._release(covered)
            if not pipelined:
                resumed = time.perf_counter()
        record = SyncRecord(sync, time.time(), trigger, taken.pages, sent_bytes, (resumed - paused) * 1000,
                            (sent - paused) * 1000, (acked - sent) * 1000, max(delays, default=0.0) * 1000)
        self._account(record, started)

    def _take_held(self) -> list[tuple[GatedFunction, int, float]]:
        with self._cond:
            held, self._held = self._held, []
        return held

    def _release(self, held: list[tuple[GatedFunction, int, float]]) -> list[float]:
        """Let these held outputs go, in the order held; returns how long each waited."""
        now = time.perf_counter()
        for function, queue_index, _ in held:
            function.release_held(queue_index)
        return [now - when for _, _, when in held]

    def _release_all(self) -> list[float]:
        return self._release(self._take_held())

    def _account(self, record: SyncRecord, started: float) -> None:
        stats = self.stats
        stats.syncs += 1
        stats.pages += record.pages
        stats.bytes += record.bytes
        stats.pause_ms.append(record.pause_ms)
        stats.pages_per_sync.append(record.pages)
        if record.trigger in ("blk", "net"):
            stats.output_delay_ms.append(record.output_delay_ms)
        if self.metrics is not None:
            self.metrics.write(json.dumps(record.__dict__) + "\n")
            self.metrics.flush()

    def _lose_standby(self, reason: str) -> None:
        """Claim the next epoch with the socket still open (a standby that sees it close has
        lost); won: go on unprotected, releasing what is held; lost: fence, releasing nothing."""
        if self.fencing is not None:
            self.log(f"ft primary: standby lost ({reason}); claiming epoch {self.fencing.epoch.number + 1} "
                     f"at {self.fencing.uri}")
            try:
                won = self.fencing.settle(reason)
            except Fenced as error:
                self._fence(str(error))
                return
            except Undecided:
                return  # the VMM is ending: nothing held goes out
            self.log(f"ft primary: won epoch {won.number}; continuing unprotected")
        else:
            self.log(f"ft primary: standby lost ({reason}); continuing unprotected")
        self.stats.standby_losses += 1
        self.stats.protected = False
        for function in self.machine.virtio:
            function.set_output_gate(None)
        for disk in self.disks:
            disk.write_observer = None
        self._disk_changes = []
        if self._sock is not None:
            self._sock.close()
        self._sock, self._protocol = None, None
        self._release_all()

    def _fence(self, reason: str) -> None:
        """Stand down: the vCPUs stop, the held outputs stay held (they die with this process),
        and the VMM exits with EXIT_FENCED."""
        with self._cond:
            self.fenced = self._stopping = True
            self._cond.notify_all()
        self.stats.protected = False
        self.log(f"fenced: {reason}")
        self.machine.vm.stop(EXIT_FENCED, f"fenced: {reason}", kind=StopKind.FAILED)

    def summary(self) -> dict:
        return self.stats.summary()


def _expect(event_type: type, event: p.Event, what: str) -> None:
    """The standby's answer must be `event_type`; a StandbyFault says why it gave up."""
    if isinstance(event, p.StandbyFault):
        raise wire.ProtocolError(f"the standby gave up at {what}: {event.reason}")
    if not isinstance(event, event_type):
        raise wire.ProtocolError(f"the standby answered {type(event).__name__} to {what}")


def _trigger(function: GatedFunction) -> str:
    return "net" if isinstance(function.device, Net) else "blk"
