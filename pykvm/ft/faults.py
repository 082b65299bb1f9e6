"""Deterministic fault injection for the FT tests: one fault per VMM process, named by the
environment variable `PYKVM_FT_FAULT=NAME[:ARG...]` and read once, at import.

Each fault is injected by one hook, a call at one point of a sync, of the loss of the standby or of
a takeover, in ft.primary, ft.disk_mode or ft.standby:

    fault                          side     hook             what happens
    primary-thread-crash           primary  syncing_output   the FT thread raises at its first sync
                                                             for an output (it must fence itself)
    primary-capture-fails          primary  capturing        taking a sync for a held output fails
                                                             inside the pause (pipelined and cow modes:
                                                             on the vCPU that parked last): the guest
                                                             runs on, the FT thread must fence itself
    primary-die-after-bytes:K:N    primary  sending_sync,    the process SIGKILLs itself once N bytes
                                            sync_sent        of sync K are sent, or all of it if it is
                                                             shorter (before the Ack is read)
    primary-flush-fails:K          primary  flushing_own     the primary's own flush of the disks the
                                                             guest flushed in sync K fails (EIO): it
                                                             must fence, the sync's outputs never leave
    primary-flush-fails-alone      primary  flushing_alone   the primary lost its standby; its flush of
                                                             the disks, before it claims the epoch and
                                                             goes on alone, fails (EIO): it must fence
                                                             unclaimed, releasing nothing it held
    primary-die-holding-write:K    primary  acknowledged     the Ack of the first sync from K on that
                                                             covers a held disk write (shared disks;
                                                             a VIRTIO_BLK_T_OUT chain, not a flush)
                                                             came; the process SIGKILLs itself before
                                                             releasing anything
    link-cut-after-ack:K           primary  acknowledged     the Ack of sync K came, its outputs are not
                                                             released yet: the primary's end of the link
                                                             goes silent without closing (what it sends
                                                             goes nowhere, nothing arrives)
    standby-disk-fails:K[:ERRNO]   standby  writing_disk     the standby's disk fails from sync K (> 1)
                                                             on: its writes raise ERRNO (an errno
                                                             name; EIO unless given)
    standby-die-before-ack:K       standby  acking           sync K is committed; the process SIGKILLs
                                                             itself before the Ack goes out
    standby-takeover-flush-fails   standby  taking_over      the primary is lost; the standby's flush of
                                                             its disks, before the guest runs and the
                                                             epoch is claimed, fails (EIO): it must not
                                                             take over (exit 1, the epoch unclaimed)

Syncs are numbered as on the wire and in `took over from sync N`: the full sync is 1. A sync is
sent in several pieces (a frame of pages each): N counts across them. Unset, a hook costs one
comparison (and `sending_sync` is a plain send): the variable is for tests, never for users.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections import Counter
from dataclasses import dataclass

from pykvm.transfer import wire

ENVIRONMENT = "PYKVM_FT_FAULT"
ARGUMENTS = {  # fault -> its arguments' names (a trailing "?" marks the optional one)
    "primary-thread-crash": (),
    "primary-capture-fails": (),
    "primary-die-after-bytes": ("K", "N"),
    "primary-flush-fails": ("K",),
    "primary-flush-fails-alone": (),
    "primary-die-holding-write": ("K",),
    "link-cut-after-ack": ("K",),
    "standby-disk-fails": ("K", "ERRNO?"),
    "standby-die-before-ack": ("K",),
    "standby-takeover-flush-fails": (),
}


@dataclass(frozen=True)
class Fault:
    name: str
    sync: int = 0  # K
    bytes: int = 0  # N
    errno: int = errno.EIO


def parse(text: str) -> Fault | None:
    """`NAME[:ARG...]` -> a Fault; "" -> None. Anything else is a mistake in a test: ValueError."""
    if not text:
        return None
    name, *values = text.split(":")
    names = ARGUMENTS.get(name)
    required = [n for n in names or () if not n.endswith("?")]
    if names is None or not len(required) <= len(values) <= len(names):
        usage = ", ".join(fault + "".join(f"[:{a[:-1]}]" if a.endswith("?") else f":{a}" for a in arguments)
                          for fault, arguments in ARGUMENTS.items())
        raise ValueError(f"{ENVIRONMENT}={text!r}: expected one of {usage}")
    try:
        numbers = [int(value) for value in values[: len(required)]]
        code = getattr(errno, values[1]) if name == "standby-disk-fails" and len(values) == 2 else errno.EIO
    except (ValueError, AttributeError):
        raise ValueError(f"{ENVIRONMENT}={text!r}: K and N are numbers, ERRNO an errno name (EIO, ENOSPC)") from None
    return Fault(name, *numbers, errno=code)


FAULT = parse(os.environ.get(ENVIRONMENT, ""))
_sent = 0  # bytes of the doomed sync sent so far
_silenced: list[object] = []  # a cut link's ends, kept open: closing them would tell the standby


def _is(name: str, sync: int = 0) -> bool:
    return FAULT is not None and FAULT.name == name and FAULT.sync == sync


def _fail_io(code: int = errno.EIO) -> None:
    """As a failing disk would."""
    raise OSError(code, f"{os.strerror(code)} (injected: {ENVIRONMENT})")


def _die() -> None:
    """As a crash would: no cleanup, no goodbye; the kernel closes the sockets."""
    os.kill(os.getpid(), signal.SIGKILL)


# -- the primary ----------------------------------------------------------------------------------

def syncing_output(trigger: str) -> None:
    """The FT thread is about to sync for a held output (trigger "blk" or "net")."""
    if FAULT is not None and FAULT.name == "primary-thread-crash" and trigger in ("blk", "net"):
        raise RuntimeError(f"injected fault ({ENVIRONMENT}=primary-thread-crash)")


def capturing(trigger: str) -> None:
    """A sync (trigger "blk" or "net": for a held output) is being taken, the machine quiesced."""
    if FAULT is not None and FAULT.name == "primary-capture-fails" and trigger in ("blk", "net"):
        raise RuntimeError(f"injected fault ({ENVIRONMENT}=primary-capture-fails)")


def sending_sync(sock: socket.socket, sync: int, buffers: list) -> int:
    """Send (part of) sync `sync`'s frames; returns the bytes sent."""
    if not _is("primary-die-after-bytes", sync):
        return wire.send_buffers(sock, buffers)
    global _sent
    left, cut = FAULT.bytes - _sent, []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        cut.append(view[:left])
        left -= len(cut[-1])
    sent = wire.send_buffers(sock, cut)
    _sent += sent
    if _sent >= FAULT.bytes:
        _die()
    return sent


def sync_sent(sync: int) -> None:
    """All of sync `sync` is sent; its Ack is not read yet."""
    if _is("primary-die-after-bytes", sync):
        _die()


def flushing_own(sync: int) -> None:
    """The primary is about to flush its own copy of the disks the guest flushed in sync `sync` (ft.disk_mode)."""
    if _is("primary-flush-fails", sync):
        _fail_io()


def flushing_alone() -> None:
    """The primary lost its standby and is about to flush its own copy of a disk (ft.disk_mode)."""
    if _is("primary-flush-fails-alone"):
        _fail_io()


def acknowledged(sync: int, sock: socket.socket, covered: list) -> None:
    """The standby's Ack of sync `sync` came; the outputs it covers ((function, queue, time) each,
    the oldest chains held on that queue) are still held."""
    if FAULT is not None and FAULT.name == "primary-die-holding-write" and sync >= FAULT.sync \
            and _covers_a_disk_write(covered):
        _die()
    if _is("link-cut-after-ack", sync):
        # The socket's descriptor is pointed at one end of a pair nobody reads, the connection
        # kept open by a duplicate: the primary talks on, into silence, and the standby hears
        # nothing, neither data nor FIN, as when a switch dies.
        connection = os.dup(sock.fileno())
        quiet, nobody = socket.socketpair()
        quiet.setblocking(False)  # the primary's own timeouts apply, as they would on TCP
        os.dup2(quiet.fileno(), sock.fileno())
        _silenced.extend((connection, quiet, nobody))


def _covers_a_disk_write(covered: list) -> bool:
    """Whether a chain `covered` holds is a disk write (not a flush: a write released at an
    earlier sync is on the disk already, and the fault is about one that is not)."""
    from pykvm.devices.virtio.blk import T_OUT, Blk

    counts = Counter((function, queue) for function, queue, _ in covered)
    for (function, queue), count in counts.items():
        if isinstance(function.device, Blk):
            for chain in function.device.held.get(queue, [])[:count]:
                head = chain.in_views[0] if chain.in_views else b""
                if len(head) >= 4 and int.from_bytes(head[:4], "little") == T_OUT:
                    return True
    return False


# -- the standby ----------------------------------------------------------------------------------

def writing_disk(sync: int) -> None:
    """The standby is about to write sync `sync`'s disk changes."""
    if FAULT is not None and FAULT.name == "standby-disk-fails" and sync >= FAULT.sync:
        _fail_io(FAULT.errno)


def acking(sync: int) -> None:
    """Sync `sync` is committed; the standby is about to send its Ack."""
    if _is("standby-die-before-ack", sync):
        _die()


def taking_over() -> None:
    """The primary is lost; the standby is about to flush its disks to take over."""
    if _is("standby-takeover-flush-fails"):
        _fail_io()
