"""The standby's undo journal on real files: what it saved comes back byte for byte, holes as
holes; a journal damaged on disk is refused rather than rolled back from. And the primary's read
back of the ranges a sync's guest wrote (ft.disk_mode.contents): data as data, zeros as zeros."""

from __future__ import annotations

import os

import pytest

from pykvm.devices.virtio.blk import DiskImage, DiskSpec
from pykvm.devices.virtio.gate import DiskChange
from pykvm.ft import disk_mode
from pykvm.ft.journal import PIECE, JournalError, UndoJournal, merge_ranges
from pykvm.hostfile import extents

pytestmark = pytest.mark.nokvm
SIZE = 8 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(SIZE)
    image = DiskImage(DiskSpec(str(path)))
    image.write(0, os.urandom(3 * PIECE // 2))  # data across a piece boundary
    image.write(5 << 20, b"\x11" * 4096)  # a lone page of data amid holes
    yield image
    image.close()


def _holes(image: DiskImage) -> list[tuple[int, int]]:
    return [(offset, length) for offset, length, data in extents(image.fd, 0, image.size) if not data]


def test_merge_ranges():
    assert merge_ranges([(10, 5), (0, 4), (4, 2), (12, 10), (30, 0)]) == [(0, 6), (10, 12)]


def test_rollback_restores_data_and_holes(image):
    before, holes = image.read(0, SIZE), _holes(image)
    journal = UndoJournal(image)
    ranges = [(0, 2 << 20), (4 << 20, 2 << 20), (512, 4096)]  # overlapping, data and holes
    journal.save(7, ranges)
    image.write(4096, b"\xee" * ((2 << 20) - 4096))  # over data and into the hole after it
    image.zero(0, 4096)
    image.write(4 << 20, b"\xdd" * (2 << 20))  # fills the hole around the lone page
    journal.rollback()
    assert image.read(0, SIZE) == before
    assert _holes(image) == holes
    journal.clear()
    image.write(0, b"\xcc" * 512)
    journal.rollback()  # a cleared journal puts nothing back
    assert image.read(0, 512) == b"\xcc" * 512
    journal.close()
    assert not os.path.exists(journal.path)  # an empty journal leaves nothing behind


def test_a_shorter_journal_over_a_longer_one_rolls_back_only_its_own(image):
    """The file is reused without truncation: what an earlier, longer journal left beyond the
    new one's end is not rolled back from."""
    journal = UndoJournal(image)
    journal.save(1, [(0, 2 << 20)])
    journal.clear()
    size = os.path.getsize(journal.path)
    before = image.read(0, SIZE)
    journal.save(2, [(5 << 20, 4096)])
    assert os.path.getsize(journal.path) == size  # the blocks it had, overwritten
    image.write(0, b"\xee" * 8192)  # not journaled by sync 2: stays
    image.write(5 << 20, b"\xdd" * 4096)
    journal.rollback()
    assert image.read(5 << 20, 4096) == before[5 << 20 : (5 << 20) + 4096]
    assert image.read(0, 8192) == b"\xee" * 8192
    journal.close()


def test_a_damaged_journal_is_not_rolled_back_from(image):
    journal = UndoJournal(image)
    journal.save(3, [(0, 8192)])
    with open(journal.path, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    image.write(0, b"\xee" * 8192)
    with pytest.raises(JournalError, match="fails its checksum"):
        journal.rollback()
    journal.close()
    assert os.path.getsize(journal.path) > 0  # kept: it still holds what could not be put back


def test_written_ranges_read_back_as_data_and_zeros_byte_for_byte(image):
    """What a sync carries of a replicated disk: every byte of the ranges as the file holds them,
    zeros (holes, written zeros, whole or short pieces) as zeroed ranges and never as data, and
    data as data, even a single byte at the very end of an otherwise zero piece."""
    step = disk_mode.PIECE
    image.write(2 * step, bytes(step))  # written zeros, a whole piece
    image.write(3 * step, bytes(step - 1) + b"\x01")  # one byte of data, the piece's last
    image.write(6 * step, bytes(8192))  # written zeros, a short piece (holes around it)
    end = 7 * step
    changes = list(disk_mode.contents(image, [(0, end)]))
    rebuilt = bytearray(end)
    for change in changes:
        if change.data:
            assert any(change.data)  # zeros never travel as data
            rebuilt[change.offset : change.offset + len(change.data)] = change.data
    assert bytes(rebuilt) == image.read(0, end)  # and what is not data is zeros in the file
    assert DiskChange(3 * step, bytes(step - 1) + b"\x01") in changes
