"""Copy-on-write syncs (`--ft-mode cow`, after Avi Kivity's proposal on the Kemari thread): the
guest pauses only to harvest the dirty log and capture vCPU and device state, and runs while its
pages are copied out for the standby; a write that meets a page not yet copied copies it aside
first (userfaultfd write-protection, pykvm.userfaultfd, as QEMU's background snapshot does).

One sync, as CowMemory sees it:

    arm       every device held between requests: all of RAM is write-protected (an ioctl a slot,
              whatever the pages), inside the pause for small RAM, just before it for large RAM
              (ARM_IN_PAUSE_BYTES); a write that meets it before the pause is let go, the page
              just unprotected: its contents are still to come
    capture   guest paused: the dirty pages become PENDING (still protected, not yet copied);
              those written since the arm (unprotected already) are copied now
    gather    guest running again: the pending pages are copied, a chunk at a time, into rows
              that the frames are sent from; a write to a page still pending copies it aside
              first (the fault handler, or the writing VMM thread itself: see below)
    disarm    all of RAM unprotected; the page frames go out from the copies (the state went
              out already, right after the resume: see ft.capture)

The vCPUs wait for neither the copy nor the network: only a write that meets a protected page
waits, for one page copy and an ioctl (tens of µs). The dirty log is untouched by all this (KVM's
own write-protection and the VMM's bitmap are independent of userfaultfd's), so the next sync
harvests what was written meanwhile, copies included.

The fault handler is a Python thread, so a VMM thread that wrote a protected page while holding
the GIL would wait for a handler that cannot run: the process would hang. VMM writes go through
GuestMemory.write_barrier (`prepare`), which does the handler's work in the writing thread first.
The devices, the only VMM writers of guest RAM at run time, write under their function's lock,
and `arm` protects with all of those locks held: no device is between its barrier and its write
when protection comes. Syscalls that write guest RAM (preadv, readv) release the GIL: their
faults go to the handler like the vCPUs'.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import threading
from typing import Iterable

import numpy as np

from pykvm.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, MemorySlot
from pykvm.transfer.page_arena import PageArena
from pykvm.userfaultfd import WriteProtector

FREE, PROTECTED, PENDING = 0, 1, 2  # a page: writable; protected but not needed; protected, still to copy
GATHER_PAGES = 1024  # pages copied per lock hold while gathering
# RAM up to this size is protected inside the pause (~0.5 ms for 64 MiB here), so that no write
# meets the protection before the capture; larger RAM just before the pause, as its protection
# costs KVM an invalidation that grows with it (~50 ms for 1 GiB here) and would be paused time.
ARM_IN_PAUSE_BYTES = 256 << 20
_PAGE_ROW = np.dtype((np.void, PAGE_SIZE))


class CowMemory:
    """Write-protection of guest RAM for copy-on-write syncs, its fault handler thread, and the
    copies: what a sync sends from (`gather`). Created once per protected primary (`close` ends it)."""

    def __init__(self, memory: GuestMemory) -> None:
        """Raises UserfaultfdUnavailable if this host cannot write-protect guest RAM."""
        self.memory = memory
        self.wp = WriteProtector()
        self._registered: list[MemorySlot] = []
        try:
            for slot in memory.slots:
                self.wp.register(slot.host_addr, slot.size)
                self._registered.append(slot)
        except BaseException:
            self._unregister()
            raise
        self._states = {slot.index: bytearray(slot.pages) for slot in memory.slots}  # FREE/PROTECTED/PENDING
        self._lock = threading.Lock()
        self._copies: dict[tuple[int, int], np.ndarray] = {}  # (slot, page) -> its contents at the capture
        self._copy_rows, self._gather_rows = PageArena(), PageArena()
        self.armed = False
        self.arm_in_pause = memory.size <= ARM_IN_PAUSE_BYTES
        self.faults = 0  # write-protect faults served (writes by the guest, or syscalls, that met a protected page)
        self.copied_aside = 0  # pages copied aside because a write came before the gather
        self._stop_r, self._stop_w = os.pipe()
        self._handler = threading.Thread(target=self._serve_faults, name="ft-cow-faults", daemon=True)
        self._handler.start()
        memory.write_barrier = self.prepare

    # -- one sync -----------------------------------------------------------------------------------

    def arm(self, device_locks: Iterable[contextlib.AbstractContextManager]) -> None:
        """Write-protect all of RAM (guest running). `device_locks`: every device's lock, held
        while protecting, so that no device is between its write barrier and its write."""
        self._copy_rows.reset()
        self._gather_rows.reset()
        self._copies.clear()
        self.armed = True
        with contextlib.ExitStack() as held:
            for lock in device_locks:
                held.enter_context(lock)
            for slot in self.memory.slots:
                with self._lock:
                    self._states[slot.index][:] = bytes([PROTECTED]) * slot.pages
                # One ioctl per slot, without the lock: each ioctl costs KVM an invalidation of
                # its range (many small ones cost far more), and the fault handler must serve the
                # pages protected already meanwhile. Devices are held, so no barrier runs now.
                self.wp.protect(slot.host_addr, slot.size)

    def capture(self, page_lists: list[tuple[MemorySlot, np.ndarray]]) -> None:
        """The guest is paused: these pages are the sync's. The ones still protected become
        PENDING; the ones written since `arm` (writable already) are copied now."""
        with self._lock:
            for slot, pages in page_lists:
                states = np.frombuffer(self._states[slot.index], dtype=np.uint8)
                now = states[pages]
                states[pages[now == PROTECTED]] = PENDING
                written = pages[now == FREE]
                if len(written):
                    rows = self._copy_rows.take(len(written))
                    np.take(_ram_rows(slot), written, out=rows.view(_PAGE_ROW).reshape(-1))
                    for page, row in zip(written.tolist(), rows):
                        self._copies[slot.index, page] = row

    def gather(self, slot: MemorySlot, pages: np.ndarray) -> memoryview:
        """The contents of `pages` (a sync's, ascending) as of its capture, copied into rows that
        stay valid until the next `arm`; afterwards a write to them needs no copy."""
        data = self._gather_rows.take(len(pages))
        rows = data.view(_PAGE_ROW).reshape(-1)
        ram = _ram_rows(slot)
        states = np.frombuffer(self._states[slot.index], dtype=np.uint8)
        for start in range(0, len(pages), GATHER_PAGES):
            chunk = pages[start : start + GATHER_PAGES]
            with self._lock:
                now = states[chunk]
                pending = now == PENDING
                np.take(ram, chunk, out=rows[start : start + len(chunk)])  # pending pages are unchanged
                for at in np.flatnonzero(~pending).tolist():  # written since the capture: from their copies
                    data[start + at] = self._copies[slot.index, int(chunk[at])]
                states[chunk[pending]] = PROTECTED
        return memoryview(data).cast("B")

    def disarm(self) -> None:
        """Unprotect all of RAM (the sync's pages are all copied, or the sync failed)."""
        if not self.armed:
            return
        self.armed = False
        for slot in self.memory.slots:
            self.wp.unprotect(slot.host_addr, slot.size)  # pages still marked protected meanwhile
            with self._lock:  # are unprotected twice (by a fault or a barrier): harmless
                self._states[slot.index][:] = bytes(slot.pages)

    # -- writes that meet a protected page ----------------------------------------------------------

    def prepare(self, slot: MemorySlot, offset: int, length: int) -> None:
        """The write barrier: the VMM is about to write [offset, +length) of `slot`."""
        first, last = offset >> PAGE_SHIFT, (offset + length - 1) >> PAGE_SHIFT
        states = self._states[slot.index]
        if length <= 0 or states.count(FREE, first, last + 1) == last + 1 - first:
            return  # the usual case: nothing protected there
        with self._lock:
            for page in range(first, last + 1):
                self._release(slot, page, states)

    def _release(self, slot: MemorySlot, page: int, states: bytearray) -> bool:
        """With the lock held: copy the page aside if it is still to be copied, then make it
        writable (which wakes a writer waiting on it). False if it was writable already."""
        if states[page] == PENDING:
            row = self._copy_rows.take(1)[0]
            row[:] = np.frombuffer(slot.view, dtype=np.uint8, count=PAGE_SIZE, offset=page << PAGE_SHIFT)
            self._copies[slot.index, page] = row
            self.copied_aside += 1
        if states[page] != FREE:
            self.wp.unprotect(slot.host_addr + (page << PAGE_SHIFT), PAGE_SIZE)
            states[page] = FREE
            return True
        return False

    def _serve_faults(self) -> None:
        while True:
            ready = self.wp.wait(None, self._stop_r)
            if self._stop_r in ready:
                return
            for address in self.wp.faults():
                slot = next(s for s in self.memory.slots if s.host_addr <= address < s.host_addr + s.size)
                page = (address - slot.host_addr) >> PAGE_SHIFT
                with self._lock:
                    self.faults += 1
                    if not self._release(slot, page, self._states[slot.index]):
                        # unprotected meanwhile (a disarm, a barrier): the writer may still wait to be woken
                        self.wp.unprotect(slot.host_addr + (page << PAGE_SHIFT), PAGE_SIZE)

    # -- the end ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Unprotect everything, stop the handler, give the descriptor back."""
        if self.memory.write_barrier == self.prepare:
            self.memory.write_barrier = None
        self.disarm()
        os.write(self._stop_w, b"x")
        self._handler.join(5)
        self._unregister()
        self.wp.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _unregister(self) -> None:
        for slot in self._registered:
            try:
                self.wp.unregister(slot.host_addr, slot.size)
            except OSError:
                pass  # the mapping went first (the VM closed): nothing is registered any more
        self._registered = []


def readable(sock: socket.socket) -> bool:
    """Bytes are waiting (TLS may hold a decrypted record the kernel no longer shows)."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    return bool(select.select([sock], [], [], 0)[0])


def _ram_rows(slot: MemorySlot) -> np.ndarray:
    return np.frombuffer(slot.view, dtype=_PAGE_ROW)
