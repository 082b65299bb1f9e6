"""The FT primary: runs the guest, and before any output leaves the machine, brings the standby
up to date and waits for its acknowledgement (event-driven sync, as in Kemari).

The output gate sits above the devices: when protection is on, this primary is the output gate
(devices/virtio/gate.py) of every NIC, and of every disk if the disks are shared (ft.disk_mode;
replicated disks complete their writes at once and ship them with the next sync). A device that
meets an output request — a frame to transmit; with shared disks a disk write, flush, discard or
write-zeroes — holds that chain (taken from the ring, not yet served) and tells the gate; the
outputs queued behind it are held too, so one sync releases them all. The FT thread then syncs:

    pause the vCPUs and hold every device between requests       (Machine.quiesced)
    send the pages dirtied since the last sync (KVM's log | the VMM's bitmap), the disk changes
    completed since then (replicated disks), and the machine state (held chains are given back
    to their rings in it, so a standby that takes over serves them itself)
    wait for the Ack (and for this primary's flush of the disks the sync wrote: ft.disk_mode)
    release the held outputs: the write reaches the disk, the frame the wire; resume the vCPUs

In pipelined and cow modes, where the guest runs on once the sync is taken, the vCPU that parks
last takes it on its own thread and goes straight back into the guest (Machine.run_quiesced):
a parked vCPU woken by the FT thread took longer to run again (0.65 ms, median, during kv's
syncs here) than most of the work of the pause itself.

What a sync carries is taken by ft.capture; its figures go to ft.metrics. In cow mode (ft.cow)
the guest runs while the pages are copied out under write-protection, and a sync may start
before the last one's Ack: that sync's outputs go at its Ack, read between the next one's steps.

Between outputs, the FT thread sends heartbeats. A primary that lost its standby flushes its disks,
then claims the next epoch at the witness (ft.fencing): won, it releases what it holds and goes on
unprotected (`ft-protect` attaches a new standby with a full sync); lost, or a failed flush, it
fences itself. So does a failing FT thread: what it holds must never leave by accident, nor wait forever.

The tests inject faults at points of a sync through ft.faults (PYKVM_FT_FAULT); each `faults.`
call below is one such point, and does nothing unless its fault was asked for.
"""

from __future__ import annotations

import contextlib
import functools
import os
import select
import socket
import threading
import time
import traceback
from typing import Callable, TextIO

from pykvm.transfer import wire
from pykvm.transfer.page_arena import PageArena
from pykvm.transfer.tls import TlsCredentials
from pykvm.devices.virtio.blk import Blk
from pykvm.devices.virtio.gate import GatedFunction
from pykvm.ft import faults, protocol as p
from pykvm.ft.capture import capture
from pykvm.ft.disk_mode import OwnFlushFailed, ReplicatedDisks, identities
from pykvm.ft.cow import CowMemory, readable
from pykvm.ft.fencing import EXIT_FENCED, Fenced, Fencing, Undecided
from pykvm.ft.reach import FtError, greet_standby
from pykvm.ft.metrics import InFlight, PrimaryStats, output_trigger
from pykvm.ft.state_parts import StateSender
from pykvm.ft.trace import OFF, FtTrace
from pykvm.machine import Machine
from pykvm.run_control import StopKind
from pykvm.state import encode
from pykvm.userfaultfd import UserfaultfdUnavailable

# Bytes written to replicated disks since the last sync that make the next one start (it reads them
# with the guest paused: kept well below the standby's patience)
DISK_BACKLOG = 2 << 20
RAN_AGAIN_PATIENCE = 0.005  # s a synchronous sync waits (holding the connection) for its vCPUs to run again
_UNFLUSHED = "a disk the guest flushed cannot be flushed here: {}"  # the guest was told its data is safe: fence


class Primary:
    """The output gate (`hold`) and the FT thread that syncs the standby and releases outputs."""

    def __init__(self, machine: Machine, *, timeout: float = 0.2, metrics: TextIO | None = None,
                 verify: bool = False, interval: float = 0.0, mode: str = "sync",
                 fencing: Fencing | None = None, tls: TlsCredentials | None = None, disk_mode: str = "replicated",
                 log: Callable[[str], None] = print, trace: FtTrace = OFF) -> None:
        """`timeout` is the standby's patience: heartbeats go four times as often. `verify` sends
        a hash of all RAM with each sync; `interval` > 0 adds periodic syncs (trigger "timer") to
        the event-driven ones; `mode` (protocol.SYNC_MODES): when the guest resumes (see _sync).
        `fencing`: the witness and the epoch this primary won (None: no witness). `tls`: the
        credentials standbys are reached with (None: in the clear). `disk_mode`: "replicated" or
        "shared" (ft.disk_mode). `trace`: where each sync's phases are told (--trace-ft)."""
        self.machine = machine
        self.trace = trace
        self.tls = tls
        self.fencing = fencing
        self.fenced = False
        self.fence_reason = ""  # why, once fenced
        self.interval, self.disk_mode, self.mode = interval, disk_mode, mode
        self._cow: CowMemory | None = None  # cow mode: the write-protection of guest RAM, while protected
        self._in_flight: list[InFlight] = []  # cow mode: syncs sent, awaiting their Ack, oldest first
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # hold() wakes an ack wait
        self.timeout = timeout
        self.metrics = metrics
        self.verify = verify
        self.log = log
        self.stats = PrimaryStats()
        self._cond = threading.Condition()
        self._held: list[tuple[GatedFunction, int, float]] = []  # (function, queue index, when held)
        self._sock: socket.socket | None = None
        self._protocol: p.FtConnection | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._sync_lock = threading.Lock()  # one sync (or heartbeat) on the connection at a time
        self._copies = PageArena()  # pipelined: where a sync's pages are copied while the guest is paused
        self._states = StateSender()  # the state's parts as last sent: a sync sends those that changed
        self.devices = [f.device for f in machine.virtio]
        self.disks = [d for d in self.devices if isinstance(d, Blk)]
        self._replicated = ReplicatedDisks(self.disks if disk_mode == "replicated" else [], self._wake_for_disk,
                                           DISK_BACKLOG)

    # -- protection ------------------------------------------------------------------------------

    def protect(self, uri: str) -> None:
        """Connect to a standby, give it everything (full sync), and gate outputs from now on.
        Callable before the guest starts or while it runs, if not protected already."""
        if self.fenced or self.stats.protected:
            raise FtError("this primary has stood down (fenced)" if self.fenced else
                          f"already protected by {self.stats.standby}")
        if self.mode == "cow" and self._cow is None:
            try:
                self._cow = CowMemory(self.machine.vm.memory)
            except UserfaultfdUnavailable as error:
                raise FtError(f"--ft-mode cow needs userfaultfd write-protection: {error}") from None
        sock, protocol = greet_standby(uri, self.tls, self._hello(), max(self.timeout * 10, 2.0))
        with self._sync_lock:
            self._attach(uri, sock, protocol)

    def _hello(self) -> p.Hello:
        """What the standby must agree to: our machine, our witness and the epoch we hold there
        (the one we won at start-up or on losing the last standby), how we sync."""
        witness, epoch = (self.fencing.uri, self.fencing.epoch.number) if self.fencing else ("", 0)
        shared = self.disk_mode == "shared"
        return p.Hello(encode(self.machine.config), witness, epoch, self.mode,
                       self.interval * 1000, disk_mode=self.disk_mode,
                       shared_disks=identities([disk.disk for disk in self.disks]) if shared else ())

    def _attach(self, uri: str, sock: socket.socket, protocol: p.FtConnection) -> None:
        self._sock, self._protocol = sock, protocol
        self.stats.standby = uri
        self.machine.vm.set_dirty_logging(True)
        shared = self.disk_mode == "shared"
        self._replicated.attach()  # each write, once made, is recorded for the next sync (a full one reads it all)
        # The gate goes in before the full sync quiesces the guest: an output from here on is
        # held, the full sync's state precedes it and its Ack releases it. (Installed after the
        # sync, an output could slip out between the guest's resumption and the gate.)
        for function in self.machine.virtio:
            if shared or not isinstance(function.device, Blk):
                function.set_output_gate(self)
        self.stats.protected = True
        try:
            self._sync("full", full=True)
        except (OSError, wire.ProtocolError) as error:
            self._lose_standby(str(error))
            if self.fenced:
                raise Fenced(f"the full sync to {uri} failed ({error}); {self.fence_reason}") from None
            raise FtError(f"the full sync to {uri} failed: {error}") from None
        except OwnFlushFailed as error:  # as in a sync of the FT thread's (_serve_outputs)
            self._fence(_UNFLUSHED.format(error))
            raise Fenced(f"protecting by {uri}: {self.fence_reason}") from None
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
        if self._cow is not None:
            self._cow.close()
            self._cow = None
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if not self.fenced:
            self._replicated.flush_own("the primary ends", self.log)

    # -- the gate (called from device I/O threads with their lock held: never blocks) --------------

    def hold(self, function: GatedFunction, queue_index: int) -> None:
        with self._cond:
            self._held.append((function, queue_index, time.perf_counter()))
            self._cond.notify_all()
        if self._in_flight:  # the FT thread may be waiting for an Ack rather than on the condition
            with contextlib.suppress(OSError):  # full: it is woken already; closed: it is gone
                os.write(self._wake_w, b"\0")

    def _wake_for_disk(self) -> None:
        """Replicated disk data piled up (ReplicatedDisks): a sync starts (trigger "disk")."""
        with self._cond:
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
            with self._cond:  # (with syncs awaiting their Ack, _await_acks waits instead)
                self._cond.wait_for(lambda: self._held or self._stopping or self._replicated.backlog >= DISK_BACKLOG,
                                    0 if self._in_flight else wait)
                if self._stopping:
                    return
                trigger = output_trigger(self._held[0][0]) if self._held else (
                    "disk" if self._replicated.backlog >= DISK_BACKLOG else None)
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
                    if trigger is not None:
                        self._sync(trigger)
                    elif self._in_flight:
                        self._await_acks(wait)
                    else:
                        self._heartbeat()
                except (OSError, wire.ProtocolError) as error:
                    self._lose_standby(str(error))
                except OwnFlushFailed as error:  # the guest was told its data is safe
                    self._fence(_UNFLUSHED.format(error))
                    return

    def _heartbeat(self) -> None:
        """A round trip: the standby hears that we live, and we hear that it does (a silent
        standby is lost like a failed sync, so a primary with no outputs notices a cut link)."""
        wire.send_buffers(self._sock, self._protocol.send(p.Heartbeat()))
        p.expect_answer(p.Heartbeat, p.receive_event(self._sock, self._protocol), "a heartbeat")
        self.stats.heartbeats += 1

    def _sync(self, trigger: str, *, full: bool = False) -> None:
        """One sync. Synchronous (Kemari): the guest stays paused until the standby's Ack.
        Pipelined: the guest resumes as soon as the sync is captured (its pages copied), and only
        the outputs that the captured state precedes wait for the Ack. Cow: the guest resumes once
        the state is captured and RAM write-protected (ft.cow); the Ack is read later (_collect_acks).
        The pause is timed from the request to pause the vCPUs to their running again (_record)."""
        cow = self._cow if not full else None
        pipelined = self.mode == "pipelined" and not full
        if cow is not None:
            if len(self._in_flight) >= p.MAX_IN_FLIGHT:
                self._collect_acks(block=True)
            self._collect_acks(block=False)  # outputs acknowledged meanwhile go before this sync
        trace, number = self.trace, self._protocol.next_sync
        with contextlib.ExitStack() as armed, contextlib.ExitStack() as quiesce:
            if cow is not None:
                armed.callback(cow.disarm)  # done once the pages are copied; here if the sync fails
                cow.arm([function.lock for function in self.machine.virtio])  # not paused time (see ft.cow)
            requested = time.perf_counter()
            take = functools.partial(self._take_sync, number, requested, trigger, full=full, pipelined=pipelined, cow=cow)
            if pipelined or cow is not None:  # the vCPU that parks last takes the sync and runs on
                (covered, flushing, taken), pause = self.machine.run_quiesced("ft sync", take)
                resumed = self.machine.vm.control.ran_again(pause, 0) or time.perf_counter()
                if trace.on:
                    trace.sync(number, f"resumed: the guest was paused {(resumed - requested) * 1000:.2f} ms")
            else:
                pause = quiesce.enter_context(self.machine.quiesced("ft sync"))
                covered, flushing, taken = take()
            try:
                sent_bytes = sum(faults.sending_sync(self._sock, taken.sync, batch) for batch in taken.batches)
                faults.sync_sent(taken.sync)
                sent = time.perf_counter()
                if trace.on:
                    trace.sync(number, f"sent {taken.pages} pages, {sent_bytes} bytes in {(sent - requested) * 1000:.2f} ms "
                                       "from the pause")
                done = InFlight(taken.sync, trigger, taken.pages, sent_bytes, covered, flushing, requested, sent,
                                resumed if pipelined or cow else 0.0, pause)
                if cow is not None:
                    self._in_flight.append(done)
                    covered = []
                    self._collect_acks(block=False)
                    return
                p.expect_answer(p.Ack, p.receive_event(self._sock, self._protocol), f"sync {taken.sync}")
                faults.acknowledged(taken.sync, self._sock, covered)
                acked = time.perf_counter()
                delays = self._release_acknowledged(done)
            except BaseException:
                with self._cond:  # not released: they wait again (for whoever deals with the loss)
                    self._held[:0] = covered
                raise
            if trace.on:
                trace.sync(number, f"ack after {(acked - sent) * 1000:.2f} ms; released {len(covered)} outputs")
        if not pipelined:  # (its vCPUs are woken now: wait for them, briefly, for the pause's end)
            done.resumed = self.machine.vm.control.ran_again(pause, RAN_AGAIN_PATIENCE) or time.perf_counter()
            if trace.on:
                trace.sync(number, f"resumed: the guest was paused {(done.resumed - requested) * 1000:.2f} ms")
        self._record(done, acked, delays)

    def _take_sync(self, number: int, requested: float, trigger: str, *, full: bool, pipelined: bool,
                   cow: CowMemory | None) -> tuple:
        """With the machine quiesced (no output can be held meanwhile): the capture, the flush of the
        disks the sync wrote (started), and the outputs its state precedes."""
        paused = time.perf_counter()
        faults.capturing(trigger)
        changes = self._replicated.take(full)
        flushing = self._replicated.flush_for_sync(number, full=full)  # while the sync travels
        taken = capture(self.machine, self._protocol, trigger, changes, self._replicated.disks, self._states,
                        full=full, verify=self.verify, copy_into=self._copies if pipelined else None, cow=cow)
        covered = self._take_held()
        if self.trace.on:
            self.trace.sync(number, f"paused in {(paused - requested) * 1000:.2f} ms ({trigger})")
            dirty = "the dirty log" if cow is not None else f"{taken.pages} dirty pages"  # cow: counted once running
            self.trace.sync(number, f"harvested {dirty}, the disk changes and the state; "
                                    f"{len(covered)} outputs held" + (" (the guest resumes now)" if pipelined or cow else ""))
        return covered, flushing, taken

    def _record(self, done: InFlight, acked: float, delays: list[float]) -> None:
        """Sync `done` is acknowledged and its outputs released: into the stats and the metrics.
        Its pause ends when its vCPUs ran again, the last out of its park (0.65 ms after their
        release, median, during kv's syncs, when the FT thread woke them), if known by now; else
        at the time looked at before (`resumed`), when they had not all run yet: a lower bound."""
        done.resumed = self.machine.vm.control.ran_again(done.pause, 0) or done.resumed
        self.stats.add(done.record(acked, delays, disk_mode=self.disk_mode, mode=self.mode), self.metrics)

    def _collect_acks(self, *, block: bool) -> None:
        """Cow mode: read the Acks that have come (`block`: wait for the oldest's), release each
        acknowledged sync's outputs, in order, and record it."""
        while self._in_flight and (block or readable(self._sock)):
            block = False
            oldest = self._in_flight[0]
            p.expect_answer(p.Ack, p.receive_event(self._sock, self._protocol), f"sync {oldest.sync}")
            faults.acknowledged(oldest.sync, self._sock, oldest.covered)
            acked = time.perf_counter()
            self._in_flight.pop(0)
            self._record(oldest, acked, self._release_acknowledged(oldest))

    def _await_acks(self, wait: float) -> None:
        """Cow mode, no output to sync: wait up to `wait` for an Ack or a new output. An Ack
        later than the socket's timeout loses the standby, as a synchronous sync's would."""
        ready, _, _ = select.select([self._sock, self._wake_r], [], [], 0 if readable(self._sock) else wait)
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        if self._sock in ready or readable(self._sock):
            self._collect_acks(block=True)
        elif self._in_flight and time.perf_counter() - self._in_flight[0].sent > self._sock.gettimeout():
            raise TimeoutError(f"no Ack for sync {self._in_flight[0].sync}")

    def _take_held(self) -> list[tuple[GatedFunction, int, float]]:
        with self._cond:
            held, self._held = self._held, []
        return held

    def _release_acknowledged(self, done: InFlight) -> list[float]:
        """Sync `done` is acknowledged: its outputs go once the primary's own flush of the disks the
        guest flushed in it is done too (ft.disk_mode; OwnFlushFailed fences)."""
        if done.flushing is not None:
            done.flushing.result()
        return self._release(done.covered)

    def _release(self, held: list[tuple[GatedFunction, int, float]]) -> list[float]:
        """Let these held outputs go, in the order held; returns how long each waited."""
        now = time.perf_counter()
        for function, queue_index, _ in held:
            function.release_held(queue_index)
        return [now - when for _, _, when in held]

    def _release_all(self) -> list[float]:
        return self._release(self._take_held())

    def _lose_standby(self, reason: str) -> None:
        """Flush the disks here (gates still in: an output made meanwhile may follow a flush durable
        nowhere yet), then claim the next epoch with the socket still open (a standby that sees it
        close has lost); won: go on unprotected, releasing what is held; lost, or a disk that cannot
        be flushed: fence, releasing nothing, and leave the epoch to a live standby, which can."""
        with self._cond:  # syncs sent but not acknowledged: their outputs are held again, first
            self._held[:0] = [output for done in self._in_flight for output in done.covered]
            self._in_flight = []
        if not self._replicated.flush_own(f"standby lost ({reason}); going on alone", self.log, alone=True):
            self._fence("a disk the guest flushed cannot be flushed here, and the standby that held it is lost")
            return
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
        self._replicated.detach()
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
        self.fence_reason = reason
        self.stats.protected = False
        self.log(f"fenced: {reason}")
        self.machine.vm.stop(EXIT_FENCED, f"fenced: {reason}", kind=StopKind.FAILED)

    def summary(self) -> dict:
        """The running totals (ft-stats), with the mode; in cow mode, the write-protect faults the
        guest's writes met during syncs, and how many of them copied a page aside."""
        cow = {"wp_faults": self._cow.faults, "copied_aside": self._cow.copied_aside} if self._cow else {}
        return {**self.stats.summary(), "mode": self.mode, **cow}
