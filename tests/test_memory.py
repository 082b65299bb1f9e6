"""Guest memory: bounds checks (hypothesis), slot layout, and the VMM-side dirty bitmap."""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.memory import (
    MMIO_HOLE_END,
    MMIO_HOLE_START,
    PAGE_SIZE,
    GuestMemory,
    GuestMemoryError,
    dirty_pages,
    populated_pages,
    ram_hash,
    ram_layout,
)

pytestmark = pytest.mark.nokvm

SIZE = 64 * PAGE_SIZE


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory(SIZE)
    yield mem
    mem.close()


addresses = st.integers(min_value=-2 * SIZE, max_value=3 * SIZE)
lengths = st.integers(min_value=-16, max_value=2 * SIZE)


@settings(max_examples=500, deadline=None)
@given(addr=addresses, length=lengths)
def test_every_access_is_inside_ram_or_refused(memory, addr, length):
    inside = addr >= 0 and length >= 0 and addr + length <= SIZE
    accesses = [lambda: memory.read(addr, length), lambda: memory.view(addr, length)]
    if length >= 0:
        accesses.append(lambda: memory.write(addr, b"\xab" * length))
    for access in accesses:
        if inside:
            access()
        else:
            with pytest.raises(GuestMemoryError):
                access()


@settings(max_examples=200, deadline=None)
@given(addr=st.integers(min_value=0, max_value=SIZE - 1), data=st.binary(min_size=1, max_size=3 * PAGE_SIZE))
def test_write_read_round_trip_and_dirty_pages(addr, data):
    mem = GuestMemory(SIZE)
    try:
        if addr + len(data) > SIZE:
            with pytest.raises(GuestMemoryError):
                mem.write(addr, data)
            assert dirty_pages(mem.take_dirty(mem.slots[0])).size == 0  # a refused write marks nothing
            return
        mem.write(addr, data)
        assert mem.read(addr, len(data)) == data
        pages = dirty_pages(mem.take_dirty(mem.slots[0]))
        assert pages.tolist() == list(range(addr // PAGE_SIZE, (addr + len(data) - 1) // PAGE_SIZE + 1))
        assert dirty_pages(mem.take_dirty(mem.slots[0])).size == 0  # taking clears
    finally:
        mem.close()


@pytest.mark.parametrize("width", [16, 32, 64])
def test_integer_accessors_are_bounds_checked(memory, width):
    read = getattr(memory, f"read_u{width}")
    write = getattr(memory, f"write_u{width}")
    size = width // 8
    write(SIZE - size, (1 << width) - 1)
    assert read(SIZE - size) == (1 << width) - 1
    with pytest.raises(GuestMemoryError):
        read(SIZE - size + 1)
    with pytest.raises(GuestMemoryError):
        write(SIZE - size + 1, 0)


def test_views_do_not_cross_the_end_of_ram(memory):
    view = memory.view(SIZE - 8, 8)
    view[:] = b"12345678"
    assert memory.read(SIZE - 8, 8) == b"12345678"
    with pytest.raises(GuestMemoryError):
        memory.view(SIZE - 8, 9)


def test_ram_above_the_mmio_hole_is_a_second_slot():
    assert ram_layout(64 << 20) == [(0, 64 << 20)]
    assert ram_layout(MMIO_HOLE_START + (1 << 30)) == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, 1 << 30)]
    mem = GuestMemory(MMIO_HOLE_START + 2 * PAGE_SIZE)  # NORESERVE: nothing is touched but two pages
    try:
        mem.write_u32(MMIO_HOLE_END + 4, 0xDEADBEEF)
        assert mem.read_u32(MMIO_HOLE_END + 4) == 0xDEADBEEF
        with pytest.raises(GuestMemoryError):
            mem.read(MMIO_HOLE_START, 4)  # the hole is not RAM
        with pytest.raises(GuestMemoryError):
            mem.read(MMIO_HOLE_START - 2, 4)  # nor is an access straddling its start
        assert dirty_pages(mem.take_dirty(mem.slots[1])).tolist() == [0]
    finally:
        mem.close()


def test_dirty_pages_matches_a_python_model():
    rng = np.random.default_rng(1)
    bitmap = np.zeros(1024, dtype=np.uint64)
    chosen = sorted(set(rng.integers(0, 1024 * 64, size=3000).tolist()))
    for page in chosen:
        bitmap[page >> 6] |= np.uint64(1 << (page & 63))
    assert dirty_pages(bitmap).tolist() == chosen


def test_shared_memory_is_a_memfd(memory):
    mem = GuestMemory(SIZE, shared=True)
    try:
        mem.write(0, b"shared")
        import os
        assert os.pread(mem.slots[0].fd, 6, 0) == b"shared"
    finally:
        mem.close()


# -- populated pages: what a migration's round 0 and the FT full sync send ------------------------

MADV_PAGEOUT = 21
WRITTEN = [0, 1, 7, 63]  # pages of a 64-page slot that hold data


def _write_some(mem: GuestMemory) -> None:
    for page in WRITTEN:
        mem.write(page * PAGE_SIZE + 5, b"pykvm")


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "memfd"])
def test_populated_pages_are_the_written_ones(shared):
    mem = GuestMemory(SIZE, shared=shared)
    try:
        assert populated_pages(mem.slots[0]).tolist() == []
        _write_some(mem)
        assert populated_pages(mem.slots[0]).tolist() == WRITTEN
    finally:
        mem.close()


@pytest.mark.parametrize("backing", ["anonymous", "memfd", "image"])
def test_populated_pages_of_a_piece_are_the_written_ones_in_it(backing, tmp_path):
    """Migration's round 0 scans RAM a piece at a time: each piece finds exactly the written pages
    within it, numbered from the slot's start (a piece that starts or ends on a written page, in a
    hole, one page wide, empty), whatever holds the RAM (a snapshot image: pages of zeros)."""
    if backing == "image":
        image = bytearray(SIZE)
        for page in WRITTEN:
            image[page * PAGE_SIZE + 5 : page * PAGE_SIZE + 10] = b"pykvm"
        (tmp_path / "ram").write_bytes(image)
        fd = os.open(tmp_path / "ram", os.O_RDONLY)
        mem = GuestMemory(SIZE, image=(fd, [0]))
        os.close(fd)  # the mapping holds the file
    else:
        mem = GuestMemory(SIZE, shared=backing == "memfd")
        _write_some(mem)
    try:
        slot = mem.slots[0]
        for first, stop in [(0, 64), (0, 1), (1, 7), (1, 8), (2, 7), (7, 8), (8, 63), (8, 64), (63, 64), (5, 5), (64, 64)]:
            assert populated_pages(slot, first, stop).tolist() == [p for p in WRITTEN if first <= p < stop], (first, stop)
        for first, stop in [(-1, 4), (5, 4), (0, 65)]:
            with pytest.raises(ValueError):
                populated_pages(slot, first, stop)
    finally:
        mem.close()


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "memfd"])
def test_ram_hash_is_all_of_ram_and_populates_nothing(shared):
    """FT's --ft-verify hash covers every byte of RAM, the untouched pages as the zeros they read as,
    without reading them: a page it read would count as populated, and a full sync to a new
    standby would send it."""
    for written in (WRITTEN, [3, 10, 11]):  # the first and last pages written; holes at both ends
        mem = GuestMemory(SIZE, shared=shared)
        try:
            for page in written:
                mem.write(page * PAGE_SIZE + 5, b"pykvm")
            digest = ram_hash(mem)
            assert populated_pages(mem.slots[0]).tolist() == written
            assert digest == xxhash.xxh3_64_intdigest(bytes(mem.slots[0].view))  # (this reads them all)
        finally:
            mem.close()


@pytest.fixture
def swap_file(tmp_path):
    """A swap file for the duration of one test (root and a file system that allows swap)."""
    path = tmp_path / "swap"
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 64 << 20)  # swapon refuses a file with holes
    os.chmod(path, 0o600)
    made = subprocess.run(["mkswap", str(path)], capture_output=True)
    enabled = made.returncode == 0 and subprocess.run(["swapon", str(path)], capture_output=True).returncode == 0
    if not enabled:
        pytest.skip("cannot enable a swap file here (swapon needs root and a file system that allows swap)")
    yield path
    subprocess.run(["swapoff", str(path)], check=True)


def _swapped_kib(mapping_addr: int) -> int:
    """The `Swap:` figure of the mapping starting at `mapping_addr` in /proc/self/smaps."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = int(line.split("-")[0], 16) == mapping_addr
            elif inside and line.startswith("Swap:"):
                return int(line.split()[1])
    raise AssertionError("mapping not found in smaps")


@pytest.mark.parametrize("shared", [False, True], ids=["anonymous", "memfd"])
def test_swapped_out_pages_are_still_populated(swap_file, shared):
    mem = GuestMemory(SIZE, shared=shared)
    try:
        _write_some(mem)
        slot = mem.slots[0]
        slot.mapping.madvise(MADV_PAGEOUT)
        swapped = _swapped_kib(slot.host_addr)
        if swapped == 0:
            pytest.skip("MADV_PAGEOUT swapped nothing out here")
        assert swapped >= len(WRITTEN) * PAGE_SIZE // 1024
        assert populated_pages(slot).tolist() == WRITTEN
        assert all(mem.read(page * PAGE_SIZE + 5, 5) == b"pykvm" for page in WRITTEN)
    finally:
        mem.close()
