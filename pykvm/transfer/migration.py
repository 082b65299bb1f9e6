"""Live migration over TCP: pre-copy of RAM while the guest runs, then a short stop-and-copy.

Source (`pykvm ctl SOCK migrate tcp:HOST:PORT`):
  1. HELLO with the machine's configuration; the target answers READY, or REFUSED and why.
  2. Round 0 sends every populated page (the target's RAM starts zeroed); each following round
     sends the pages dirtied meanwhile (KVM's dirty log merged with the VMM's own writes),
     until a round is small enough or stops shrinking.
  3. Quiesce (vCPUs paused, device threads held), send the last dirty pages, the machine state
     and SYNC_END (a migration is one long sync); wait for the target's ACK. Then the source
     stops; the target runs.
Any failure before the ACK leaves the source running (it resumes) and is reported.

Target (`pykvm run ... --incoming tcp:HOST:PORT`): accepts the first connection that says HELLO
(connections that fail the TLS handshake or send anything else are dropped), checks the config,
receives pages straight into guest RAM (recvmsg_into on memoryviews; recv_into under TLS), restores the state on
SYNC_END, ACKs, and only then runs. A stream that ends early means the target never runs the guest;
so does one that sends more than a source can (over MAX_ROUNDS + 1 times RAM's pages, a second
machine state): the target says why and exits, rather than receiving for ever.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Callable

import numpy as np

from pykvm.errors import ConfigError
from pykvm.kvm import KvmError
from pykvm.machine import Machine, MachineConfig, MachineState
from pykvm.memory import PAGE_SIZE, dirty_pages, page_runs, populated_pages
from pykvm.run_control import RunState, StopKind
from pykvm.state import StateError, decode, encode
from pykvm.transfer import channel, wire
from pykvm.transfer.snapshot import check_same_shape
from pykvm.transfer.tls import TlsCredentials

CONVERGED_PAGES = 256  # a round this small is sent with the guest stopped
MAX_ROUNDS = 30
SCAN_PIECE = (64 << 20) // PAGE_SIZE  # round 0 finds and sends populated pages 64 MiB of RAM at a time
CONNECT_TIMEOUT = 5.0
PEER_TIMEOUT = 30.0  # no byte from the peer for this long: it is gone
GREETING_TIMEOUT = 5.0  # a connection that has not sent a whole HELLO within this is dropped


class MigrationError(Exception):
    """Migration failed; the message says why. The side that raises it has not lost the guest."""


# -- source --------------------------------------------------------------------------------------------


def migrate_out(machine: Machine, uri: str, *, tls: TlsCredentials | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    """Send the running machine to `uri` (with `tls`, over mutual TLS); on success the machine
    is stopped and figures returned."""
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    try:
        sock = channel.connect(uri, tls, CONNECT_TIMEOUT)
    except OSError as error:
        raise MigrationError(f"migration to {uri} failed: {error.strerror or channel.describe(error)}") from None
    vm = machine.vm
    started = time.perf_counter()
    try:
        with sock:
            sock.settimeout(PEER_TIMEOUT)
            sender = _Sender(sock)
            sender.send(wire.Kind.HELLO, encode(machine.config))
            reply = sender.reply()
            if reply.kind == wire.Kind.REFUSED:
                raise MigrationError(f"the target refused the migration: {reply.payload.decode(errors='replace')}")
            if reply.kind != wire.Kind.READY:
                raise MigrationError(f"unexpected {reply.kind.name} from the target")
            vm.set_dirty_logging(True)
            try:
                totals = _precopy(machine, sender, say)
                downtime_start = time.perf_counter()
                with machine.quiesced("migration"):
                    final = sender.send_dirty(machine, live=False)  # stopped: every byte hashed
                    sender.send(wire.Kind.MACHINE_STATE, encode(machine.save_state()))
                    sender.send(wire.Kind.SYNC_END, b"{}")
                    ack = sender.reply()
                    if ack.kind == wire.Kind.REFUSED:
                        raise MigrationError(f"the target refused the machine state, the guest keeps running here: "
                                             f"{ack.payload.decode(errors='replace')}")
                    if ack.kind != wire.Kind.ACK:
                        raise MigrationError(f"the target answered {ack.kind.name} instead of ACK")
                    downtime = time.perf_counter() - downtime_start
                    vm.stop(0, f"migrated to {uri}", kind=StopKind.MIGRATED)
                    machine.detach_networks()  # the target is waiting to take the NICs' backends
            finally:
                if vm.state is not RunState.STOPPED:
                    vm.set_dirty_logging(False)
    except (OSError, wire.ProtocolError) as error:
        raise MigrationError(f"migration to {uri} failed, the guest keeps running here: "
                             f"{channel.describe(error)}") from None
    elapsed = time.perf_counter() - started
    pages = totals["pages"] + final
    say(f"migrate: done: {pages} pages in {totals['rounds']} rounds + {final} stopped, "
        f"downtime {downtime * 1000:.1f} ms, total {elapsed:.2f} s")
    first_pages, first_seconds = totals["per_round"][0]
    return {"status": "migrated", "rounds": totals["rounds"], "pages": pages, "final_pages": final,
            "round0_mb_per_s": round(first_pages * PAGE_SIZE / max(first_seconds, 1e-9) / 1e6, 1),
            "downtime_ms": round(downtime * 1000, 3), "seconds": round(elapsed, 3),
            "mb_per_s": round(pages * PAGE_SIZE / elapsed / 1e6, 1)}


def _precopy(machine: Machine, sender: _Sender, say: Callable[[str], None]) -> dict:
    rounds: list[tuple[int, float]] = []  # (pages, seconds) per round
    while len(rounds) < MAX_ROUNDS:
        started = time.perf_counter()
        if not rounds:
            count = sender.send_populated(machine)
        else:
            count = sender.send_dirty(machine, live=True)
        elapsed = time.perf_counter() - started
        rounds.append((count, elapsed))
        say(f"migrate: round {len(rounds) - 1}: {count} pages, {count * PAGE_SIZE / max(elapsed, 1e-9) / 1e6:.0f} MB/s")
        if len(rounds) > 1 and (count <= CONVERGED_PAGES or count >= rounds[-2][0]):
            break  # small enough, or the guest dirties as fast as we send: stop and copy
    return {"pages": sum(p for p, _ in rounds), "rounds": len(rounds), "per_round": rounds}


class _Sender:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0
        self.replies = wire.Decoder(_no_pages)

    def send(self, kind: wire.Kind, payload: bytes) -> None:
        wire.send_buffers(self.sock, wire.frame(kind, self.seq, payload))
        self.seq += 1

    def send_pages(self, slot: int, view: memoryview, pages: np.ndarray, *, live: bool) -> int:
        if len(pages):
            buffers, self.seq = wire.page_frames(self.seq, slot, view, pages, live=live)
            wire.send_buffers(self.sock, buffers)
        return len(pages)

    def send_populated(self, machine: Machine) -> int:
        """Round 0: every populated page, found a piece of RAM at a time. Scanning all of a 1 GiB
        slot first (pagemap: 8-17 ms beside a running vCPU) held back the first byte; piece by
        piece, the first pages leave at once, and each next scan runs while the target drains
        the socket buffer of the piece before (the bulk round about a tenth faster here)."""
        count = 0
        for slot in machine.vm.memory.slots:
            for first in range(0, slot.pages, SCAN_PIECE):
                pages = populated_pages(slot, first, min(first + SCAN_PIECE, slot.pages))
                count += self.send_pages(slot.index, slot.view, pages, live=True)
        return count

    def send_dirty(self, machine: Machine, *, live: bool) -> int:
        count = 0
        for slot in machine.vm.memory.slots:
            count += self.send_pages(slot.index, slot.view, dirty_pages(machine.vm.dirty_bitmap(slot)), live=live)
        return count

    def reply(self) -> wire.Frame:
        return wire.receive_frame(self.sock, self.replies)


def _no_pages(slot: int, pages: np.ndarray) -> list[memoryview]:
    raise wire.ProtocolError("pages from the migration target")


# -- target --------------------------------------------------------------------------------------------


def migrate_in(machine: Machine, server: socket.socket, *, tls: TlsCredentials | None = None,
               say: Callable[[str], None] | None = None) -> dict:
    """Receive a machine into `machine` (built from the same configuration, RAM untouched) from
    the first connection that says HELLO (with `tls`: past the handshake; others are dropped).
    Returns figures once the state is restored; raises MigrationError otherwise."""
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    memory = machine.vm.memory
    slots = {slot.index: slot for slot in memory.slots}

    admitted = False  # the decoder asks for page buffers on a frame's head: none before the HELLO
    # A pykvm source sends RAM at most in each of its MAX_ROUNDS live rounds and its stopped one;
    # one that sends more is no such source, and would hold this target for ever.
    most = (MAX_ROUNDS + 1) * sum(slot.pages for slot in memory.slots)
    pages = 0

    def sink(index: int, numbers: np.ndarray) -> list[memoryview]:
        nonlocal pages
        if not admitted:  # a stray peer's data would stay in RAM wherever round 0 sends nothing
            raise wire.ProtocolError("PAGES before any HELLO")
        slot = slots.get(index)
        if slot is None or (len(numbers) and int(numbers.max()) >= slot.pages):
            raise wire.ProtocolError(f"pages outside guest RAM (slot {index})")
        pages += len(numbers)
        if pages > most:  # on the frame's head: refused before its data comes
            raise wire.ProtocolError(f"more pages than a migration of this guest sends ({pages} against at most "
                                     f"{MAX_ROUNDS + 1} rounds of all its RAM, {most})")
        return [slot.view[first * PAGE_SIZE : (first + count) * PAGE_SIZE] for first, count in page_runs(numbers)]

    conn, peer, decoder, hello = _await_source(server, tls, sink, say)
    server.close()
    seq = 1  # after READY
    state: MachineState | None = None
    with conn:
        conn.settimeout(PEER_TIMEOUT)
        try:
            _admit(conn, peer, hello, machine.config)
            admitted = True
            while True:
                frame = wire.receive_frame(conn, decoder)
                if frame.kind == wire.Kind.MACHINE_STATE:
                    if state is not None:  # a source sends one, with the guest stopped
                        raise wire.ProtocolError("a second machine state")
                    state = decode(MachineState, frame.payload)
                elif frame.kind == wire.Kind.SYNC_END:
                    break
                elif frame.kind != wire.Kind.PAGES:  # (pages were counted, and landed in RAM, as they came)
                    raise wire.ProtocolError(f"unexpected {frame.kind.name} during migration")
            if state is None:
                raise wire.ProtocolError("SYNC_END without the machine state")
            try:
                machine.restore_state(state)
            except (StateError, KvmError) as error:  # the source hears why, and keeps its guest
                reason = f"the state does not restore: {error}".encode()
                wire.send_buffers(conn, wire.frame(wire.Kind.REFUSED, seq, reason))
                raise
            wire.send_buffers(conn, wire.frame(wire.Kind.ACK, seq, b'{"restored": true}'))
        except (OSError, ConnectionError, wire.ProtocolError, StateError) as error:
            raise MigrationError(f"incoming migration from {peer[0]} failed before completion: {error}") from None
    say(f"migrate: received {pages} pages from {peer[0]}; running")
    return {"pages": pages}


def _admit(conn: socket.socket, peer: tuple, hello: wire.Frame, config: MachineConfig) -> None:
    """READY if the source's machine has our shape; otherwise REFUSED, and MigrationError."""
    try:
        check_same_shape(decode(MachineConfig, hello.payload), config)
    except (ConfigError, StateError) as error:
        wire.send_buffers(conn, wire.frame(wire.Kind.REFUSED, 0, str(error).encode()))
        raise MigrationError(f"refused an incoming migration from {peer[0]}: {error}") from None
    wire.send_buffers(conn, wire.frame(wire.Kind.READY, 0))


def _await_source(server: socket.socket, tls: TlsCredentials | None, sink: wire.PageSink,
                  say: Callable[[str], None]) -> tuple[socket.socket, tuple, wire.Decoder, wire.Frame]:
    """The first connection whose first frame is a HELLO. One that fails the TLS handshake,
    sends anything else or nothing (a port scan, a stray client) is dropped: we go on waiting."""
    while True:
        conn, peer = channel.accept(server, tls, say, "migrate")
        decoder = wire.Decoder(sink, allow_live_data=True)  # each kind's size bounded (wire.FRAME_LIMITS)
        try:  # the whole HELLO within the deadline: a peer dribbling bytes would hold us for ever
            hello = wire.receive_frame(conn, decoder, deadline=time.monotonic() + GREETING_TIMEOUT)
            if hello.kind == wire.Kind.HELLO:
                return conn, peer, decoder, hello
            reason = f"{hello.kind.name} before any HELLO"
        except TimeoutError:
            reason = f"no whole HELLO within {GREETING_TIMEOUT:g} s"
        except (OSError, wire.ProtocolError) as error:  # ConnectionError included
            reason = channel.describe(error)
        conn.close()
        say(f"migrate: dropped a connection from {peer[0]}: {reason}; still waiting for a migration")
