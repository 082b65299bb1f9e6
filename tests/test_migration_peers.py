"""A migration target and peers that are not a pykvm source: one that dribbles its HELLO a byte
at a time must not hold the target (which serves one connection at a time) from the source that
comes after it."""

from __future__ import annotations

import socket

from pykvm.machine import MachineConfig
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
