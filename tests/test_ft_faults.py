"""Fault tolerance under faults of the standby's own, on the real thing (VMM processes, the kv
guest, real files and sockets): a standby whose disk fills up, or that receives a damaged sync,
refuses to follow (StandbyFault), exits 1 and never takes over, while the primary goes on
serving every record it acknowledged. A stray connection's page data never reaches a waiting
standby's RAM. And a 2 GiB disk is protected without the primary's memory growing with it."""

from __future__ import annotations

import json
import os
import time
import signal
import socket
from pathlib import Path

import pytest

from pykvm.hostfile import extents
from pykvm.memory import PAGE_SIZE
from pykvm.testing.kv import KvClient
from pykvm.testing.netframes import FrameSocket, Peer
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.netutil import send_a_stray_pages_frame
from tests.relay import Relay
from tests.tmpfs import can_mount, small_tmpfs

pytestmark = requires_kvm
SECTOR = 512


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _sparse(path: Path, size: int, *pieces: tuple[int, bytes]) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces:
            f.seek(offset)
            f.write(data)
    return path


def _put_until_the_standby_exits(peer: Peer, standby: VmmProcess, first: int, patience: float = 60) -> int:
    """Put records from `first` on until the standby process has ended (the puts keep the
    primary syncing, so a fault shows); returns the last acked. Fails after `patience` s."""
    seq, deadline = first, time.monotonic() + patience
    while time.monotonic() < deadline:
        assert peer.udp(9000, f"put {seq} record-{seq}".encode()) == f"ok {seq}".encode()
        if standby.proc.poll() is not None:
            return seq
        seq += 1
    pytest.fail(f"the standby was still following after record {seq}:\n{standby.errors}")


def _primary_goes_on(peer: Peer, acked: int) -> None:
    """Unprotected now, the primary takes more records and serves every one it acknowledged."""
    for seq in range(acked + 1, acked + 11):
        assert peer.udp(9000, f"put {seq} record-{seq}".encode()) == f"ok {seq}".encode()
    for seq in range(1, acked + 11):
        assert peer.udp(9000, f"get {seq}".encode()) == f"val {seq} record-{seq}".encode()


def _assert_faulted_without_takeover(standby: VmmProcess, primary: VmmProcess, reason: str) -> None:
    assert standby.wait() == 1
    faults = [line for line in standby.errors.splitlines() if "will not take over" in line]
    assert len(faults) == 1 and reason in faults[0], standby.errors
    assert "took over" not in standby.errors and standby.output == ""
    primary.stderr.wait_for(b"standby lost")


@pytest.mark.skipif(not can_mount(), reason="mounting a tmpfs needs root")
def test_a_standby_whose_disk_fills_up_faults_and_the_primary_goes_on(tmp_path, guest_images):
    """The standby's disk file is larger than the 2 MiB tmpfs it lives on; the full sync fills
    all but a few pages of it, and the kv records written after fill the rest. The sync that no
    longer fits is rolled back and refused: the standby's disk stays the primary's as of the
    last committed sync (a prefix of its records, nothing torn), and it does not take over."""
    disk_size, tmpfs_size = 8 << 20, 2 << 20
    filler = tmpfs_size - (96 << 10)
    primary_disk = _sparse(tmp_path / "p.img", disk_size, (disk_size - filler, os.urandom(filler)))
    link, port = str(tmp_path / "link.sock"), _free_port()
    with small_tmpfs(tmp_path / "small", tmpfs_size) as small:
        standby_disk = _sparse(small / "s.img", disk_size)
        standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(standby_disk),
                             "--net", f"socket:{link}")
        primary = None
        try:
            standby.stderr.wait_for(b"waiting for a primary")
            primary = VmmProcess("run", "kv", "--disk", str(primary_disk), "--net", f"socket:{link}",
                                 "--ft", f"tcp:127.0.0.1:{port}")
            primary.wait_for(b"kv: ready")
            with FrameSocket(tmp_path / "client.sock", link) as sock:
                peer = Peer(sock, timeout=10.0)
                acked = _put_until_the_standby_exits(peer, standby, 1)
                _assert_faulted_without_takeover(standby, primary, "No space left on device")
                assert b"No space left on device" in primary.stderr.data  # the primary was told why
                _primary_goes_on(peer, acked)
            theirs, ours = primary_disk.read_bytes(), standby_disk.read_bytes()
        finally:
            for vmm in (primary, standby):
                if vmm is not None:
                    vmm.kill()
    records = next(n for n in range(1, disk_size // SECTOR) if ours[n * SECTOR : (n + 1) * SECTOR] == bytes(SECTOR)) - 1
    assert 0 < records <= acked
    kept = (records + 1) * SECTOR  # the header and the records the standby committed
    assert ours[:kept] == theirs[:kept]
    assert ours[kept : disk_size - filler] == bytes(disk_size - filler - kept)
    assert ours[disk_size - filler :] == theirs[disk_size - filler :]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_a_bit_flipped_mid_sync_is_a_standby_fault(tmp_path, guest_images, tls):
    """One bit flipped between primary and standby while a client writes to kv: the standby
    refuses the damaged sync (plain: the frame fails its checksum; TLS: the record fails its
    authentication) and exits without taking over; the primary goes on unprotected and loses no
    acknowledged record."""
    creds = ("--tls-creds", str(tls_credentials(tmp_path / "creds"))) if tls else ()
    primary_disk, standby_disk = (_sparse(tmp_path / name, 4 << 20) for name in ("p.img", "s.img"))
    link, port = str(tmp_path / "link.sock"), _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(standby_disk),
                         "--net", f"socket:{link}", *creds)
    relay = Relay(("127.0.0.1", port))
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", str(primary_disk), "--net", f"socket:{link}", "--ft", relay.uri,
                             *creds)
        primary.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "client.sock", link) as sock:
            peer = Peer(sock, timeout=10.0)
            for seq in range(1, 11):
                assert peer.udp(9000, f"put {seq} record-{seq}".encode()) == f"ok {seq}".encode()
            relay.corrupt_after(3000)  # inside the next sync: a heartbeat is 32 bytes (54 in TLS), a sync KiBs
            acked = _put_until_the_standby_exits(peer, standby, 11)
            _assert_faulted_without_takeover(standby, primary, "bad record mac" if tls else "failed its checksum")
            _primary_goes_on(peer, acked)
    finally:
        for vmm in (primary, standby):
            if vmm is not None:
                vmm.kill()
        relay.close()


def test_a_peer_dribbling_its_hello_is_dropped_and_the_standby_waits_on(guest_images):
    """Each byte comes well within a per-read timeout, so only a deadline on the whole Hello drops
    it. Before: the standby kept reading it as long as bytes came, and a real primary, its
    connection left in the backlog, was never answered."""
    from pykvm.ft import protocol as p
    from pykvm.ft.standby import GREETING_TIMEOUT

    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        dribbled = b"".join(bytes(part) for part in p.FtConnection(p.Role.PRIMARY).send(p.Hello(b"{}")))
        dropped_while_it_dribbled = False
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stray:
            for byte in dribbled[: int(GREETING_TIMEOUT * 10)]:  # one a second: ten times the deadline
                try:
                    stray.sendall(bytes([byte]))
                except OSError:
                    dropped_while_it_dribbled = True  # a reset
                    break
                try:  # a second between bytes, or less once the standby has dropped us
                    standby.stderr.wait_for(b"dropped a connection", timeout=1)
                    dropped_while_it_dribbled = True
                    break
                except TimeoutError:
                    pass
        assert dropped_while_it_dribbled, standby.errors
        standby.stderr.wait_for(b"; still waiting for a primary")  # the whole line is in
        # The deadline ends a read in progress ("timed out") or is found passed between reads
        assert any(f"dropped a connection from 127.0.0.1: {why}; still waiting for a primary" in standby.errors
                   for why in ("timed out", "no whole frame by the deadline")), standby.errors
        primary = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}")  # it waits on
        assert primary.returncode == 0 and b"protected by" in primary.stderr, primary.stderr.decode()
        assert standby.wait() == 0 and "said goodbye" in standby.errors, standby.errors
    finally:
        standby.kill()


def test_pages_before_any_hello_never_reach_a_waiting_standbys_ram(guest_images):
    """A connection (no TLS: anyone may connect) whose first frame is a well-formed frame of pages
    is dropped as no primary, and its data lands nowhere: the full sync sends only the pages the
    primary's guest populated, the standby's others must stay zero. --ft-verify compares the
    standby's RAM with the primary's at the full sync: equal, and the pair is protected."""
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--ft-verify")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        untouched = (40 << 20) // PAGE_SIZE  # in the default 64M of RAM; `hello` never writes there
        send_a_stray_pages_frame(port, untouched)
        standby.stderr.wait_for(b"still waiting for a primary")
        primary = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}", "--ft-verify")
        assert primary.returncode == 0 and b"protected by" in primary.stderr, primary.stderr.decode()
        assert standby.wait() == 0 and "said goodbye" in standby.errors, standby.errors
        assert "VERIFY FAILED" not in standby.errors
    finally:
        standby.kill()


def tls_credentials(directory: Path, *hosts: str) -> Path:
    """`pykvm tls init DIRECTORY [--host NAME]...`, as a user makes credentials."""
    result = run_pykvm("tls", "init", str(directory), *(arg for host in hosts for arg in ("--host", host)))
    assert result.returncode == 0, result.stderr
    return directory


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) << 10


def _data_extents(path: Path) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        return [(offset, length) for offset, length, data in extents(fd, 0, os.fstat(fd).st_size) if data]
    finally:
        os.close(fd)


def _read(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.skipif(not can_mount(), reason="resetting a process's peak RSS (clear_refs) needs root")
def test_a_2gib_disk_is_protected_in_bounded_memory(tmp_path, guest_images):
    """A 2 GiB sparse disk with data at both ends. The primary protects it once at start, loses
    that standby, and is protected again by a new one whose disk held other data: the new
    standby's disk equals the primary's (data at both ends, holes elsewhere), and the primary's
    peak RSS grew by less than 64 MiB during that full sync."""
    size, piece = 2 << 30, 4 << 20
    head, tail = os.urandom(piece), os.urandom(piece)
    primary_disk = _sparse(tmp_path / "p.img", size, (1 << 20, head), (size - piece, tail))
    first_disk = _sparse(tmp_path / "a.img", size)
    second_disk = _sparse(tmp_path / "b.img", size, (1 << 30, b"\xee" * (1 << 20)))  # stale: must become a hole
    link, first_port, second_port = str(tmp_path / "link.sock"), _free_port(), _free_port()
    first = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{first_port}", "--disk", str(first_disk),
                       "--net", f"socket:{link}")
    second = primary = None
    try:
        first.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", str(primary_disk), "--net", f"socket:{link}",
                             "--ft", f"tcp:127.0.0.1:{first_port}", "--control", str(tmp_path / "p.ctl"))
        primary.wait_for(b"kv: ready")
        first.proc.send_signal(signal.SIGKILL)
        first.wait()
        primary.stderr.wait_for(b"standby lost")
        second = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{second_port}", "--disk", str(second_disk),
                            "--net", f"socket:{link}")
        second.stderr.wait_for(b"waiting for a primary")
        Path(f"/proc/{primary.proc.pid}/clear_refs").write_text("5")  # the peak is now the current RSS
        before = _peak_rss(primary.proc.pid)
        reply = json.loads(run_pykvm("ctl", str(tmp_path / "p.ctl"), "ft-protect",
                                     f"tcp:127.0.0.1:{second_port}").stdout)
        growth = _peak_rss(primary.proc.pid) - before
        assert reply["ok"] and reply["protected"], reply
        print(f"\nprimary peak RSS growth during the 2 GiB full sync: {growth / (1 << 20):.1f} MiB")
        assert growth < 64 << 20
        assert _read(second_disk, 1 << 20, piece) == head and _read(second_disk, size - piece, piece) == tail
        assert _read(second_disk, 0, 4096) == _read(primary_disk, 0, 4096)  # kv's header
        assert _read(second_disk, 1 << 30, 1 << 20) == bytes(1 << 20)
        assert sum(length for _, length in _data_extents(second_disk)) <= 3 * piece  # holes stayed holes
    finally:
        for vmm in (primary, first, second):
            if vmm is not None:
                vmm.kill()


@pytest.mark.parametrize("journal", ["intact", "deleted"])
@pytest.mark.parametrize("ending", ["goodbye", "takeover"])
def test_an_undo_journal_that_cannot_be_removed_changes_no_outcome(tmp_path, guest_images, ending, journal):
    """The standby removes its (empty) undo journal when following ends. Deleted under it, the
    removal fails: one line says so, no traceback, and the standby ends as it would have with
    the journal intact: exit 0 after the primary's goodbye, or a takeover that serves every
    acknowledged record once the primary is killed."""
    primary_disk, standby_disk = (_sparse(tmp_path / name, 4 << 20) for name in ("p.img", "s.img"))
    undo = Path(f"{standby_disk}.ft-undo")
    link = tmp_path / "link.sock"
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(standby_disk),
                         "--net", f"socket:{link}", "--ft-timeout", "2000")
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        assert undo.exists()  # created at start: a directory where it cannot be is found then
        if journal == "deleted":
            undo.unlink()
        if ending == "goodbye":
            result = run_pykvm("run", "hello", "--disk", str(primary_disk), "--net", f"socket:{link}",
                               "--ft", f"tcp:127.0.0.1:{port}")
            assert result.returncode == 0 and b"Hello from pykvm guest!" in result.stdout, result.stderr
            assert standby.wait() == 0
            assert "said goodbye" in standby.errors
        else:
            primary = VmmProcess("run", "kv", "--disk", str(primary_disk), "--net", f"socket:{link}",
                                 "--ft", f"tcp:127.0.0.1:{port}", "--ft-timeout", "2000")
            primary.wait_for(b"kv: ready")
            with FrameSocket(tmp_path / "client.sock", str(link)) as sock:
                client = KvClient(sock)
                for seq in range(1, 6):
                    assert client.put(seq, f"record-{seq}"), f"put {seq} never acknowledged"
                primary.proc.send_signal(signal.SIGKILL)
                standby.stderr.wait_for(b"took over from sync ")
                client.check_all_served()
            assert standby.proc.poll() is None  # it runs the guest
        lines = [line for line in standby.errors.splitlines() if "undo journal" in line]
        if journal == "deleted":
            assert lines == [f"ft standby: cannot remove the undo journal {undo}: No such file or directory"], \
                standby.errors
        else:
            assert lines == [] and not undo.exists(), standby.errors
        assert "Traceback" not in standby.errors, standby.errors
    finally:
        for vmm in (primary, standby):
            if vmm is not None:
                vmm.kill()
