"""A virtio function's I/O thread and its ioeventfds.

Each queue has an eventfd. With ioeventfds in use, the platform signals it on the guest's notify
write, without an exit to Python (for why a device uses them or not, see
pykvm.machine.ioeventfd_for); the transport also signals it itself to have a queue looked at
(at DRIVER_OK, after a restore). The I/O thread waits on those eventfds and on the backend's fds
(a TAP, a socket) and calls the model. Before it sleeps it polls a while (PollWindow), looking
at the rings of the model's polled queues as well, whose notifies stay off meanwhile.
"""

from __future__ import annotations

import os
import select
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NamedTuple

from pykvm.devices import virtio as v
from pykvm.devices.platform import IoeventfdUnavailable, Platform
from pykvm.devices.virtio.virtqueue import QueueError

if TYPE_CHECKING:
    from pykvm.devices.virtio.transport import VirtioPciFunction


class IoeventfdTarget(NamedTuple):
    """A notify register an eventfd stands for: a write of `length` bytes at `address` (a port
    when `pio`), of value `datamatch` if not None."""

    fd: int
    address: int
    length: int
    pio: bool
    datamatch: int | None


class Ioeventfds:
    """A function's ioeventfd registrations with the platform. If the platform cannot register
    one, the function falls back to notifies that exit to Python (which work the same) for good,
    and says so once."""

    def __init__(self, platform: Platform, name: str, *, wanted: bool) -> None:
        self.platform, self.name = platform, name
        self.available = wanted  # False: not wanted, or fallen back
        self.registered: list[IoeventfdTarget] = []

    def register(self, targets: list[IoeventfdTarget]) -> None:
        if not self.available:
            return
        for target in targets:
            try:
                self.platform.register_ioeventfd(target.fd, target.address, target.length, pio=target.pio,
                                                 datamatch=target.datamatch)
            except IoeventfdUnavailable as error:
                v.log.warning("virtio-%s: no ioeventfd at %#x (%s); queue notifications exit to Python instead",
                              self.name, target.address, error)
                self.unregister()
                self.available = False
                return
            self.registered.append(target)

    def unregister(self) -> None:
        for target in self.registered:
            self.platform.unregister_ioeventfd(target.fd, target.address, target.length, pio=target.pio,
                                               datamatch=target.datamatch)
        self.registered = []


class IoThread:
    """The device's worker: waits on the queue eventfds and the backend's fds, calls the model.

    It calls the model with the function lock held, as a vCPU serving a notify in its exit does
    (VirtioPciFunction.notify), so a model never runs concurrently with itself or with register
    accesses from a vCPU.
    """

    def __init__(self, function: VirtioPciFunction, queues: int) -> None:
        self.function = function
        self.queue_eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(queues)]
        self.thread: threading.Thread | None = None
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._stopping = False

    def start(self) -> None:
        if self.thread is not None:
            return
        self._stopping = False
        self.thread = threading.Thread(target=self._loop, name=f"virtio-{self.function.device.name}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop and join (callable with the function lock held: the loop never waits for it
        while it is stopping)."""
        thread = self.thread
        if thread is None:
            return
        self._stopping = True
        os.eventfd_write(self._wake, 1)
        if thread is not threading.current_thread():
            _join_releasing(thread, self.function.lock)
        self.thread = None

    def kick(self, queue_index: int) -> None:
        """Have the thread look at queue `queue_index`, as a notify through an ioeventfd would."""
        os.eventfd_write(self.queue_eventfds[queue_index], 1)

    def rearm(self) -> None:
        """The set of fds to watch may have changed (e.g. rx buffers arrived)."""
        os.eventfd_write(self._wake, 1)

    def close(self) -> None:
        """After stop()."""
        for fd in self.queue_eventfds + [self._wake]:
            os.close(fd)

    def _loop(self) -> None:
        """Each wake-up serves everything that is ready, under one hold of the lock. The queue
        eventfds are edge-triggered: every notify is an edge, and the counter is never read back
        (a read per notify is a system call that tells nothing the edge did not). Idle, the thread
        first polls for the next event (for `window.seconds`), then sleeps in epoll.

        While it polls, it also looks at the rings of the model's `polled_queues` (a chain
        found there is served as a notify would be), and their notifies stay off: serve_queue
        leaves them off while `device.polled` names the queue, and only _end_ring_polling, just
        before the thread sleeps, turns them back on. Why: a notify is an exit, which costs the
        guest far more than a look costs this thread (net-echo with 8 outstanding: 0.27 exits an
        echo against 0.54, ~5% more echoes/s; ARCHITECTURE, *Threads*)."""
        function = self.function
        device = function.device
        queue_fds = {fd: i for i, fd in enumerate(self.queue_eventfds)}
        poller = select.epoll()
        try:
            poller.register(self._wake, select.EPOLLIN)
            for fd in queue_fds:
                poller.register(fd, select.EPOLLIN | select.EPOLLET)
            watched: tuple[int, ...] = ()
            window = PollWindow()
            with function.lock:
                wanted = self._wanted()
            pollable = device.polled_queues

            def rings_ready() -> list[tuple[int, int]]:
                return self._as_notifies(device.queues_waiting(device.polled))

            while not self._stopping:
                if wanted != watched:
                    for fd in set(watched) - set(wanted):
                        try:
                            poller.unregister(fd)
                        except OSError:
                            pass  # the backend was closed (detached): epoll already forgot it
                    for fd in set(wanted) - set(watched):
                        poller.register(fd, select.EPOLLIN)
                    watched = wanted
                idle_since = time.perf_counter()
                if window.seconds:
                    events = poll_for(poller, idle_since + window.seconds, rings_ready if device.polled else list)
                else:
                    events = []
                if not events and device.polled:
                    with function.lock:
                        events = self._end_ring_polling()
                if not events:  # (found while polling: the window fits as it is)
                    events = poller.poll()
                    window.slept(time.perf_counter() - idle_since)
                if self._stopping:
                    return
                with function.lock:
                    if window.seconds and function.serving:  # (only _end_ring_polling ends it)
                        device.polled = pollable
                    if function.serving:
                        for fd, _ in events:
                            try:
                                if fd in queue_fds:
                                    device.queue_notified(queue_fds[fd])
                                elif fd == self._wake:
                                    _drain(fd)
                                else:
                                    device.backend_ready(fd)
                            except QueueError as error:
                                function.needs_reset(str(error))
                                break
                    else:
                        _drain(self._wake)
                    wanted = self._wanted()  # what the model wants watched now, under the same hold
        finally:
            poller.close()

    def _end_ring_polling(self) -> list[tuple[int, int]]:
        """Before the thread sleeps (function lock held): the polled queues' notifies back on,
        then one more look at their rings. A chain the driver adds before it can see them on is
        found by this look, one after it is notified, as at the end of serve_queue."""
        device = self.function.device
        polled, device.polled = device.polled, ()
        rings = device.rings
        for index in polled:
            ring = rings[index] if index < len(rings) else None
            if ring is not None:
                ring.set_notification(True)
        return self._as_notifies(device.queues_waiting(polled))

    def _as_notifies(self, indices: list[int]) -> list[tuple[int, int]]:
        """Queues found with chains, as the events their notifies would have been."""
        return [(self.queue_eventfds[i], select.EPOLLIN) for i in indices]

    def _wanted(self) -> tuple[int, ...]:
        """The backend fds the model wants watched (call with the function lock held)."""
        device = self.function.device
        fds = device.backend_fds()
        if len(fds) == 1:  # the usual case, without a generator (this runs at every wake-up)
            return tuple(fds) if device.wants_backend(fds[0]) else ()
        return tuple(fd for fd in fds if device.wants_backend(fd))


@dataclass
class PollWindow:
    """How long the I/O thread polls for its next event before it sleeps, adapted to the gaps
    between events as QEMU's IOThreads adapt theirs (`poll-max-ns`, util/aio-posix.c): an event
    found while polling leaves the window as it is; one that came after the thread had given up
    and gone to sleep, but within MAX of its falling idle, doubles it, from START; a later one
    closes it, so a quiet device sleeps at once and costs no CPU. Why: waking from epoll costs
    a context switch in and one out, and on a core shared with the peer (an echo client, the FT
    standby) those cost more than a frame's own work. MAX is 128 us, inside KVM's own halt
    polling (halt_poll_ns, 200 us): a guest here answers a frame ~100 us after its interrupt, and
    with 64 us the window never opened for those gaps (a gap measured from a sleep includes the
    wake-up). Measured with net-echo (alternating runs): 8 echoes outstanding, 42,100-44,700
    echoes/s polling against 36,700-39,300 sleeping; one outstanding, 8,720-8,820 with MAX 128
    against 6,600-6,830 with MAX 64 (the thread then polls ~90% of the time it would have
    slept). The price, besides that CPU: a thread of this process that wants the interpreter
    lock while this one polls (a vCPU back from the guest with an exit to serve in Python, the
    FT thread) gets it at one of the poll's short system calls, not at once: tens of µs more
    wait, sometimes a few hundred. kv, whose disk is served in the vCPU's exits, ran at the same
    rate polling as sleeping, with FT and without (ARCHITECTURE, *Threads*)."""

    START = 4e-6
    MAX = 128e-6

    seconds: float = 0.0  # 0: sleep at once

    def slept(self, gap: float) -> None:
        """The thread polled its whole window, slept, and woke `gap` seconds after it fell idle."""
        if gap <= self.seconds:
            return  # (the event came just as the window closed)
        if gap > self.MAX:
            self.seconds = 0.0  # too long to poll for
        else:
            self.seconds = min(self.MAX, max(self.START, 2 * self.seconds))


def poll_for(poller: select.epoll, until: float,
             rings_ready: Callable[[], list[tuple[int, int]]] = list) -> list[tuple[int, int]]:
    """The poller's events, or else `rings_ready()`'s, from the first look that finds any,
    looking without sleeping until perf_counter() reaches `until` (at least once); the CPU is
    offered to any other thread between looks (`sched_yield`), so a peer that shares the core
    runs first."""
    events = poller.poll(0) or rings_ready()
    while not events and time.perf_counter() < until:
        os.sched_yield()
        events = poller.poll(0) or rings_ready()
    return events


def _join_releasing(thread: threading.Thread, lock: threading.RLock) -> None:
    """Join `thread` even if the caller holds `lock` (which the thread may be waiting for)."""
    depth = 0
    while lock._is_owned():  # type: ignore[attr-defined]
        lock.release()
        depth += 1
    try:
        thread.join()
    finally:
        for _ in range(depth):
            lock.acquire()


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass
