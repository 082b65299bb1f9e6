"""Where the FT standby puts a sync's pages until it commits (ft.standby): rows of a reused
arena, scattered into guest RAM once the sync is committed and acknowledged."""

from __future__ import annotations

import os
import time

import numpy as np

from pykvm.memory import GuestMemory, MemorySlot
from pykvm.transfer import wire
from pykvm.transfer.page_arena import PageArena

# Pages scattered between two offers of the CPU (256 KiB, ~40 µs of copying): see `apply`.
APPLY_PIECE = 64
TAKEN_AFTER = 50e-6  # s: a sched_yield that returns later than this gave the CPU to another thread


class PageStaging:
    """Where a sync's pages land until it commits: rows of an arena, reused from sync to sync.
    While `direct` (the first sync: nothing committed to protect), they land in guest RAM itself.
    A committed sync's rows are scattered into guest RAM by `apply`, which the standby calls once
    its Ack is out (the primary resumes meanwhile) and before anything else: receiving the next
    sync, a takeover, a verification of RAM."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.direct = True
        self._rows = PageArena()
        self._ram_pages = sum(slot.pages for slot in memory.slots)
        self.entries: list[tuple[MemorySlot, np.ndarray, np.ndarray]] = []  # slot, page numbers, rows
        self._committed: list[tuple[MemorySlot, np.ndarray, np.ndarray]] = []  # committed, not yet in RAM
        self.page_count = 0  # received in this sync

    def sink(self, slot_index: int, pages: np.ndarray) -> list[memoryview]:
        """The decoder's page sink: the buffers one frame's pages are received into."""
        slot = next((s for s in self.memory.slots if s.index == slot_index), None)
        if slot is None or (len(pages) and int(pages.max()) >= slot.pages):
            raise wire.ProtocolError(f"pages outside guest RAM (slot {slot_index})")
        if self.page_count + len(pages) > self._ram_pages:  # staging is bounded by RAM, whatever is sent
            raise wire.ProtocolError("a sync with more pages than guest RAM")
        self.page_count += len(pages)
        if self.direct:
            return wire.run_views(slot.view, pages)
        rows = self._rows.take(len(pages))
        self.entries.append((slot, pages.astype(np.int64), rows))
        return [memoryview(rows).cast("B")]

    def commit(self) -> None:
        """The staged pages belong to the committed sync now; `apply` puts them into guest RAM."""
        self._committed, self.entries = self.entries, []
        self.page_count = 0
        self.direct = False

    def apply(self) -> None:
        """Copy the committed sync's pages into guest RAM; cannot fail. In pieces, the CPU offered
        to any other thread between them (`sched_yield`) until one takes it: right after the Ack
        the primary wakes its vCPUs, and a standby on the same host (the demo, the benches, a test
        bed) would hold a core for the whole copy, ~2 ms for 3000 pages. Measured there: 3000-page
        pauses 7.46 against 8.07 ms with the copy in one piece, the vCPUs running again 0.19 ms
        after the Ack against 0.31-0.6. Only until one is taken: on a busy host every offer is, for
        a time slice each (47 yields beside a CPU hog took 66 ms here). Alone, an offer is ~1 µs."""
        offering = True
        for slot, pages, rows in self._committed:  # a page is one element: one memcpy each, in C
            ram, staged = np.frombuffer(slot.view, dtype=wire.PAGE_ROW), rows.view(wire.PAGE_ROW).reshape(-1)
            for at in range(0, len(pages), APPLY_PIECE):
                np.put(ram, pages[at : at + APPLY_PIECE], staged[at : at + APPLY_PIECE])
                if offering:
                    offered = time.perf_counter()
                    os.sched_yield()
                    offering = time.perf_counter() - offered < TAKEN_AFTER
        self._committed = []
        if not self.entries:
            self._rows.reset()

    def discard(self) -> None:
        """Drop the sync being received (what is committed still goes into RAM)."""
        self.apply()
        self.entries.clear()
        self._rows.reset()
        self.page_count = 0
