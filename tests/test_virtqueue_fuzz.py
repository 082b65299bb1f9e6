"""The virtqueue against whatever a guest can put in memory: random descriptor tables, rings and
indices (hypothesis). Every outcome is either a chain whose buffers all lie in RAM and follow the
rules, or QueueError; nothing else escapes, and nothing outside RAM is touched."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.devices.virtio.virtqueue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, QueueError, SplitQueue
from pykvm.memory import GuestMemory

pytestmark = pytest.mark.nokvm

RAM = 64 * 1024
SIZE = 8
DESC, AVAIL, USED, INDIRECT_TABLE = 0x1000, 0x2000, 0x3000, 0x4000


@pytest.fixture(scope="module")
def memory():
    mem = GuestMemory(RAM)
    yield mem
    mem.close()


addresses = st.one_of(st.integers(0, RAM + 4096), st.integers(0, 2**64 - 1), st.sampled_from([0x5000, 0x6000, RAM - 16]))
lengths = st.one_of(st.integers(0, 8192), st.integers(0, 2**32 - 1), st.sampled_from([16, 32, 48]))
flags = st.integers(0, 7)
descriptor = st.tuples(addresses, lengths, flags, st.integers(0, 2 * SIZE))
table = st.lists(descriptor, min_size=SIZE, max_size=SIZE)
indirect_table = st.lists(descriptor, min_size=4, max_size=4)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(descs=table, indirect=indirect_table, heads=st.lists(st.integers(0, 2 * SIZE), min_size=SIZE, max_size=SIZE),
       avail_idx=st.integers(0, 0xFFFF), event_idx=st.booleans(), allow_indirect=st.booleans())
def test_random_rings_yield_valid_chains_or_queue_error(memory, descs, indirect, heads, avail_idx, event_idx, allow_indirect):
    for i, (addr, length, f, nxt) in enumerate(descs):
        memory.write(DESC + 16 * i, struct.pack("<QIHH", addr, length, f, nxt))
    for i, (addr, length, f, nxt) in enumerate(indirect):
        memory.write(INDIRECT_TABLE + 16 * i, struct.pack("<QIHH", addr, length, f, nxt))
    memory.write(AVAIL, struct.pack("<HH", 0, avail_idx) + b"".join(struct.pack("<H", h) for h in heads))
    queue = SplitQueue(memory, SIZE, DESC, AVAIL, USED, event_idx=event_idx, indirect=allow_indirect)
    for _ in range(SIZE + 1):
        try:
            chain = queue.pop()
        except QueueError:
            return
        if chain is None:
            return
        assert 0 <= chain.head < SIZE
        assert 1 <= len(chain.readable) + len(chain.writable) <= SIZE * 2
        for addr, length in chain.readable + chain.writable:
            assert length > 0 and 0 <= addr and addr + length <= RAM
        # the device may read and write every buffer it was given: all inside RAM
        chain.readable_views(memory)
        chain.writable_views(memory)
        queue.add_used(chain.head, chain.writable_length)
        queue.needs_interrupt()


def test_well_formed_indirect_chain(memory):
    memory.write(INDIRECT_TABLE, struct.pack("<QIHH", 0x5000, 16, DESC_F_NEXT, 1) + struct.pack("<QIHH", 0x6000, 512, DESC_F_WRITE, 0))
    memory.write(DESC, struct.pack("<QIHH", INDIRECT_TABLE, 32, DESC_F_INDIRECT, 0))
    memory.write(AVAIL, struct.pack("<HHH", 0, 1, 0))
    queue = SplitQueue(memory, SIZE, DESC, AVAIL, USED, indirect=True)
    chain = queue.pop()
    assert chain.readable == [(0x5000, 16)] and chain.writable == [(0x6000, 512)]
    assert queue.pop() is None


def test_event_index_suppresses_interrupts(memory):
    memory.write(AVAIL, struct.pack("<HH", 0, 0))
    queue = SplitQueue(memory, SIZE, DESC, AVAIL, USED, event_idx=True)
    memory.write_u16(AVAIL + 4 + 2 * SIZE, 1)  # used_event: interrupt once used idx passes 1
    queue.add_used(0, 0)
    assert not queue.needs_interrupt()  # used idx 1: not past 1 yet
    queue.add_used(0, 0)
    assert queue.needs_interrupt()  # used idx 2 crossed used_event + 1
    assert memory.read_u16(USED + 2) == 2


@pytest.mark.parametrize("size", [0, 3, 65536])
def test_bad_queue_sizes(memory, size):
    with pytest.raises(QueueError):
        SplitQueue(memory, size, DESC, AVAIL, USED)


def test_misaligned_or_outside_rings(memory):
    with pytest.raises(QueueError, match="aligned"):
        SplitQueue(memory, SIZE, DESC + 8, AVAIL, USED)
    with pytest.raises(QueueError, match="outside guest RAM"):
        SplitQueue(memory, SIZE, DESC, AVAIL, RAM - 8)
