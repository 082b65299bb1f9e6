"""The FT output gate, as the devices see it (pykvm.ft implements the gate; devices never import it).

With a gate installed on a virtio function (VirtioPciFunction.set_output_gate), a device that
meets an output request (a disk write, flush, discard or write-zeroes; a frame to transmit) holds
that chain: taken from the ring, not served, its queue stopped behind it. It tells the gate
`gate.hold(function, queue_index)`. Once the state that precedes the output is safe, the gate calls
`function.release_held(queue_index)`, which takes the function's lock, serves the chain and
carries on with the queue. A held chain counts as not taken in the saved state (give_back), so
whoever restores that state serves it.

A disk device also reports every change it made to its file, once made, to a DiskWriteObserver
(FT ships the changes to the standby's copy of the disk).
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
        """Serve the chain held on `queue_index` (taking the function's lock), then the queue."""


class OutputGate(Protocol):
    def hold(self, function: GatedFunction, queue_index: int) -> None:
        """`function` holds an output chain on `queue_index`. Called with the function's lock
        held, from a device thread or a vCPU: must not block."""


class HeldOutputs(dict[int, DescriptorChain]):
    """A device's held output chains by queue index: one per queue at most, since the queue
    waits behind it. (A dict, so that the serve loop's `index in held` costs no Python call.)"""

    def give_back(self, queue_index: int, position: RingPosition) -> RingPosition:
        """A ring position to save: chains taken but not completed (the held one) are back in
        the available ring, so that a restored device serves them."""
        if queue_index not in self:
            return position
        return replace(position, next_avail=(position.next_avail - 1) & 0xFFFF)


@dataclass(frozen=True)
class DiskChange:
    """A change made to the disk file, for replication: `data` at `offset`, or `zeroed` bytes of
    zeros (discard, write-zeroes)."""

    offset: int
    data: bytes = b""
    zeroed: int = 0


DiskWriteObserver = Callable[[DiskChange], None]
"""Told of each change a disk device made to its file, after the file has it."""
