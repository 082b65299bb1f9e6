"""Secure channels, on the real thing: credentials made by `pykvm tls init`, standby and migration
target processes listening with them, and peers that should not get in (no certificate, another
CA's, a name that does not match, plain garbage) refused while the listener waits on for the
real peer, which then gets in."""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509

from pykvm.testing.netframes import FrameSocket, Peer
from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.relay import Relay
from tests.test_ft_faults import _assert_faulted_without_takeover, _primary_goes_on, _put_until_the_standby_exits, _sparse

UMASK_0 = ("sh", "-c", 'umask 000; exec "$@"', "sh")  # a prefix: run the rest with a umask that hides nothing
KEYS = ("server-key.pem", "client-key.pem")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _tls_init(directory: Path, *hosts: str) -> Path:
    result = run_pykvm("tls", "init", str(directory), *(arg for host in hosts for arg in ("--host", host)))
    assert result.returncode == 0, result.stderr
    return directory


def _client(creds: Path, *, cert_from: Path | None) -> ssl.SSLContext:
    """A client that trusts `creds`' CA and shows the client certificate of `cert_from` (or none)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(creds / "ca-cert.pem")
    if cert_from is not None:
        context.load_cert_chain(cert_from / "client-cert.pem", cert_from / "client-key.pem")
    return context


def _refused_after_handshake(port: int, context: ssl.SSLContext) -> None:
    """In TLS 1.3 the client's side of the handshake ends before the server has checked the
    client's certificate: the refusal arrives as an alert on the first read."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED|UNKNOWN_CA|BAD_CERTIFICATE"):
                sock.recv(1)


def _garbage(port: int, data: bytes) -> None:
    """Send `data` and wait until the listener drops the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass  # a reset: it dropped us with some of our bytes unread


@pytest.mark.nokvm
def test_tls_init_writes_private_keys_and_never_overwrites(tmp_path):
    creds = tmp_path / "new" / "creds"
    result = run_pykvm("tls", "init", str(creds), "--host", "standby.example", "--host", "10.1.2.3", prefix=UMASK_0)
    assert result.returncode == 0, result.stderr
    for key in KEYS:
        assert stat.S_IMODE(os.stat(creds / key).st_mode) == 0o600
    server = x509.load_pem_x509_certificate((creds / "server-cert.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["standby.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    before = {path.name: path.read_bytes() for path in creds.iterdir()}
    again = run_pykvm("tls", "init", str(creds))
    assert again.returncode == 2 and b"exist already (--force replaces them)" in again.stderr
    assert {path.name: path.read_bytes() for path in creds.iterdir()} == before
    forced = run_pykvm("tls", "init", str(creds), "--force")
    assert forced.returncode == 0 and (creds / "ca-cert.pem").read_bytes() != before["ca-cert.pem"]


@pytest.mark.nokvm
@pytest.mark.parametrize("command", [("ft", "standby", "--listen"), ("run", "--incoming")])
def test_listening_beyond_loopback_needs_credentials(tmp_path, command):
    result = run_pykvm(*command, f"tcp:0.0.0.0:{_free_port()}")
    assert result.returncode == 2 and b"listening beyond loopback needs --tls-creds" in result.stderr
    missing = run_pykvm(*command, f"tcp:0.0.0.0:{_free_port()}", "--tls-creds", str(tmp_path))
    assert missing.returncode == 2 and b"missing ca-cert.pem" in missing.stderr


@requires_kvm
def test_only_a_peer_of_our_ca_with_the_right_name_gets_in(tmp_path, guest_images):
    """Refused, each in one line, while the standby waits on: a client without a certificate,
    one whose certificate another CA signed, and a primary dialling a name the standby's
    certificate does not carry. Then the real primary connects and is protected."""
    ours, theirs = _tls_init(tmp_path / "ours", "localhost"), _tls_init(tmp_path / "theirs", "localhost")
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--tls-creds", str(ours))
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        _refused_after_handshake(port, _client(ours, cert_from=None))
        _refused_after_handshake(port, _client(ours, cert_from=theirs))
        mismatch = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}", "--tls-creds", str(ours))
        assert mismatch.returncode == 1
        assert b"failed the TLS handshake: IP address mismatch" in mismatch.stderr
        standby.stderr.wait_for(b"TLS handshake failed", count=3)
        refusals = [line for line in standby.errors.splitlines() if "refused a connection" in line]
        assert len(refusals) == 3 and standby.proc.poll() is None, standby.errors
        primary = run_pykvm("run", "hello", "--ft", f"tcp:localhost:{port}", "--tls-creds", str(ours))
        assert primary.returncode == 0 and b"Hello from pykvm guest!" in primary.stdout
        assert b"protected by tcp:localhost" in primary.stderr
        assert standby.wait() == 0 and "said goodbye" in standby.errors
    finally:
        standby.kill()


@requires_kvm
def test_garbage_to_a_waiting_standby_is_dropped(tmp_path, guest_images):
    """A port scan, a stray HTTP client and random bytes: each dropped in one line; the standby
    goes on waiting, and the real primary is protected by it."""
    port = _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}")
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        for data in (b"", b"GET / HTTP/1.0\r\n\r\n", os.urandom(4096)):
            _garbage(port, data)
        standby.stderr.wait_for(b"still waiting for a primary", count=3)
        assert standby.proc.poll() is None
        primary = run_pykvm("run", "hello", "--ft", f"tcp:127.0.0.1:{port}")
        assert primary.returncode == 0 and b"protected by" in primary.stderr
        assert standby.wait() == 0 and "said goodbye" in standby.errors
    finally:
        standby.kill()


@requires_kvm
def test_garbage_to_a_tls_migration_target_is_dropped(tmp_path, guest_images):
    """A migration target with credentials: garbage (which cannot pass for a TLS handshake) and a
    client without a certificate are dropped; then the source, with the same credentials,
    migrates the guest over TLS and it runs on at the target."""
    creds = _tls_init(tmp_path / "creds")
    ctl, port = str(tmp_path / "src.sock"), _free_port()
    uri = f"tcp:127.0.0.1:{port}"
    target = VmmProcess("run", "dirty", "--incoming", uri, "--tls-creds", str(creds))
    source = VmmProcess("run", "dirty", "--append", "pages=1024", "--control", ctl, "--tls-creds", str(creds))
    try:
        target.stderr.wait_for(b"waiting for a migration")
        _garbage(port, os.urandom(2048))
        _garbage(port, b"")
        _refused_after_handshake(port, _client(creds, cert_from=None))
        target.stderr.wait_for(b"refused a connection", count=3)
        assert target.proc.poll() is None, target.errors
        source.wait_for(b"\n", count=2)
        reply = json.loads(run_pykvm("ctl", ctl, "migrate", uri).stdout)
        assert reply["ok"] and reply["status"] == "migrated", reply
        assert source.wait() == 0
        target.wait_for(b"\n", count=2)  # the guest runs on at the target, checking its pages
        assert "mismatch" not in target.output
    finally:
        source.kill()
        target.kill()


@requires_kvm
def test_a_bit_flipped_mid_sync_over_tls_is_a_standby_fault(tmp_path, guest_images):
    """One bit flipped inside a TLS record of a sync while a client writes to kv: the record
    fails its authentication, the standby refuses to follow and exits without taking over, and
    the primary goes on unprotected, serving every record it acknowledged."""
    creds = _tls_init(tmp_path / "creds")
    primary_disk, standby_disk = (_sparse(tmp_path / name, 4 << 20) for name in ("p.img", "s.img"))
    link, port = str(tmp_path / "link.sock"), _free_port()
    standby = VmmProcess("ft", "standby", "--listen", f"tcp:127.0.0.1:{port}", "--disk", str(standby_disk),
                         "--net", f"socket:{link}", "--tls-creds", str(creds))
    relay = Relay(("127.0.0.1", port))
    primary = None
    try:
        standby.stderr.wait_for(b"waiting for a primary")
        primary = VmmProcess("run", "kv", "--disk", str(primary_disk), "--net", f"socket:{link}", "--ft", relay.uri,
                             "--tls-creds", str(creds))
        primary.wait_for(b"kv: ready")
        with FrameSocket(tmp_path / "client.sock", link) as sock:
            peer = Peer(sock, timeout=10.0)
            for seq in range(1, 11):
                assert peer.udp(9000, f"put {seq} record-{seq}".encode()) == f"ok {seq}".encode()
            relay.corrupt_after(3000)  # inside the next sync's records (a heartbeat's is 54 bytes)
            acked = _put_until_the_standby_exits(peer, standby, 11, 60)
            _assert_faulted_without_takeover(standby, primary, "bad record mac")
            _primary_goes_on(peer, acked)
    finally:
        for vmm in (primary, standby):
            if vmm is not None:
                vmm.kill()
        relay.close()
