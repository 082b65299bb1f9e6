"""Mutual TLS 1.3 for the replication channels (FT and live migration), with the standard
library's ssl.

`--tls-creds DIR` names a directory laid out as QEMU's tls-creds-x509 expects, so existing
credentials work:

    ca-cert.pem                     the CA both sides trust, and nothing else
    server-cert.pem, server-key.pem what the listening side (standby, migration target) shows
    client-cert.pem, client-key.pem what the connecting side (primary, migration source) shows

Both sides must show a certificate signed by the CA; the connecting side also checks that the
server certificate names the host it dialled. `make_credentials` (`pykvm tls init`) writes such
a directory; it is the only user of the `cryptography` package, imported there and only there.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pykvm.errors import ConfigError

if TYPE_CHECKING:
    import ssl  # imported when credentials are loaded: a run without TLS never pays its ~5 MiB

CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY = (
    "ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")
CREDENTIAL_FILES = (CA_CERT, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 3650


@dataclass(frozen=True)
class TlsCredentials:
    """A loaded credentials directory: the two contexts, built once (loading is the slow part)."""

    directory: Path
    server: ssl.SSLContext
    client: ssl.SSLContext

    @classmethod
    def load(cls, directory: str | os.PathLike, option: str = "--tls-creds") -> TlsCredentials:
        path = Path(directory)
        missing = [name for name in CREDENTIAL_FILES if not (path / name).is_file()]
        if missing:
            raise ConfigError(f"{option} {path}: missing {', '.join(missing)} (make them with `pykvm tls init {path}`)")
        import ssl

        try:
            return cls(path, _context(ssl.PROTOCOL_TLS_SERVER, path, SERVER_CERT, SERVER_KEY),
                       _context(ssl.PROTOCOL_TLS_CLIENT, path, CLIENT_CERT, CLIENT_KEY))
        except (ssl.SSLError, OSError) as error:
            raise ConfigError(f"{option} {path}: unusable credentials: {error}") from None


def _context(protocol: int, directory: Path, cert: str, key: str) -> ssl.SSLContext:
    import ssl

    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(directory / cert, directory / key)
    context.load_verify_locations(cafile=directory / CA_CERT)
    context.verify_mode = ssl.CERT_REQUIRED  # the server side asks for the client's certificate too
    if protocol == ssl.PROTOCOL_TLS_CLIENT:
        context.check_hostname = True
    return context


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- making credentials (`pykvm tls init`) -----------------------------------------------------------


def make_credentials(directory: str | os.PathLike, hosts: list[str] | tuple[str, ...] = (), *,
                     force: bool = False) -> list[Path]:
    """A CA and, signed by it, a server certificate naming `hosts` (default: this host's loopback
    names) and a client certificate, written into `directory` (created if needed). Keys are
    0600. Existing files are kept unless `force`: then ConfigError names them. Returns the files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    path = Path(directory)
    existing = [name for name in CREDENTIAL_FILES if (path / name).exists()]
    if existing and not force:
        raise ConfigError(f"{path}: {', '.join(existing)} exist already (--force replaces them)")
    path.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pykvm"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool, extensions=()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=not ca, key_cert_sign=ca, crl_sign=ca,
                                                content_commitment=False, key_encipherment=False,
                                                data_encipherment=False, key_agreement=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if not ca:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def san(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = certificate("pykvm CA", ca_key, "pykvm CA", ca_key, ca=True)
    server = certificate("pykvm server", server_key, "pykvm CA", ca_key, ca=False, extensions=(
        x509.SubjectAlternativeName([san(host) for host in (hosts or DEFAULT_HOSTS)]),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])))
    client = certificate("pykvm client", client_key, "pykvm CA", ca_key, ca=False,
                         extensions=(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),))

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    contents = {CA_CERT: ca.public_bytes(serialization.Encoding.PEM),
                SERVER_CERT: server.public_bytes(serialization.Encoding.PEM), SERVER_KEY: pem_key(server_key),
                CLIENT_CERT: client.public_bytes(serialization.Encoding.PEM), CLIENT_KEY: pem_key(client_key)}
    written = []
    for file_name, data in contents.items():
        target = path / file_name
        _write_private(target, data, mode=0o600 if file_name.endswith("-key.pem") else 0o644)
        written.append(target)
    return written


def _write_private(target: Path, data: bytes, *, mode: int) -> None:
    """Write via a new file created with `mode` (never readable by others in between, whatever
    the umask), then rename it over the target."""
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        temporary.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask narrowed the creation mode; the certificates are meant readable
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, target)
