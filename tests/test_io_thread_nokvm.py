"""The I/O thread's polling before it sleeps: the adaptive window, and the look for events that
never sleeps. (The thread itself serves every virtio test that runs a guest.)"""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from pykvm.devices.virtio.io_thread import PollWindow, poll_for

pytestmark = pytest.mark.nokvm


def test_the_window_grows_while_polling_would_bridge_the_gaps_and_closes_on_a_long_one():
    window = PollWindow()
    assert window.seconds == 0  # a new thread sleeps at once
    seen, expected, step = [], [], PollWindow.START
    while step < PollWindow.MAX:  # START, 2 START, 4 START, ... then MAX
        expected.append(step)
        step *= 2
    expected.append(PollWindow.MAX)
    for _ in expected:  # each event came just after the window closed, within MAX
        window.waited(window.seconds + 1e-6)
        seen.append(window.seconds)
    assert seen == expected and len(expected) > 2
    window.waited(PollWindow.MAX)  # at most MAX: kept
    window.waited(PollWindow.MAX / 2)  # found while polling: the window fits
    assert window.seconds == PollWindow.MAX
    window.waited(PollWindow.MAX + 1e-6)  # a quiet spell: sleep at once from now on
    assert window.seconds == 0
    window.waited(1.0)
    assert window.seconds == 0
    window.waited(1e-6)  # busy again
    assert window.seconds == PollWindow.START


@pytest.fixture
def watched():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    yield poller, fd
    poller.close()
    os.close(fd)


class FirstLookSeen:
    """The poller, telling when its first look is over (the event is written only after it)."""

    def __init__(self, poller: select.epoll) -> None:
        self.poller, self.looked = poller, threading.Event()

    def poll(self, timeout: float) -> list:
        events = self.poller.poll(timeout)
        self.looked.set()
        return events


def test_polling_finds_an_event_that_comes_after_its_first_look(watched):
    poller, fd = watched
    watching = FirstLookSeen(poller)

    def write_once_looked() -> None:
        watching.looked.wait()
        os.eventfd_write(fd, 1)

    writer = threading.Thread(target=write_once_looked)
    writer.start()
    events = poll_for(watching, time.perf_counter() + 30)  # returns as soon as it sees the event
    writer.join()
    assert events == [(fd, select.EPOLLIN)]


def test_polling_past_its_window_looks_once_and_does_not_sleep(watched):
    poller, fd = watched
    assert poll_for(poller, time.perf_counter() - 1) == []  # nothing yet: back at once, empty
    os.eventfd_write(fd, 1)
    assert poll_for(poller, time.perf_counter() - 1) == [(fd, select.EPOLLIN)]  # the one look sees it
