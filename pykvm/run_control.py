"""Pause, resume and stop: the rendezvous of the controller and the vCPU threads.

Pauses are owned: each pause() returns a Pause token, and the vCPUs run again only when every
token has been released. So a snapshot, an FT sync and the user's `stop` can overlap, and none of
them lets the guest run while another is still looking at it.

A paused or stopped VM is signalled by setting kvm_run.immediate_exit and sending KICK_SIGNAL to
each vCPU thread, so KVM_RUN itself returns EINTR; only then does a vCPU consult RunControl. The
run loop's fast path therefore pays nothing for being pausable.

Work that needs the vCPUs parked and lets them go at once after (an FT sync's capture in
pipelined and cow modes) can be handed to them instead (run_paused): the last to park runs it on
its own thread and goes straight back into the guest, rather than sleeping until a controller
releases it. ran_again tells when the vCPUs a release let go were all running again.
"""

from __future__ import annotations

import contextlib
import enum
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pykvm.vcpu import Vcpu

# Sent to a vCPU thread to knock it out of KVM_RUN. Its handler does nothing: the point is EINTR.
KICK_SIGNAL = signal.SIGUSR1


class RunState(enum.Enum):
    """The VM's life-cycle state; the value is what the control socket reports."""

    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class StopKind(enum.Enum):
    """What kind of end a StopReason is, for code that acts on it (the text is for people)."""

    ENDED = "ended"  # the guest or the host ended the run: power off, reset, debug exit, quit
    FAILED = "failed"  # the guest faulted or the VMM failed; the report says where
    MIGRATED = "migrated"  # the guest goes on running on a migration target


@dataclass(frozen=True)
class StopReason:
    """Why the VM stopped: the VMM's exit status, a one-line reason, and an optional report."""

    status: int
    reason: str
    report: str = ""
    kind: StopKind = StopKind.ENDED


class Pause:
    """One holder's pause of the VM; release it (once) with RunControl.resume or by leaving paused().
    (A pause that run_paused returns is released already.)"""

    __slots__ = ("owner", "let_go", "ran_again_at")

    def __init__(self, owner: str) -> None:
        self.owner = owner  # who holds it, for people: "snapshot", "ctl stop", "ft sync", ...
        self.let_go = False  # its release let the vCPUs run (it was the last pause held)
        self.ran_again_at: float | None = None  # perf_counter() when they all had left their park

    def __repr__(self) -> str:
        return f"Pause({self.owner!r})"


class _Job:
    """Work to run with every vCPU parked (RunControl.run_paused), and how it went."""

    __slots__ = ("work", "hold", "taken", "finished", "result", "error")

    def __init__(self, work: Callable[[], Any], hold: Pause) -> None:
        self.work, self.hold = work, hold
        self.taken = self.finished = False  # taken: a vCPU thread runs it; finished: it ran
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.work()
        except BaseException as error:  # the requester's to handle; the vCPU goes on
            self.error = error


class RunControl:
    """The rendezvous of the controller and the vCPU threads: pause, resume, stop.

    pause() returns only when every vCPU thread is parked outside KVM_RUN with no I/O half done:
    a vCPU parks only after a KVM_RUN returned EINTR, and KVM completes a pending IN/MMIO read
    before honouring immediate_exit, so the registers are final when the controller looks.
    """

    def __init__(self) -> None:
        lock = threading.RLock()
        self._cond = threading.Condition(lock)  # vCPUs parking and leaving, pause() waiting for them
        self._job_done = threading.Condition(lock)  # run_paused waiting for its work (or for a stop)
        self._vcpus: list[Vcpu] = []
        self._alive = 0  # vCPU threads still in their run loop
        self._parked = 0  # of those, parked for the current pause
        self._holds: list[Pause] = []  # the pauses not yet released; the vCPUs run when it is empty
        self._epoch = 0  # bumped when the last hold goes; parked threads wait for it to change
        self._leaving = 0  # vCPUs released from their park that have not yet left it
        self._let_go: Pause | None = None  # the pause whose release let them go (its ran_again_at)
        self._jobs: list[_Job] = []  # run_paused work waiting for the last vCPU to park
        self.stop_reason: StopReason | None = None

    @property
    def state(self) -> RunState:
        if self.stop_reason is not None:
            return RunState.STOPPED
        return RunState.PAUSED if self._holds else RunState.RUNNING

    def status(self) -> tuple[RunState, list[str]]:
        """The state and, while paused, the owners of the pauses held (oldest first), read together."""
        with self._cond:
            state = self.state
            return state, [hold.owner for hold in self._holds] if state is RunState.PAUSED else []

    def attach(self, vcpu: Vcpu) -> None:
        with self._cond:
            self._vcpus.append(vcpu)

    def entered(self) -> None:
        """A vCPU thread is about to start; counted before it runs so pause() cannot miss it."""
        with self._cond:
            self._alive += 1

    def pause(self, owner: str) -> Pause:
        """Hold the VM paused for `owner`; returns once every vCPU is parked (at once on a stopped
        VM). The vCPUs stay parked until this and every other Pause is released."""
        if any(v.thread is threading.current_thread() for v in self._vcpus):
            raise RuntimeError("a vCPU thread cannot pause the VM it is running")
        hold = self.request_pause(owner)
        with self._cond:  # a later holder waits too: the first may still be waiting for the vCPUs to park
            self._cond.wait_for(lambda: self._parked >= self._alive or self.stop_reason is not None)
        return hold

    def request_pause(self, owner: str) -> Pause:
        """Hold the VM paused for `owner` without waiting for the vCPUs to park; callable from a
        vCPU thread (a debugger's breakpoint handler), which parks at its next KVM_RUN. Whoever
        needs the vCPUs parked takes pause() as well."""
        hold = Pause(owner)
        with self._cond:
            self._holds.append(hold)
            if len(self._holds) == 1 and self.stop_reason is None:
                for vcpu in self._vcpus:
                    vcpu.kick()
        return hold

    def run_paused(self, owner: str, work: Callable[[], Any]) -> tuple[Any, Pause]:
        """Run `work` with every vCPU parked, then release the pause; returns what it returned (or
        raises what it raised) and the pause, for ran_again. The vCPU thread that parks last runs
        it and goes straight back into the guest: that vCPU is not woken for the pause to end, and
        holding the interpreter lock already, it waits for no turn to take it. (A parked vCPU took
        0.65 ms, median, after its release to run again during kv's FT syncs, and longer behind
        the copying that follows a cow sync.) The caller runs it itself if no vCPU will park for
        it: none has started, all are parked already for another pause, or the VM stops, in which
        case vCPUs may still be on their way out of the guest (as after pause() on a stop). Not
        to be called with a lock that the work takes (the vCPU running it would wait for it)."""
        if any(v.thread is threading.current_thread() for v in self._vcpus):
            raise RuntimeError("a vCPU thread cannot pause the VM it is running")
        job = _Job(work, Pause(owner))
        with self._cond:
            self._holds.append(job.hold)
            if self.stop_reason is None and self._parked < self._alive:
                self._jobs.append(job)
                if len(self._holds) == 1:
                    for vcpu in self._vcpus:
                        vcpu.kick()
                self._job_done.wait_for(lambda: job.finished or not job.taken and (
                    self.stop_reason is not None or self._parked >= self._alive))
                if not job.finished:  # stopped, or every vCPU gone or parked without taking it
                    self._jobs.remove(job)
        if not job.finished:
            job.run()
            self.resume(job.hold)
        if job.error is not None:
            raise job.error
        return job.result, job.hold

    def resume(self, hold: Pause) -> None:
        """Release `hold`; the vCPUs run again if it was the last one."""
        with self._cond:
            self._release(hold)

    def _release(self, hold: Pause) -> None:
        """resume(), with the lock held."""
        try:
            self._holds.remove(hold)  # by identity: a Pause has no __eq__
        except ValueError:
            raise RuntimeError(f"{hold!r} is not held (released twice?)") from None
        if self._holds or self.stop_reason is not None:
            return
        for vcpu in self._vcpus:
            vcpu.clear_kick()
        self._leaving, self._parked = self._parked, 0
        self._epoch += 1
        hold.let_go, self._let_go = True, hold
        if not self._leaving:  # no vCPU was parked (none had started): nothing to wait for
            hold.ran_again_at = time.perf_counter()
        self._cond.notify_all()

    def ran_again(self, hold: Pause, timeout: float | None = None) -> float | None:
        """When the vCPUs that `hold`'s release let go had all left their park (perf_counter()),
        waiting up to `timeout` for it: a parked vCPU thread must be woken and find a core, which
        on a busy host takes longer than many a pause. None if its release let no vCPU go (another
        pause holds them, or the VM stopped), or not within `timeout`."""
        with self._cond:
            if hold.let_go:
                self._cond.wait_for(lambda: hold.ran_again_at is not None or self.stop_reason is not None, timeout)
            return hold.ran_again_at

    @contextlib.contextmanager
    def paused(self, owner: str) -> Iterator[Pause]:
        """The VM held paused for the block; released however the block ends."""
        hold = self.pause(owner)
        try:
            yield hold
        finally:
            self.resume(hold)

    def stop(self, reason: StopReason) -> None:
        """Ask every vCPU to leave its run loop. The first reason given is the one kept."""
        with self._cond:
            if self.stop_reason is None:
                self.stop_reason = reason
            for vcpu in self._vcpus:
                vcpu.kick()
            self._cond.notify_all()
            self._job_done.notify_all()

    def wait_stopped(self, timeout: float | None = None) -> StopReason | None:
        with self._cond:
            done = self._cond.wait_for(lambda: self.stop_reason is not None and self._alive == 0, timeout)
            return self.stop_reason if done else None

    # -- called from vCPU threads ------------------------------------------------------------

    def interrupted(self) -> bool:
        """A vCPU's KVM_RUN returned EINTR. Park while paused; True means leave the run loop. The
        last vCPU to park runs the run_paused work waiting, then parks on if a pause remains."""
        with self._cond:
            if not self._holds or self.stop_reason is not None:
                return self.stop_reason is not None
            self._parked += 1
            if self._parked < self._alive or not self._jobs:
                self._cond.notify_all()  # (pause() waits for the last to park; run_paused does not)
                self._park()
                return self.stop_reason is not None
            jobs, self._jobs = self._jobs, []
            for job in jobs:
                job.taken = True
        for job in jobs:  # every vCPU parked, this one included (it is counted)
            job.run()
        with self._cond:
            for job in jobs:
                job.finished = True
                self._release(job.hold)
            self._cond.notify_all()
            self._job_done.notify_all()
            if self._holds and self.stop_reason is None:  # another pause holds the VM: park for it
                self._park()
            else:
                self._out_of_park()
            return self.stop_reason is not None

    def _park(self) -> None:
        """With the lock held: wait for the release, and be counted out of the park."""
        epoch = self._epoch
        self._cond.wait_for(lambda: self._epoch != epoch or self.stop_reason is not None)
        self._out_of_park()

    def _out_of_park(self) -> None:
        """This vCPU runs again; the last of those released marks when they all did (ran_again)."""
        if self.stop_reason is None and self._leaving:
            self._leaving -= 1
            if not self._leaving and self._let_go is not None:
                self._let_go.ran_again_at = time.perf_counter()
                self._cond.notify_all()

    def left(self) -> None:
        with self._cond:
            self._alive -= 1
            self._cond.notify_all()
            self._job_done.notify_all()
