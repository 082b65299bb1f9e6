"""Snapshots from the control socket and `pykvm restore`: the guest continues where it stopped;
damaged, truncated, foreign and too-new files are refused with exit status 2."""

from __future__ import annotations

import json
import os
import re
import struct

import pytest

from pykvm.transfer import snapshot
from tests.conftest import VmmProcess, requires_kvm, run_pykvm

pytestmark = requires_kvm


def _ctl(sock: str, *command: str) -> dict:
    result = run_pykvm("ctl", sock, *command)
    reply = json.loads(result.stdout)
    assert (result.returncode == 0) == reply["ok"]
    return reply


@pytest.fixture
def dirty_snapshot(tmp_path, guest_images):
    """A snapshot of `dirty` taken while it runs, and the generation it had reached."""
    sock, snap = str(tmp_path / "ctl.sock"), str(tmp_path / "dirty.snap")
    vmm = VmmProcess("run", "dirty", "--append", "pages=512", "--control", sock)
    try:
        vmm.wait_for(b"pages/s")
        assert _ctl(sock, "snapshot", snap)["bytes"] > 0
        assert _ctl(sock, "quit")["ok"]
        assert vmm.wait() == 0
    finally:
        vmm.kill()
    generations = [int(g) for g in re.findall(r"gen=(\d+)", vmm.output)]
    return snap, max(generations)


def test_restored_dirty_guest_keeps_counting_and_checking(dirty_snapshot):
    snap, generation = dirty_snapshot
    vmm = VmmProcess("restore", snap)
    try:
        vmm.wait_for(b"\n", count=3)  # complete report lines from the restored guest
    finally:
        vmm.kill()
    restored = [int(g) for g in re.findall(r"gen=(\d+)", vmm.output)]
    assert restored and min(restored) >= generation // 2  # continues from the snapshot, not from 0
    assert "mismatch" not in vmm.output  # the guest checked every page it had written


def test_restored_compute_finishes_with_the_right_result(tmp_path, guest_images):
    sock, snap = str(tmp_path / "ctl.sock"), str(tmp_path / "c.snap")
    vmm = VmmProcess("run", "compute", "--append", "rounds=400", "--control", sock)
    try:
        vmm.wait_for(b"compute: rounds=400")
        assert _ctl(sock, "stop")["status"] == "paused"
        assert _ctl(sock, "query-status")["status"] == "paused"
        _ctl(sock, "snapshot", snap)
        _ctl(sock, "quit")
        vmm.wait()
    finally:
        vmm.kill()
    assert b"compute: ok" not in vmm.stdout.data  # stopped before it could finish
    result = run_pykvm("restore", snap, timeout=120)
    assert result.returncode == 0, result.stderr
    assert b"compute: ok rounds=400 primes=78498" in result.stdout


def _corrupt(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))


def _section(path: str, kind: int):
    with open(path, "rb") as f:
        header = snapshot.Header.parse(f.read(snapshot.Header.sizeof()))
        for _ in range(header.sections):
            entry = snapshot.SectionEntry.parse(f.read(snapshot.SectionEntry.sizeof()))
            if entry.kind == kind:
                return entry
    raise AssertionError(f"no section {kind}")


def _refused(result, *fragments: str) -> None:
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("pykvm: error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err


def test_damaged_state_section_is_refused(dirty_snapshot):
    snap, _ = dirty_snapshot
    state = _section(snap, snapshot.SectionKind.STATE)
    _corrupt(snap, state.offset + state.length // 2)
    _refused(run_pykvm("restore", snap), "damaged snapshot", "state section checksum mismatch")


def test_damaged_memory_is_caught_by_verify(dirty_snapshot):
    snap, _ = dirty_snapshot
    memory = _section(snap, snapshot.SectionKind.MEMORY)
    _corrupt(snap, memory.offset + 0x100000 + 17)  # inside the guest image
    _refused(run_pykvm("restore", snap, "--verify"), "RAM slot 0 checksum mismatch")


def test_truncated_snapshot_is_refused(dirty_snapshot):
    snap, _ = dirty_snapshot
    os.truncate(snap, os.path.getsize(snap) - 4096)
    _refused(run_pykvm("restore", snap), "truncated snapshot")


def test_foreign_file_is_refused(tmp_path, guest_images):
    _refused(run_pykvm("restore", str(guest_images["hello"])), "not a pykvm snapshot")
    _refused(run_pykvm("restore", str(tmp_path / "missing.snap")), "no such file")


def test_newer_format_version_is_refused_by_name(dirty_snapshot):
    snap, _ = dirty_snapshot
    with open(snap, "r+b") as f:
        header = bytearray(f.read(snapshot.Header.sizeof()))
        struct.pack_into("<I", header, 8, snapshot.VERSION + 1)
        struct.pack_into("<I", header, 16, 0)
        f.seek(0)
        f.write(header)
    _refused(run_pykvm("restore", snap), f"version {snapshot.VERSION + 1} is newer than this pykvm understands")


def test_restore_refuses_another_machine_shape(dirty_snapshot, tmp_path):
    snap, _ = dirty_snapshot
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(4096))
    _refused(run_pykvm("restore", snap, "--disk", str(disk)), "differs from the one asked for")


def test_kv_snapshot_restore_after_sigkill(tmp_path, guest_images):
    """Records acknowledged before the snapshot are served by the restored guest, after the
    first VMM was killed with SIGKILL."""
    from tests.netutil import FrameSocket, Peer

    disk, link = tmp_path / "kv.img", tmp_path / "link.sock"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    sock, snap = str(tmp_path / "ctl.sock"), str(tmp_path / "kv.snap")
    acked = {}
    with FrameSocket(tmp_path / "client.sock", link) as frames:
        vmm = VmmProcess("run", "kv", "--disk", str(disk), "--net", f"socket:{link}", "--control", sock)
        try:
            vmm.wait_for(b"kv: ready")
            peer = Peer(frames)
            for seq in range(1, 21):
                assert peer.udp(9000, f"put {seq} snap-{seq}".encode()) == f"ok {seq}".encode()
                acked[seq] = f"snap-{seq}"
            _ctl(sock, "snapshot", snap)
            vmm.proc.send_signal(9)
            vmm.wait()
        finally:
            vmm.kill()
        restored = VmmProcess("restore", snap)
        try:
            peer = Peer(frames)
            for seq, value in acked.items():
                assert _retrying_get(peer, seq) == f"val {seq} {value}".encode()
        finally:
            restored.kill()


def _retrying_get(peer, seq: int) -> bytes:
    """The restored VMM binds the link's socket as it starts: retry until it answers."""
    for _ in range(100):
        try:
            if peer.guest_mac is None:
                peer.resolve()
            return peer.udp(9000, f"get {seq}".encode(), timeout=0.2)
        except (TimeoutError, ConnectionRefusedError, FileNotFoundError):
            peer.guest_mac = None
            import time

            time.sleep(0.05)  # the VMM is still starting: its socket is not bound yet
    raise TimeoutError(f"get {seq}: no answer")
