"""Copy-on-write syncs (`--ft-mode cow`, after Avi Kivity's proposal on the Kemari thread): the
guest pauses only to harvest the dirty log and capture vCPU and device state, and runs while its
pages are copied out for the standby; a write that meets a page not yet copied copies it aside
first (userfaultfd write-protection, pykvm.userfaultfd, as QEMU's background snapshot does).

One sync, as CowMemory sees it:

    arm       just before the pause, every device held between requests: all of RAM is
              write-protected (an ioctl a slot, whatever the pages); a write that meets it before
              the pause is let go, the page just unprotected: its contents are still to come
    capture   guest paused: the dirty bitmaps just harvested become the sync's; its pages written
              since the arm (unprotected already) are copied now
    mark      guest running again: the bitmaps' set bits become page numbers (the FT thread, with
              numpy), and the sync's pages still protected become PENDING; until then, a write that
              meets a protected page looks up its bit
    gather    the pending pages are copied, a chunk at a time, into rows that the frames are sent
              from; a write to a page still pending copies it aside first (the fault handler, or
              the writing VMM thread itself: see below)
    disarm    all of RAM unprotected; the page frames go out from the copies (the state went
              out already, right after the resume: see ft.capture)

The arm is left out of the pause because KVM drops its mappings of the range protected, which
took 3 ms for 64 MiB of RAM and 29 ms for 1 GiB here; the pages the guest writes between the
arm and the pause (those it writes while the arm lasts, mostly) are copied in it, in one numpy
take. The mark is left out of the pause because finding 3000 scattered bits and marking their
pages took ~0.3 ms, a quarter of what remained of it.

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

from pykvm.memory import PAGE_SHIFT, PAGE_SIZE, GuestMemory, MemorySlot, dirty_pages
from pykvm.transfer.page_arena import PageArena
from pykvm.userfaultfd import WriteProtector

FREE, PROTECTED, PENDING = 0, 1, 2  # a page: writable; protected (needed if its captured bit is set); still to copy
GATHER_PAGES = 1024  # pages copied per lock hold while gathering
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
        self._freed: list[tuple[MemorySlot, int]] | None = None  # from the arm to the capture: pages let go
        self._captured: dict[int, np.ndarray] | None = None  # from the capture to the mark: the sync's bitmaps
        self._copy_rows, self._gather_rows = PageArena(), PageArena()
        self.armed = False
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
        self._freed, self._captured = [], None
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

    def capture(self, bitmaps: list[tuple[MemorySlot, np.ndarray]]) -> None:
        """The guest is paused: the pages whose bits are set in `bitmaps` (each slot's dirty log,
        harvested now; kept, not copied) are the sync's. Those written since `arm` (let go
        already) are copied now; the others are copied before any write reaches them."""
        with self._lock:
            if self._freed is None:
                raise RuntimeError("cow: RAM was unprotected (closed) before the sync's capture")
            self._captured = {slot.index: bitmap for slot, bitmap in bitmaps}
            for slot, bitmap in bitmaps:  # as many as the guest wrote since the arm: numpy, not a loop
                freed = np.array([page for owner, page in self._freed if owner is slot], dtype=np.int64)
                written = freed[(bitmap[freed >> 6] >> (freed & 63).astype(np.uint64)) & np.uint64(1) == 1]
                if len(written):
                    rows = self._copy_rows.take(len(written))
                    np.take(_ram_rows(slot), written, out=rows.view(_PAGE_ROW).reshape(-1))
                    self._copies.update(zip(((slot.index, page) for page in written.tolist()), rows))
            self._freed = None

    def pages(self) -> list[tuple[MemorySlot, np.ndarray]]:
        """The sync's pages, per slot, ascending (slots without any left out), found in the captured
        bitmaps; those still protected become PENDING. Asked once, best once the guest runs again."""
        if self._captured is None:
            raise RuntimeError("cow: RAM was unprotected (closed) before the sync's pages were found")
        found = [(slot, dirty_pages(self._captured[slot.index])) for slot in self.memory.slots
                 if slot.index in self._captured]
        with self._lock:
            for slot, pages in found:
                states = np.frombuffer(self._states[slot.index], dtype=np.uint8)
                states[pages[states[pages] == PROTECTED]] = PENDING
            self._captured = None  # PENDING says it from here on
        return [(slot, pages) for slot, pages in found if len(pages)]

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
        with self._lock:
            self._freed = self._captured = None
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
        if states[page] == FREE:
            return False
        if states[page] == PENDING or self._is_captured(slot, page):
            row = self._copy_rows.take(1)[0]
            row[:] = _page(slot, page)
            self._copies[slot.index, page] = row
            self.copied_aside += 1
        elif self._freed is not None:  # armed, not yet captured: the capture decides
            self._freed.append((slot, page))
        self.wp.unprotect(slot.host_addr + (page << PAGE_SHIFT), PAGE_SIZE)
        states[page] = FREE
        return True

    def _is_captured(self, slot: MemorySlot, page: int) -> bool:
        """Between the capture and the mark: the page is the sync's (its captured bit is set)."""
        bitmap = self._captured.get(slot.index) if self._captured is not None else None
        return bitmap is not None and int(bitmap[page >> 6]) >> (page & 63) & 1 == 1

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


def _page(slot: MemorySlot, page: int) -> np.ndarray:
    return np.frombuffer(slot.view, dtype=np.uint8, count=PAGE_SIZE, offset=page << PAGE_SHIFT)
