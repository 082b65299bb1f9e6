"""Live migration between two pykvm processes over loopback TCP, and every way it can fail:
the side that did not fail keeps (or never starts) the guest."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time

import pytest

from pykvm.memory import PAGE_SIZE, ram_hash
from pykvm.transfer import wire
from pykvm.transfer.snapshot import open_snapshot
from pykvm.machine import Machine, MachineConfig
from pykvm.transfer.migration import SCAN_PIECE, migrate_in, migrate_out
from pykvm.state import encode
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.netutil import send_a_stray_pages_frame

pytestmark = requires_kvm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ctl(sock: str, *command: str) -> dict:
    result = run_pykvm("ctl", sock, *command)
    return json.loads(result.stdout)


def _generations(text: str) -> list[int]:
    return [int(g) for g in re.findall(r"gen=(\d+)\n", text)]


def test_migrate_dirty_guest(tmp_path, guest_images):
    sock, uri = str(tmp_path / "src.sock"), f"tcp:127.0.0.1:{_free_port()}"
    target = VmmProcess("run", "dirty", "--incoming", uri)
    source = VmmProcess("run", "dirty", "--append", "pages=4096", "--control", sock)
    try:
        target.stderr.wait_for(b"waiting for a migration")
        source.wait_for(b"\n", count=3)
        reply = _ctl(sock, "migrate", uri)
        assert reply["ok"], reply
        assert reply["status"] == "migrated" and reply["downtime_ms"] < 1000
        assert source.wait() == 0  # the source stops once the target has the guest
        assert "migrated to" in source.errors and "migrate: round 0" in source.errors
        before = max(_generations(source.output))
        target.wait_for(b"\n", count=3)  # the guest carries on at the target...
        after = _generations(target.output)
        assert after and min(after) >= before  # ...from where it was, every page checked
        assert "mismatch" not in target.output
    finally:
        source.kill()
        target.kill()


def test_a_snapshot_does_not_make_untouched_ram_count_as_used(tmp_path, guest_images):
    """A 1 GiB guest that touched a few hundred pages: a snapshot reads only the pages it
    populated (reading the others would map them, and a later migration would send all of
    RAM). The snapshot is whole all the same (its RAM checksums verify), and the migration
    after it sends the touched pages in round 0, not the GiB, and the guest runs on checked."""
    sock, uri = str(tmp_path / "src.sock"), f"tcp:127.0.0.1:{_free_port()}"
    target = VmmProcess("run", "dirty", "--mem", "1G", "--incoming", uri)
    source = VmmProcess("run", "dirty", "--mem", "1G", "--append", "pages=256", "--control", sock)
    try:
        target.stderr.wait_for(b"waiting for a migration")
        source.wait_for(b"\n", count=3)
        snap = str(tmp_path / "vm.snap")
        assert _ctl(sock, "snapshot", snap)["ok"]
        open_snapshot(snap, verify_memory=True).close()
        reply = _ctl(sock, "migrate", uri)
        assert reply["ok"] and reply["status"] == "migrated", reply
        assert source.wait() == 0
        round0 = int(re.search(r"migrate: round 0: (\d+) pages", source.errors)[1])
        assert round0 < (1 << 30) // PAGE_SIZE // 64, source.errors  # the guest wrote ~300 pages of 262144
        before = max(_generations(source.output))
        target.wait_for(b"\n", count=3)
        assert min(_generations(target.output)) >= before and "mismatch" not in target.output
    finally:
        source.kill()
        target.kill()


def _page_of_snapshot(path: str, page: int) -> bytes:
    snapshot = open_snapshot(path)
    try:
        return os.pread(snapshot.fd, PAGE_SIZE, snapshot.memory_offsets[0] + page * PAGE_SIZE)
    finally:
        snapshot.close()


def test_pages_before_any_hello_never_reach_the_targets_ram(tmp_path, guest_images):
    """A connection whose first frame is a well-formed PAGES frame (a stray or hostile peer) is
    dropped, and its data lands nowhere: round 0 sends only the pages the source's guest
    populated, the target's others must stay zero. A page the guest never wrote reads as zeros
    in the target's snapshot after the migration."""
    source_ctl, target_ctl = str(tmp_path / "src.sock"), str(tmp_path / "dst.sock")
    port = _free_port()
    uri = f"tcp:127.0.0.1:{port}"
    target = VmmProcess("run", "dirty", "--incoming", uri, "--control", target_ctl)
    source = VmmProcess("run", "dirty", "--append", "pages=256", "--control", source_ctl)
    untouched = (40 << 20) // PAGE_SIZE  # in the default 64M of RAM; `dirty` writes its pages low
    try:
        target.stderr.wait_for(b"waiting for a migration")
        send_a_stray_pages_frame(port, untouched)
        target.stderr.wait_for(b"still waiting for a migration")
        source.wait_for(b"\n", count=2)
        reply = _ctl(source_ctl, "migrate", uri)
        assert reply["ok"] and reply["status"] == "migrated", reply
        assert source.wait() == 0
        target.wait_for(b"\n", count=2)  # the guest runs on at the target
        assert _ctl(target_ctl, "snapshot", str(tmp_path / "dst.snap"))["ok"]
        assert _page_of_snapshot(str(tmp_path / "dst.snap"), untouched) == bytes(PAGE_SIZE)
    finally:
        source.kill()
        target.kill()


def test_migration_to_nobody_keeps_the_guest_here(tmp_path, guest_images):
    sock = str(tmp_path / "src.sock")
    source = VmmProcess("run", "dirty", "--control", sock)
    try:
        source.wait_for(b"pages/s")
        reply = _ctl(sock, "migrate", f"tcp:127.0.0.1:{_free_port()}")
        assert not reply["ok"] and "refused" in reply["error"].lower()
        assert _ctl(sock, "query-status")["status"] == "running"
        count = source.stdout.data.count(b"\n")
        source.wait_for(b"\n", count=count + 1)  # still printing
    finally:
        source.kill()


def test_target_with_another_config_refuses(tmp_path, guest_images):
    sock, uri = str(tmp_path / "src.sock"), f"tcp:127.0.0.1:{_free_port()}"
    target = VmmProcess("run", "dirty", "--mem", "128M", "--incoming", uri)
    source = VmmProcess("run", "dirty", "--control", sock)
    try:
        target.stderr.wait_for(b"waiting for a migration")
        source.wait_for(b"pages/s")
        reply = _ctl(sock, "migrate", uri)
        assert not reply["ok"] and "refused" in reply["error"] and "128 MiB" in reply["error"]
        assert _ctl(sock, "query-status")["status"] == "running"
        assert target.wait() == 1
        assert target.output == ""  # the target never ran the guest
    finally:
        source.kill()
        target.kill()


def test_target_dying_midway_leaves_the_source_running(tmp_path, guest_images):
    """A 'target' that accepts, says READY, reads a little and hangs up."""
    sock = str(tmp_path / "src.sock")
    server = socket.create_server(("127.0.0.1", 0))
    uri = f"tcp:127.0.0.1:{server.getsockname()[1]}"
    source = VmmProcess("run", "dirty", "--append", "pages=4096", "--control", sock)
    try:
        source.wait_for(b"pages/s")
        import threading

        def fake_target() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(4096)  # the HELLO (or its start)
                wire.send_buffers(conn, wire.frame(wire.Kind.READY, 0))
                conn.recv(65536)  # some pages, then gone

        thread = threading.Thread(target=fake_target)
        thread.start()
        reply = _ctl(sock, "migrate", uri)
        thread.join()
        assert not reply["ok"] and "keeps running here" in reply["error"]
        assert _ctl(sock, "query-status")["status"] == "running"
        count = source.stdout.data.count(b"\n")
        source.wait_for(b"\n", count=count + 1)
    finally:
        source.kill()
        server.close()


@pytest.mark.parametrize("how", ["eof-after-pages", "corrupted-frame"])
def test_source_dying_midway_target_never_runs(tmp_path, guest_images, how):
    uri = f"tcp:127.0.0.1:{_free_port()}"
    target = VmmProcess("run", "dirty", "--incoming", uri)
    try:
        target.stderr.wait_for(b"waiting for a migration")
        with socket.create_connection(("127.0.0.1", int(uri.rsplit(":", 1)[1]))) as conn:
            wire.send_buffers(conn, wire.frame(wire.Kind.HELLO, 0, encode(MachineConfig())))
            ready = wire.receive_frame(conn, wire.Decoder(lambda *a: []))
            assert ready.kind == wire.Kind.READY
            page = memoryview(bytearray(4096 * 4))
            import numpy as np

            buffers, _ = wire.page_frames(1, 0, page, np.arange(4))
            data = b"".join(bytes(b) for b in buffers)
            if how == "corrupted-frame":
                data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
                conn.sendall(data)
            else:
                conn.sendall(data)
        status = target.wait()
        assert status == 1
        assert "failed before completion" in target.errors
        assert target.output == ""  # the guest never ran there
    finally:
        target.kill()


def test_migrate_kv_under_client_load(tmp_path, guest_images):
    """A client keeps writing while the kv guest migrates: no acknowledged record is lost, the
    client sees a pause, and the target serves everything on the same link."""
    import threading

    from tests.netutil import FrameSocket, Peer

    disk, link = tmp_path / "kv.img", tmp_path / "link.sock"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    sock, uri = str(tmp_path / "src.sock"), f"tcp:127.0.0.1:{_free_port()}"
    target = VmmProcess("run", "kv", "--disk", str(disk), "--net", f"socket:{link}", "--incoming", uri)
    source = VmmProcess("run", "kv", "--disk", str(disk), "--net", f"socket:{link}", "--control", sock)
    acked, stop, errors, warmed_up = {}, threading.Event(), [], threading.Event()
    try:
        target.stderr.wait_for(b"waiting for a migration")
        source.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "client.sock", link) as frames:
            peer = Peer(frames, timeout=0.2)

            def client() -> None:
                seq = 0
                while not stop.is_set() or seq < 40:
                    seq += 1
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        try:
                            if peer.guest_mac is None:
                                peer.resolve()
                            if peer.udp(9000, f"put {seq} m-{seq}".encode()) == f"ok {seq}".encode():
                                acked[seq] = f"m-{seq}"
                                if len(acked) == 10:
                                    warmed_up.set()
                                break
                        except TimeoutError:
                            peer.guest_mac = None
                        except OSError:
                            # mid-handover nobody is bound to the link: a client can only retry
                            peer.guest_mac = None
                            time.sleep(0.01)
                    else:
                        errors.append(seq)
                        return

            thread = threading.Thread(target=client)
            thread.start()
            assert warmed_up.wait(60), "the client never got going"
            reply = _ctl(sock, "migrate", uri)
            stop.set()
            thread.join(120)
            assert reply["ok"], reply
            assert not errors and len(acked) >= 40, f"source:\n{source.errors}\ntarget:\n{target.errors}\n{target.output}"
            assert source.wait() == 0
            for seq, value in acked.items():
                assert peer.udp(9000, f"get {seq}".encode()) == f"val {seq} {value}".encode()
    finally:
        stop.set()
        source.kill()
        target.kill()


def test_round_0_sends_every_piece_of_ram(tmp_path):
    """Round 0 scans and sends RAM 64 MiB at a time (migration.SCAN_PIECE): pages written before
    the migration, and never again, reach the target from every piece, the first and last pages
    of a piece and of RAM included (nothing dirties them later, so round 0 alone carries them)."""
    size = 3 * SCAN_PIECE * PAGE_SIZE + 16 * PAGE_SIZE  # three whole pieces and a short last one
    config = MachineConfig(memory=size)
    marked = [SCAN_PIECE - 1, SCAN_PIECE, 2 * SCAN_PIECE + 5, 3 * SCAN_PIECE, size // PAGE_SIZE - 1]
    server = socket.create_server(("127.0.0.1", 0))
    uri = f"tcp:127.0.0.1:{server.getsockname()[1]}"
    with Machine(config, serial_output=lambda data: None) as source, \
            Machine(config, serial_output=lambda data: None) as target:
        source.load(b"\xfa\xf4\xeb\xfd", load_addr=0x100000)  # cli; hlt; jmp back: writes nothing
        for page in marked:
            source.vm.memory.write(page * PAGE_SIZE + 7, f"page {page}".encode())
        source.vm.start()
        received: list = []
        thread = threading.Thread(target=lambda: received.append(migrate_in(target, server, say=lambda line: None)))
        thread.start()
        figures = migrate_out(source, uri, progress=lambda line: None)
        thread.join()
        assert figures["status"] == "migrated" and received
        for page in marked:
            assert target.vm.memory.read(page * PAGE_SIZE + 7, len(f"page {page}")) == f"page {page}".encode()
        assert ram_hash(target.vm.memory) == ram_hash(source.vm.memory)
