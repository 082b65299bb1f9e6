"""The I/O thread's polling before it sleeps: the adaptive window, the look for events that never
sleeps, the thread going to sleep in epoll once its device is quiet (a stand-in device that
records what the thread calls; the real models run under every virtio test that boots a guest),
and virtio-net's transmit ring looked at while the thread polls, its notifies off meanwhile (the
real model on guest RAM, the guest's side of the rings written by the test)."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from pykvm.devices import virtio as v
from pykvm.devices.net_backends import SocketBackend
from pykvm.devices.virtio import io_thread
from pykvm.devices.virtio.io_thread import IoThread, PollWindow, poll_for
from pykvm.devices.virtio.net import F_MRG_RXBUF, TX, Net
from pykvm.memory import GuestMemory
from tests.test_virtio_net_nokvm import Driver, frames

pytestmark = pytest.mark.nokvm


def test_the_window_grows_while_events_come_soon_after_it_and_closes_on_a_long_gap():
    window = PollWindow()
    assert window.seconds == 0  # a new thread sleeps at once
    seen, expected, step = [], [], PollWindow.START
    while step < PollWindow.MAX:  # START, 2 START, 4 START, ... then MAX
        expected.append(step)
        step *= 2
    expected.append(PollWindow.MAX)
    for _ in expected:  # each event came just after the window closed, within MAX
        window.slept(window.seconds + 1e-6)
        seen.append(window.seconds)
    assert seen == expected and len(expected) > 2
    window.slept(PollWindow.MAX)  # at most MAX: kept
    assert window.seconds == PollWindow.MAX
    window.slept(PollWindow.MAX + 1e-6)  # a quiet spell: sleep at once from now on
    assert window.seconds == 0
    window.slept(1.0)
    assert window.seconds == 0
    window.slept(1e-6)  # busy again
    assert window.seconds == PollWindow.START


@pytest.fixture
def watched():
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    poller = select.epoll()
    poller.register(fd, select.EPOLLIN)
    yield poller, fd
    poller.close()
    os.close(fd)


class Looks:
    """The poller, keeping what each look found; the event is written once the first is over."""

    def __init__(self, poller: select.epoll) -> None:
        self.poller, self.found, self.first_over = poller, [], threading.Event()

    def poll(self, timeout: float) -> list:
        events = self.poller.poll(timeout)
        self.found.append(events)
        self.first_over.set()
        return events


def test_polling_returns_the_first_look_that_finds_an_event_coming_meanwhile(watched):
    poller, fd = watched
    looks = Looks(poller)

    def write_after_the_first_look() -> None:
        looks.first_over.wait()
        os.eventfd_write(fd, 1)

    writer = threading.Thread(target=write_after_the_first_look)
    writer.start()
    events = poll_for(looks, time.perf_counter() + 30)
    writer.join()
    assert events == [(fd, select.EPOLLIN)]
    assert looks.found[0] == [] and looks.found[-1] == events  # no look after the one that found it
    assert all(found == [] for found in looks.found[:-1])


def test_polling_past_its_window_looks_once_and_does_not_sleep(watched):
    poller, fd = watched
    assert poll_for(poller, time.perf_counter() - 1) == []  # nothing yet: back at once, empty
    os.eventfd_write(fd, 1)
    assert poll_for(poller, time.perf_counter() - 1) == [(fd, select.EPOLLIN)]  # the one look sees it


class QuietDevice:
    """A device with one queue and no backend, recording the notifies its I/O thread serves."""

    name = "quiet"
    polled_queues = polled = ()

    def __init__(self) -> None:
        self.notified: list[int] = []

    def backend_fds(self) -> list[int]:
        return []

    def queue_notified(self, index: int) -> None:
        self.notified.append(index)


class Function:
    """What an IoThread needs of its transport: the model, the lock, whether it serves."""

    def __init__(self, device=None) -> None:
        self.device, self.lock, self.serving = device or QuietDevice(), threading.RLock(), True

    def needs_reset(self, reason: str) -> None:
        raise AssertionError(f"the model was refused: {reason}")


def sleeping_in_epoll(tid: int) -> bool:
    """The thread is blocked in epoll_wait (what a thread that polls for ever never is)."""
    task = Path(f"/proc/self/task/{tid}")
    return (task / "stat").read_text().rpartition(")")[2].split()[0] == "S" and \
        (task / "wchan").read_text().strip() in ("do_epoll_wait", "ep_poll")


def test_the_thread_serves_each_notify_once_then_sleeps_in_epoll():
    function = Function()
    thread = IoThread(function, queues=1)
    thread.start()
    try:
        for _ in range(3):
            served = len(function.device.notified)
            thread.kick(0)
            deadline = time.monotonic() + 10
            while len(function.device.notified) == served or not sleeping_in_epoll(thread.thread.native_id):
                assert time.monotonic() < deadline, "the I/O thread never went to sleep in epoll"
                time.sleep(0.001)  # (a look at its state, every ms, until it is asleep)
            assert function.device.notified == [0] * (served + 1)
    finally:
        thread.stop()
        thread.close()
    assert thread.thread is None


class Window:
    """A poll window the test sets: the I/O thread polls for `seconds`, whatever the gaps."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def slept(self, gap: float) -> None:
        pass


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "no-notify-flag"])
def test_while_the_thread_polls_frames_go_out_with_no_notify_and_notifies_are_back_before_it_sleeps(
        tmp_path, monkeypatch, event_idx):
    vm_path, peer_path = str(tmp_path / "vm.sock"), str(tmp_path / "peer.sock")
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    peer.bind(peer_path)
    peer.settimeout(10)
    memory = GuestMemory(4 << 20)
    net = Net(SocketBackend(vm_path, peer_path), bytes.fromhex("525400123456"))
    driver = Driver(memory)
    for queue in driver.queues:
        queue.event_idx = event_idx
    window = Window(60.0)  # polling all through the first part, however slow the host
    monkeypatch.setattr(io_thread, "PollWindow", lambda: window)
    function = Function(net)
    thread = IoThread(function, queues=2)
    with function.lock:
        net.activate(memory, driver.queues, v.F_VERSION_1 | F_MRG_RXBUF | (v.F_RING_EVENT_IDX if event_idx else 0),
                     lambda queue: None)
    thread.start()
    try:
        thread.kick(TX)  # as DRIVER_OK does: the thread looks at the ring once, then polls it
        sent = frames(3)
        for frame in sent[:2]:
            driver.send(frame)  # and no notify: nothing but the polling thread can find these
            assert peer.recv(2048) == frame
            assert not driver.notify_wanted(TX)  # the device left notifies off
        window.seconds = 0.0  # the next idle spell is over at once: notifies back on, then sleep
        thread.rearm()
        deadline = time.monotonic() + 10
        while not sleeping_in_epoll(thread.thread.native_id):
            assert time.monotonic() < deadline, "the I/O thread never went to sleep in epoll"
            time.sleep(0.001)  # (a look at its state, every ms, until it is asleep)
        assert driver.notify_wanted(TX)  # asleep: the next frame must be notified, and is served
        driver.send(sent[2])
        thread.kick(TX)  # the notify, as the ioeventfd delivers it
        assert peer.recv(2048) == sent[2]
    finally:
        thread.stop()
        thread.close()
        net.close()
        peer.close()
        memory.close()
