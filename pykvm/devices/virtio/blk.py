"""virtio-blk (virtio 1.x, 5.2) on a disk image file.

Data moves between the file and guest RAM with `os.preadv`/`os.pwritev` on memoryviews of the
request's buffers: no copy in Python. Requests are served in ring order (VirtioDevice.serve_queue)
by whichever thread the notification reaches: by default the notifying vCPU, during its exit
(see pykvm.machine.ioeventfd_for), unless the notify finds a deep queue, which the device's I/O
thread then serves while the guest runs on (Blk.hands_over). Reads (or writes) next to each
other in the ring and on the disk go to the file in one system call, as QEMU's virtio-blk merges
them: here 16 writes of 64 KiB cost 16.6 us each one by one, 8.6 merged (the kernel's cost per
call, not per byte). After each request its status is written, the chain returned, and the
driver interrupted as soon as it asked to be.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import dataclass

from pykvm.devices import virtio as v
from pykvm.devices.virtio.gate import DiskWriteObserver
from pykvm.devices.virtio.iovec import scatter, total_length, trim
from pykvm.devices.virtio.virtqueue import DescriptorChain, QueueError, SplitQueue
from pykvm.errors import ConfigError
from pykvm.hostfile import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE, fallocate

SECTOR = 512
QUEUE_SIZE = 256
SEG_MAX = QUEUE_SIZE - 2  # data descriptors per request: all but header and status
ID_BYTES = 20
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
MAX_SEGMENTS = 16

# Feature bits (5.2.3)
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH = 1 << 2, 1 << 5, 1 << 6, 1 << 9
F_DISCARD, F_WRITE_ZEROES = 1 << 13, 1 << 14

# Request types and status values (5.2.6)
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2

# A merged read or write at most. In the notifying vCPU's exit the guest waits for the whole
# drain anyway, so fewer calls win: 64 requests of 64 KiB, one call not holding the queue long.
# On the I/O thread the guest runs on and takes each completion as it comes: four of 64 KiB,
# which kept sequential writes at 0.98 of QEMU there, where 1-4 MiB runs fell to 0.74-0.76.
MERGED_BYTES, MERGED_BYTES_GUEST_RUNNING = 4 << 20, 256 << 10
MERGED_VIEWS = 1024  # and its buffers, at most what one preadv/pwritev takes (IOV_MAX)
# A notify served in the exit finds this many requests or more waiting: a deep queue, which the
# I/O thread serves instead (Blk.hands_over)
DEEP_QUEUE = 4

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
SEGMENT_UNMAP = 1


@dataclass(slots=True)
class Transfer:
    """A read or write in the usual layout (header first, status last) within the disk: one that
    may share a system call with its neighbours."""

    chain: DescriptorChain
    kind: int  # T_IN or T_OUT
    offset: int  # on the disk, in bytes
    data: list[memoryview]  # the buffers read into, or written from
    length: int
    status: memoryview  # the status byte


class Run:
    """Transfers next to each other in the ring and on the disk, all reads or all writes, served
    with one preadv or pwritev."""

    def __init__(self, most: int = MERGED_BYTES) -> None:
        self.most = most  # bytes
        self.transfers: list[Transfer] = []
        self.views: list[memoryview] = []
        self.length = 0

    def joins(self, transfer: Transfer) -> bool:
        """Whether `transfer` continues the run (an empty run takes any)."""
        if not self.transfers:
            return True
        first = self.transfers[0]
        return (transfer.kind == first.kind and transfer.offset == first.offset + self.length
                and self.length + transfer.length <= self.most and len(self.views) + len(transfer.data) <= MERGED_VIEWS)

    def add(self, transfer: Transfer) -> None:
        self.transfers.append(transfer)
        self.views += transfer.data
        self.length += transfer.length


def _usual_header(chain: DescriptorChain) -> tuple[int, int] | None:
    """(type, sector) of a request in the usual layout, read quickly: the header whole in the
    first buffer, and a buffer to write the status into. None otherwise (Blk._header checks it)."""
    readable = chain.readable
    if readable and readable[0][1] >= _HEADER.size and chain.writable:
        kind, _, sector = _HEADER.unpack_from(chain.in_views[0])
        return kind, sector
    return None


@dataclass(frozen=True)
class DiskSpec:
    """`--disk PATH[,readonly]`"""

    path: str
    readonly: bool = False

    @classmethod
    def parse(cls, text: str) -> DiskSpec:
        path, *options = text.split(",")
        if not path:
            raise ConfigError(f"--disk {text!r}: expected PATH[,readonly]")
        readonly = False
        for option in options:
            if option in ("readonly", "ro", "readonly=on"):
                readonly = True
            else:
                raise ConfigError(f"--disk {text!r}: unknown option {option!r} (known: readonly)")
        return cls(path, readonly)


class DiskImage:
    """The backing file: opened once, probed for hole punching (discard, write-zeroes)."""

    def __init__(self, spec: DiskSpec) -> None:
        self.spec = spec
        flags = (os.O_RDONLY if spec.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(spec.path, flags)
        except FileNotFoundError:
            raise ConfigError(f"--disk {spec.path}: no such file") from None
        except IsADirectoryError:
            raise ConfigError(f"--disk {spec.path}: is a directory") from None
        except PermissionError:
            hint = "" if spec.readonly else " (add ,readonly to use it read-only)"
            raise ConfigError(f"--disk {spec.path}: permission denied{hint}") from None
        except OSError as error:
            raise ConfigError(f"--disk {spec.path}: cannot open: {error.strerror}") from None
        info = os.fstat(self.fd)
        self.size = info.st_size if stat.S_ISREG(info.st_mode) else _device_size(self.fd)
        self.sectors = self.size // SECTOR
        self.can_punch = not spec.readonly and self._probe_punch()

    def _probe_punch(self) -> bool:
        """Punching a hole past the end of the file changes nothing but tells if it is supported."""
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, max(self.size, SECTOR), SECTOR)
        except OSError:
            return False
        return True

    # -- replication: the FT primary reads the whole disk, the standby applies the primary's changes

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def write(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a write cut short by a full disk goes on, and then raises ENOSPC
            done = os.pwrite(self.fd, view, offset)
            view, offset = view[done:], offset + done

    def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros: a hole, whether the guest discarded it or zeroed it."""
        fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


class Blk(v.VirtioDevice):
    device_type = v.TYPE_BLOCK
    name = "blk"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, disk: DiskImage, *, serial: str = "") -> None:
        super().__init__()
        self.disk = disk
        self.serial = (serial or os.path.basename(disk.spec.path)).encode()[:ID_BYTES]
        self.features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH
        if disk.spec.readonly:
            self.features |= F_RO
        if disk.can_punch:
            self.features |= F_DISCARD | F_WRITE_ZEROES
        self.requests = 0  # served, for benchmarks and metrics
        self.merged = 0  # of those, served in a system call shared with others
        self._run = Run()  # the reads or writes taken from the ring and not yet served (take_chain)
        self.write_observer: DiskWriteObserver | None = None  # FT ships the changed ranges to the standby
        # FT with a replicated standby: a flush completes at once, since the sync that covers it
        # fdatasyncs this file before any output that could follow it leaves (ft.disk_mode)
        self.flush_deferred = False
        self.deferred_flushes = 0  # those flushes, counted: a sync covering one flushes the file

    def config_bytes(self) -> bytes:
        """virtio_blk_config up to write_zeroes_may_unmap (60 bytes)."""
        return struct.pack(
            "<QIIHBBIBBHIBBHIIIIIB3x",
            self.disk.sectors, 0, SEG_MAX,  # capacity, size_max (none), seg_max
            0, 0, 0,  # geometry: cylinders, heads, sectors
            SECTOR,  # blk_size
            0, 0, 0, 0,  # topology
            1, 0, 1,  # writeback (flush is meaningful), unused, num_queues
            MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,  # max_discard_sectors, max_discard_seg, alignment
            MAX_DISCARD_SECTORS, MAX_SEGMENTS, 1,  # max_write_zeroes_sectors/seg, may_unmap
        )

    # -- requests ------------------------------------------------------------------------------------

    def hands_over(self, index: int) -> bool:
        """A shallow queue is served in the notifying vCPU's exit: no thread to wake (at depth 1
        1.6-1.7x QEMU's IOPS here, against 0.92-0.99 through the I/O thread). A deep one goes to
        the I/O thread, which serves it in short merged runs while the guest runs on and takes
        each completion as it comes, where the exit would hold the guest for the whole queue.
        Not while FT records the writes (`write_observer`): the I/O thread then shares the
        interpreter lock with the FT thread shipping them, and 64 KiB sequential writes under
        pipelined FT ran at 771-965 MB/s handed over against 1695-1859 in the exit."""
        ring = self.rings[index] if index < len(self.rings) else None
        return ring is not None and self.write_observer is None and ring.pending() >= DEEP_QUEUE

    def queue_notified(self, index: int, *, guest_waits: bool = False) -> None:
        """Serve the queue in ring order, merging runs up to the size that suits who waits."""
        self._run = Run(MERGED_BYTES if guest_waits else MERGED_BYTES_GUEST_RUNNING)
        self.serve_queue(index)

    def reset(self) -> None:
        super().reset()
        self._run = Run()

    def take_chain(self, index: int, ring: SplitQueue, chain: DescriptorChain) -> None:
        """Keep a read or write that continues the run of those kept; otherwise serve the run
        first, then this chain (kept, if it can start a run)."""
        transfer = self._transfer(chain)
        if transfer is None or not self._run.joins(transfer):
            self.serve_taken(index, ring)
        if transfer is None:
            self._serve_and_return(index, ring, chain)
        else:
            self._run.add(transfer)

    def serve_taken(self, index: int, ring: SplitQueue) -> None:
        """One preadv or pwritev for the run kept; then each request's status, in ring order. If
        the call fails or comes up short, each request is served again on its own, for its own
        status (they read or write the same bytes again, so nothing is done twice that shows)."""
        if not self._run.transfers:
            return
        run, self._run = self._run, Run(self._run.most)
        first = run.transfers[0]
        call = os.preadv if first.kind == T_IN else os.pwritev
        try:
            done = call(self.disk.fd, run.views, first.offset)
        except OSError:
            done = -1
        if done != run.length:
            for transfer in run.transfers:
                self._serve_and_return(index, ring, transfer.chain)
            return
        self.requests += len(run.transfers)
        if len(run.transfers) > 1:
            self.merged += len(run.transfers)
        memory, observer = self.memory, self.write_observer if first.kind == T_OUT else None
        for transfer in run.transfers:
            if observer is not None:
                observer(transfer.offset, transfer.length)
            transfer.status[0] = S_OK
            transfer.chain.written(memory)
            ring.add_used(transfer.chain.head, (transfer.length if transfer.kind == T_IN else 0) + 1)
            if ring.needs_interrupt():
                self.interrupt(index)

    def _transfer(self, chain: DescriptorChain) -> Transfer | None:
        """`chain` as a Transfer, if it is a read or a write in the usual layout within the disk
        (anything else, or a request that fails its checks, is served on its own)."""
        header = _usual_header(chain)
        if header is None:
            return None
        kind, sector = header
        if kind not in (T_IN, T_OUT) or kind == T_OUT and self.disk.spec.readonly:
            return None
        in_data, status = self._in_data(chain)
        data = self._out_data(chain) if kind == T_OUT else in_data
        length = total_length(data)
        if not length or not self._in_range(sector, length):
            return None
        return Transfer(chain, kind, sector * SECTOR, data, length, status)

    def _header(self, chain: DescriptorChain) -> tuple[int, int]:
        if chain.readable_length < _HEADER.size or chain.writable_length < 1:
            raise QueueError(f"blk request {chain.head} lacks its header or status byte")
        kind, _, sector = _HEADER.unpack(chain.read(self.memory, _HEADER.size))
        return kind, sector

    def is_output(self, index: int, chain: DescriptorChain) -> bool:
        return self._header(chain)[0] in (T_OUT, T_FLUSH, T_DISCARD, T_WRITE_ZEROES)

    def serve_chain(self, index: int, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written into the driver's buffers."""
        kind, sector = _usual_header(chain) or self._header(chain)
        self.requests += 1
        in_data, status_view = self._in_data(chain)
        written = 0
        try:
            if kind == T_IN:
                length = total_length(in_data)
                status = self._read(sector, in_data, length)
                written = length if status == S_OK else 0
            elif kind == T_OUT:
                status = self._write(sector, self._out_data(chain))
            elif kind == T_FLUSH:
                status = S_OK
                if self.disk.spec.readonly:
                    pass
                elif self.flush_deferred:
                    self.deferred_flushes += 1
                else:
                    os.fdatasync(self.disk.fd)
            elif kind == T_GET_ID:
                written = scatter(in_data, self.serial.ljust(ID_BYTES, b"\0"))
                status = S_OK
            elif kind in (T_DISCARD, T_WRITE_ZEROES) and self.disk.can_punch:
                status = self._punch(kind, b"".join(self._out_data(chain)))
            else:
                status = S_UNSUPP
        except OSError as error:
            # log the text only: the exception's traceback holds views of guest RAM
            v.log.warning("virtio-blk: I/O error on %s: %s", self.disk.spec.path, str(error))
            status, written = S_IOERR, 0
        status_view[0] = status
        return written + 1

    def _in_data(self, chain: DescriptorChain) -> tuple[list[memoryview], memoryview]:
        """Views of the request's device-writable buffers without the status byte at their end,
        and a view of the status byte."""
        views = chain.writable_views(self.memory)
        data = views[:-1] if len(views[-1]) == 1 else trim(views, 0, 1)
        return data, views[-1][-1:]

    def _out_data(self, chain: DescriptorChain) -> list[memoryview]:
        """Views of the request's device-readable data: its readable buffers without the header."""
        if chain.readable[0][1] == _HEADER.size:  # the header in a buffer of its own
            return chain.in_views[1:]
        return trim(chain.in_views, _HEADER.size, 0)

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.disk.sectors * SECTOR

    def _read(self, sector: int, views: list[memoryview], length: int) -> int:
        if not self._in_range(sector, length):
            return S_IOERR
        done = os.preadv(self.disk.fd, views, sector * SECTOR) if views else 0
        if done != length:
            raise OSError(errno.EIO, f"short read ({done} of {length} bytes)")
        return S_OK

    def _write(self, sector: int, views: list[memoryview]) -> int:
        length = total_length(views)
        if self.disk.spec.readonly or not self._in_range(sector, length):
            return S_IOERR
        done = os.pwritev(self.disk.fd, views, sector * SECTOR) if views else 0
        if done != length:
            raise OSError(errno.EIO, f"short write ({done} of {length} bytes)")
        if self.write_observer is not None:
            self.write_observer(sector * SECTOR, length)
        return S_OK

    def _punch(self, kind: int, segments: bytes) -> int:
        if len(segments) % _SEGMENT.size or len(segments) // _SEGMENT.size > MAX_SEGMENTS:
            return S_UNSUPP
        for sector, count, flags in _SEGMENT.iter_unpack(segments):
            if count > MAX_DISCARD_SECTORS or not self._in_range(sector, count * SECTOR):
                return S_IOERR
            if kind == T_WRITE_ZEROES and not flags & SEGMENT_UNMAP:
                mode = FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
            else:  # discard, or zeroes that may unmap: a hole reads as zeroes
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            try:
                fallocate(self.disk.fd, mode, sector * SECTOR, count * SECTOR)
            except OSError as error:
                if error.errno != errno.EOPNOTSUPP or mode & FALLOC_FL_PUNCH_HOLE:
                    raise
                fallocate(self.disk.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, sector * SECTOR, count * SECTOR)
            if self.write_observer is not None:
                self.write_observer(sector * SECTOR, count * SECTOR)
        return S_OK

    def close(self) -> None:
        self.disk.close()
