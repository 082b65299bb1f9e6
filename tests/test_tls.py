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

from tests.conftest import VmmProcess, requires_kvm, run_pykvm
from tests.test_ft_faults import tls_credentials

UMASK_0 = ("sh", "-c", 'umask 000; exec "$@"', "sh")  # a prefix: run the rest with a umask that hides nothing
KEYS = ("server-key.pem", "client-key.pem")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
    ours, theirs = tls_credentials(tmp_path / "ours", "localhost"), tls_credentials(tmp_path / "theirs", "localhost")
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
    creds = tls_credentials(tmp_path / "creds")
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
