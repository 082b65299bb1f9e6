"""A migration target and peers that are not a pykvm source: one that dribbles its HELLO a byte
at a time must not hold the target (which serves one connection at a time) from the source that
comes after it; one that never stops sending (pages, or machine states) must not hold it for ever."""

from __future__ import annotations

import socket

import numpy as np

from pykvm.machine import Machine, MachineConfig
from pykvm.memory import PAGE_SIZE
from pykvm.state import encode
from pykvm.transfer import migration, wire
from tests.conftest import VmmProcess, requires_kvm

pytestmark = requires_kvm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_peer_dribbling_its_hello_is_dropped_and_the_target_waits_on(tmp_path, guest_images):
    """Each byte comes well within the per-read timeout, so only a deadline on the whole HELLO
    drops it. Before: the target kept reading it as long as bytes came (for ever), and a real
    source, its connection left in the backlog, timed out waiting for READY."""
    port = _free_port()
    target = VmmProcess("run", "dirty", "--incoming", f"tcp:127.0.0.1:{port}")
    try:
        target.stderr.wait_for(b"waiting for a migration")
        head, payload = wire.frame(wire.Kind.HELLO, 0, encode(MachineConfig()))
        dribbled = bytes(head) + bytes(payload)
        limit = int(migration.GREETING_TIMEOUT * 10)  # bytes, one a second: ten times the deadline
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stray:
            for byte in dribbled[:limit]:
                try:
                    stray.sendall(bytes([byte]))
                except OSError:
                    break  # dropped (a reset): the log line says why
                try:  # a second between bytes, or less once the target has dropped us
                    target.stderr.wait_for(b"dropped a connection", timeout=1)
                    break
                except TimeoutError:
                    pass
            target.stderr.wait_for(b"dropped a connection", timeout=10)
        assert f"no whole HELLO within {migration.GREETING_TIMEOUT:g} s; still waiting" in target.errors
        with socket.create_connection(("127.0.0.1", port), timeout=30) as source:  # it waits on
            wire.send_buffers(source, wire.frame(wire.Kind.HELLO, 0, encode(MachineConfig())))
            assert wire.receive_frame(source, wire.Decoder(lambda slot, pages: [])).kind == wire.Kind.READY
        assert target.wait() == 1  # the source went away before SYNC_END: never ran
        assert target.output == "" and "Traceback" not in target.errors
    finally:
        target.kill()


def test_a_source_that_keeps_sending_pages_is_cut_off(tmp_path, guest_images):
    """A pykvm source sends all of RAM at most in each of its MAX_ROUNDS live rounds and in its
    stopped one. A peer that goes on past that is refused on the head of the frame that goes
    over, and the target exits without running the guest. Before: it received for as long as
    the pages came."""
    port = _free_port()
    memory = 8 << 20
    target = VmmProcess("run", "dirty", "--mem", "8M", "--incoming", f"tcp:127.0.0.1:{port}")
    try:
        target.stderr.wait_for(b"waiting for a migration")
        ram, every_page = memoryview(bytearray(memory)), np.arange(memory // PAGE_SIZE)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as source:
            wire.send_buffers(source, wire.frame(wire.Kind.HELLO, 0, encode(MachineConfig(memory=memory))))
            assert wire.receive_frame(source, wire.Decoder(lambda slot, pages: [])).kind == wire.Kind.READY
            seq = 1
            try:
                for _ in range(migration.MAX_ROUNDS + 2):  # a round of all of RAM more than a source sends
                    buffers, seq = wire.page_frames(seq, 0, ram, every_page, live=True)
                    wire.send_buffers(source, buffers)
            except OSError:
                pass  # cut off midway (a reset): the target's log says why
        assert target.wait() == 1
        assert "more pages than a migration of this guest sends" in target.errors, target.errors
        assert target.output == "" and "Traceback" not in target.errors  # the guest never ran
    finally:
        target.kill()


def test_a_second_machine_state_is_refused(tmp_path, guest_images):
    """A source sends the machine state once, with its guest stopped, just before SYNC_END."""
    port = _free_port()
    memory = 8 << 20
    with Machine(MachineConfig(memory=memory), serial_output=lambda data: None) as machine:
        machine.load(guest_images["dirty"])
        state = encode(machine.save_state())
    target = VmmProcess("run", "dirty", "--mem", "8M", "--incoming", f"tcp:127.0.0.1:{port}")
    try:
        target.stderr.wait_for(b"waiting for a migration")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as source:
            wire.send_buffers(source, wire.frame(wire.Kind.HELLO, 0, encode(MachineConfig(memory=memory))))
            assert wire.receive_frame(source, wire.Decoder(lambda slot, pages: [])).kind == wire.Kind.READY
            wire.send_buffers(source, wire.frame(wire.Kind.MACHINE_STATE, 1, state))
            wire.send_buffers(source, wire.frame(wire.Kind.MACHINE_STATE, 2, state))
            assert target.wait() == 1  # while the connection is still open: it did not wait for more
        assert "a second machine state" in target.errors, target.errors
        assert target.output == "" and "Traceback" not in target.errors  # the guest never ran
    finally:
        target.kill()
