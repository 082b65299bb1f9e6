"""SIGTERM, SIGHUP (and ^C's SIGINT) end a VMM cleanly: its sockets (control, NICs) removed, status 128+N, one
line `pykvm: ended by SIGTERM`.

Both are blocked in every thread and taken by one thread in sigwait(): delivered to whatever
thread the kernel picks (a vCPU's, an I/O thread's, the BLAS pool numpy starts at import), a
signal would wait for the main thread's next bytecode, which may never come while it blocks in a
wait. Threads inherit the mask at their start, so `block()` runs before anything is imported that
starts one (`pykvm/__main__.py`, the command's entry point); child processes inherit it too, and
a child VMM installs its own. That thread has the handler run in the main thread (`_thread.interrupt_main`) and wakes it
from any blocking call with the vCPU kick signal (EINTR). While the guest runs, the handler stops
the VM as `quit` does (from a thread: the main thread may hold the run-control lock) and the
normal end closes everything; before it runs (loading, waiting for a migration or a primary), the
handler raises Terminated, which unwinds through the same `finally` blocks. While the vCPUs start,
a signal waits until they have."""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from typing import TYPE_CHECKING

from pykvm.run_control import KICK_SIGNAL

if TYPE_CHECKING:
    from pykvm.machine import Machine

ENDING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # SIGINT: ^C, 130 as before
_running: list[Machine] = []  # the machine whose guest runs, once its vCPUs are started
_deferred: list[int] = []  # a signal that came while the vCPUs were starting
_starting = False


class Terminated(Exception):
    """SIGTERM or SIGHUP before the guest runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def block() -> None:
    """Block both in this thread and every thread it starts from now on."""
    signal.pthread_sigmask(signal.SIG_BLOCK, ENDING)


def install() -> None:
    """In the main thread: the handler, and the thread that waits for the signals. A signal
    ignored when we started stays ignored (`nohup pykvm ...` outlives its terminal)."""
    block()
    taken = {ending for ending in ENDING if signal.getsignal(ending) is not signal.SIG_IGN}
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(ENDING) - taken)  # ignored: discarded, never queued
    for ending in taken:
        signal.signal(ending, _handle)
    if not callable(signal.getsignal(KICK_SIGNAL)):
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)  # only to interrupt a blocking call
    threading.Thread(target=_wait_for_signals, args=(threading.main_thread().ident, taken), name="signals",
                     daemon=True).start()


def _wait_for_signals(main_thread: int, taken: set[int]) -> None:
    signum = signal.sigwait(taken)
    _thread.interrupt_main(signum)
    signal.pthread_kill(main_thread, KICK_SIGNAL)


def _handle(signum: int, frame: object) -> None:
    if _starting:
        _deferred.append(signum)
        return
    if not _running:
        raise Terminated(signum)
    name = signal.Signals(signum).name
    print(f"pykvm: ended by {name}", file=sys.stderr, flush=True)
    threading.Thread(target=_running[0].vm.stop, args=(128 + signum, f"ended by {name}"), name="signal-stop",
                     daemon=True).start()


def start(machine: Machine, *, started: bool = False) -> None:
    """Start the vCPUs (unless `started`); from then on, until ended(), a signal stops the guest."""
    global _starting
    _starting = True
    try:
        if not started:
            machine.vm.start()
        _running.append(machine)
    finally:
        _starting = False
    if _deferred:
        _handle(_deferred.pop(), None)


def ended() -> None:
    _running.clear()
