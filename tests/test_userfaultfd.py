"""userfaultfd write-protection (pykvm.userfaultfd) on its own: an anonymous mapping written by a
syscall (which releases the GIL, as KVM_RUN does), then a real guest's own writes.

A write to a protected page blocks its writer until the page is unprotected: the tests check the
bytes before and after, never how long anything took."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading

import pytest

from pykvm import guestbuild
from pykvm.machine import Machine, MachineConfig
from pykvm.memory import PAGE_SIZE
from pykvm.userfaultfd import UserfaultfdUnavailable, WriteProtector
from tests.conftest import SerialCapture, requires_kvm


def _protector() -> WriteProtector:
    try:
        return WriteProtector()
    except UserfaultfdUnavailable as error:
        pytest.skip(str(error))


def _mapping(pages: int) -> tuple[mmap.mmap, int]:
    mapping = mmap.mmap(-1, pages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(mapping)
    address = ctypes.addressof(anchor)
    del anchor
    return mapping, address


def _write_from_pipe(view: memoryview, data: bytes) -> threading.Thread:
    """A thread that writes `data` into `view` with readv from a pipe: the kernel does the store."""
    read_end, write_end = os.pipe()
    os.write(write_end, data)
    os.close(write_end)

    def write() -> None:
        try:
            os.readv(read_end, [view])
        finally:
            os.close(read_end)

    writer = threading.Thread(target=write)
    writer.start()
    return writer


def test_a_write_to_a_protected_page_waits_until_it_is_unprotected():
    mapping, address = _mapping(16)
    view = memoryview(mapping)
    mapping[:] = b"o" * len(mapping)
    with _protector() as wp:
        wp.register(address, len(mapping))
        wp.protect(address, len(mapping))
        writer = _write_from_pipe(view[5 * PAGE_SIZE : 5 * PAGE_SIZE + 4], b"new!")
        assert wp.wait(10), "no fault came"
        assert wp.faults() == [address + 5 * PAGE_SIZE]
        copy = bytes(mapping[5 * PAGE_SIZE : 6 * PAGE_SIZE])  # the page as it was: the writer waits
        wp.unprotect(address + 5 * PAGE_SIZE, PAGE_SIZE)
        writer.join(10)
        assert not writer.is_alive()
        assert copy == b"o" * PAGE_SIZE
        assert mapping[5 * PAGE_SIZE : 5 * PAGE_SIZE + 5] == b"new!o"
        assert wp.faults() == []  # nothing else was written
        wp.unprotect(address, len(mapping))
        wp.unregister(address, len(mapping))
    view.release()
    mapping.close()


def test_a_page_never_touched_is_protected_too():
    """UFFD_FEATURE_WP_UNPOPULATED: without it the first write to an untouched page goes through."""
    mapping, address = _mapping(8)
    view = memoryview(mapping)
    with _protector() as wp:
        wp.register(address, len(mapping))
        wp.protect(address, len(mapping))
        writer = _write_from_pipe(view[3 * PAGE_SIZE : 3 * PAGE_SIZE + 2], b"hi")
        assert wp.wait(10), "no fault came for a page never touched"
        assert wp.faults() == [address + 3 * PAGE_SIZE]
        assert mapping[3 * PAGE_SIZE : 3 * PAGE_SIZE + 2] == b"\0\0"
        wp.unprotect(address, len(mapping))
        writer.join(10)
        assert mapping[3 * PAGE_SIZE : 3 * PAGE_SIZE + 2] == b"hi"
    view.release()
    mapping.close()


@requires_kvm
def test_a_guest_write_to_a_protected_page_faults_to_the_handler(guest_images):
    """The `dirty` guest rewrites its pages from KVM_RUN: with its RAM protected, each write
    it makes comes to our handler as a fault on one of those pages, and the guest goes on once
    the handler unprotects them."""
    output = SerialCapture()
    with _protector() as wp, Machine(MachineConfig(), serial_output=output) as machine:
        machine.load(guestbuild.image_path("dirty"), cmdline="pages=16")
        slot = machine.vm.memory.slots[0]
        wp.register(slot.host_addr, slot.size)
        machine.vm.start()
        output.wait_for(b"pages/s")
        seen: list[int] = []
        enough = threading.Event()
        stop_r, stop_w = os.pipe()

        def handle() -> None:
            while stop_r not in wp.wait(None, stop_r):
                for address in wp.faults():
                    seen.append(address)
                    wp.unprotect(address, PAGE_SIZE)
                if len(seen) >= 16:
                    enough.set()

        handler = threading.Thread(target=handle)
        handler.start()
        try:
            wp.protect(slot.host_addr, slot.size)
            assert enough.wait(30), f"only {len(seen)} faults"
            printed = output.data.count(b"pages/s")
            output.wait_for(b"pages/s", count=printed + 1)  # the guest still runs
        finally:
            wp.unprotect(slot.host_addr, slot.size)
            os.write(stop_w, b"x")
            handler.join(10)
            machine.vm.stop(0, "test done")
        base = int(output.data.split(b"base=")[1].split()[0], 16)
        guest_pages = {slot.host_addr + base + i * PAGE_SIZE for i in range(16)}
        assert guest_pages & set(seen), "no fault on the pages the guest rewrites"
        assert all(address % PAGE_SIZE == 0 and slot.host_addr <= address < slot.host_addr + slot.size
                   for address in seen)
        assert b"FAIL" not in output.data
