"""The FT output gate, as the devices see it (pykvm.ft implements the gate; devices never import it).

With a gate installed on a virtio function (VirtioPciFunction.set_output_gate), a device that
meets an output request (a disk write, flush, discard or write-zeroes; a frame to transmit) holds
that chain: taken from the ring, not served. It tells the gate `gate.hold(function, queue_index)`,
once per chain. Output chains that follow on the same queue are held too, each told (so one sync
can release the outputs of many requests: group commit); the first request that is not an
output stops the queue behind them, so nothing overtakes a held output. Once the state that
precedes an output is safe, the gate calls `function.release_held(queue_index)`, once per hold:
the function takes its lock and serves the oldest chain held on that queue; after the last, it
carries on with the queue. Held chains count as not taken in the saved state (give_back), so
whoever restores that state serves them.

A disk device also reports every range of its file it changed, once changed, to a
DiskWriteObserver (FT ships what those ranges hold to the standby's copy of the disk).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Protocol

from pykvm.devices.virtio.virtqueue import DescriptorChain, RingPosition

if TYPE_CHECKING:
    from pykvm.devices.virtio import VirtioDevice


class GatedFunction(Protocol):
    """The side of a virtio function a gate deals with."""

    device: VirtioDevice

    def release_held(self, queue_index: int) -> None:
        """Serve the oldest chain held on `queue_index` (taking the function's lock); after the
        last one, the rest of the queue."""


class OutputGate(Protocol):
    def hold(self, function: GatedFunction, queue_index: int) -> None:
        """`function` holds one more output chain on `queue_index`. Called with the function's
        lock held, from a device thread or a vCPU: must not block."""


class HeldOutputs(dict[int, list[DescriptorChain]]):
    """A device's held output chains by queue index, oldest first; a queue is a key only while
    it holds some. (A dict, so that the serve loop's `index in held` costs no Python call.)"""

    def give_back(self, queue_index: int, position: RingPosition) -> RingPosition:
        """A ring position to save: the chains taken but not completed (the held ones) are back
        in the available ring, so that a restored device serves them. They are the last ones
        taken (nothing is served behind a held chain), so stepping back over them is exact."""
        held = len(self.get(queue_index, ()))
        if not held:
            return position
        return replace(position, next_avail=(position.next_avail - held) & 0xFFFF)


@dataclass(frozen=True)
class DiskChange:
    """A change made to the disk file, for replication: `data` at `offset`, or `zeroed` bytes of
    zeros (discard, write-zeroes)."""

    offset: int
    data: bytes = b""
    zeroed: int = 0


DiskWriteObserver = Callable[[int, int], None]
"""Told of each range (offset, length) a disk device changed in its file (written, discarded or
zeroed), after the file has it."""
