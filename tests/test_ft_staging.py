"""The FT standby's page staging (ft.staging) on real guest memory, without KVM: a sync's pages
stay out of RAM until it commits, and its apply puts every page where it belongs, across the
pieces it copies between offers of the CPU."""

from __future__ import annotations

import numpy as np
import pytest

from pykvm.ft.staging import APPLY_PIECE, PageStaging
from pykvm.memory import PAGE_SIZE, GuestMemory
from pykvm.transfer import wire

pytestmark = pytest.mark.nokvm


def _receive(staging: PageStaging, slot: int, pages: np.ndarray, contents: np.ndarray) -> None:
    """What the decoder does with a PAGES frame: ask the sink for buffers, fill them in order."""
    data = memoryview(np.ascontiguousarray(contents)).cast("B")
    at = 0
    for buffer in staging.sink(slot, pages.astype("<u4")):
        buffer[:] = data[at : at + len(buffer)]
        at += len(buffer)
    assert at == len(data)


def test_a_committed_sync_reaches_ram_only_when_applied_every_page_in_place():
    memory = GuestMemory(32 << 20)
    ram = np.frombuffer(memory.slots[0].view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    staging = PageStaging(memory)
    staging.commit()  # the first sync (landed directly) is over: from now on pages are staged
    rng = np.random.default_rng(7)
    pages = np.sort(rng.choice(len(ram), 5 * APPLY_PIECE + 3, replace=False))  # several pieces, a short last
    contents = rng.integers(1, 256, (len(pages), PAGE_SIZE), dtype=np.uint8)
    split = len(pages) // 3  # two frames, as a sync of more than FRAME_PAGES sends them
    _receive(staging, 0, pages[:split], contents[:split])
    _receive(staging, 0, pages[split:], contents[split:])
    assert not ram.any()  # staged, not in RAM: the committed state is untouched while a sync comes

    staging.commit()
    assert not ram.any()  # committed, still not applied: the Ack goes out first
    staging.apply()
    assert np.array_equal(ram[pages], contents)
    others = np.setdiff1d(np.arange(len(ram)), pages)
    assert not ram[others].any()  # nothing else written

    # The next sync reuses the rows: a page it sends again gets its new contents.
    again = pages[::2]
    newer = rng.integers(1, 256, (len(again), PAGE_SIZE), dtype=np.uint8)
    _receive(staging, 0, again, newer)
    staging.commit()
    staging.apply()
    assert np.array_equal(ram[again], newer)
    assert np.array_equal(ram[pages[1::2]], contents[1::2])


def test_a_discarded_sync_never_reaches_ram_and_the_committed_one_still_does():
    memory = GuestMemory(8 << 20)
    ram = np.frombuffer(memory.slots[0].view, dtype=np.uint8).reshape(-1, PAGE_SIZE)
    staging = PageStaging(memory)
    staging.commit()
    committed = np.arange(10, 10 + APPLY_PIECE + 1)
    _receive(staging, 0, committed, np.full((len(committed), PAGE_SIZE), 0x11, dtype=np.uint8))
    staging.commit()
    cut_off = np.arange(200, 230)  # a sync the primary never finished
    _receive(staging, 0, cut_off, np.full((len(cut_off), PAGE_SIZE), 0x22, dtype=np.uint8))
    staging.discard()
    assert (ram[committed] == 0x11).all()
    assert not ram[cut_off].any()
    with pytest.raises(wire.ProtocolError):  # and a frame beyond RAM is refused at its head
        staging.sink(0, np.array([len(ram)], dtype="<u4"))
