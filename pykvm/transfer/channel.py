"""The replication channel: a connected TCP stream, in the clear or inside mutual TLS, and the
two calls the wire code makes on it, so that nothing above cares which it is.

    send_buffers(sock, buffers)    plain: sendmsg of up to MAX_IOVECS buffers a call, nothing copied
                                   TLS: small buffers coalesced (a record each would cost more than
                                   the copy), large ones written straight from guest RAM
    receive_into(sock, targets)    plain: recvmsg_into all targets at once
                                   TLS: recv_into the first target (a TLS read yields one record)

`connect` and `accept` open the channel; `accept` drops peers that fail the TLS handshake (no
certificate, another CA, a name mismatch), says so in one line and waits for the next.
"""

from __future__ import annotations

import socket
import sys
from bisect import bisect_right
from itertools import accumulate
from typing import TYPE_CHECKING, Callable

from pykvm.transfer.tcp import parse_tcp_uri
from pykvm.transfer.tls import TlsCredentials

if TYPE_CHECKING:
    import ssl

MAX_IOVECS = 1024  # per sendmsg call (the kernel's UIO_MAXIOV)
COALESCE = 64 << 10  # TLS: buffers smaller than this are gathered into one write
HANDSHAKE_TIMEOUT = 10.0  # a peer that has not finished its handshake by then is dropped


def connect(uri: str, tls: TlsCredentials | None, timeout: float) -> socket.socket:
    """A channel to `uri`; with `tls`, the server must show a certificate of our CA naming the
    host we dialled. Raises OSError (ssl.SSLError for a refused handshake)."""
    host, port = parse_tcp_uri(uri)
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls is None:
        return sock
    try:
        return tls.client.wrap_socket(sock, server_hostname=host)
    except BaseException:
        sock.close()
        raise


def accept(server: socket.socket, tls: TlsCredentials | None, log: Callable[[str], None],
           what: str) -> tuple[socket.socket, tuple]:
    """The next peer to connect (with `tls`: the next to complete the handshake, showing a
    certificate of our CA); `what` prefixes the one line logged for each peer refused."""
    while True:
        conn, peer = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is None:
            return conn, peer
        conn.settimeout(HANDSHAKE_TIMEOUT)
        try:
            return tls.server.wrap_socket(conn, server_side=True), peer
        except OSError as error:  # ssl.SSLError, a timeout, a reset: wrap_socket has closed it
            conn.close()
            log(f"{what}: refused a connection from {peer[0]}: TLS handshake failed: {describe(error)}")


def _ssl():
    """The ssl module if anything has loaded it (TlsCredentials.load does): without it, no socket
    or error here can be a TLS one, and a run without TLS does not load it."""
    return sys.modules.get("ssl")


def is_tls(sock: socket.socket) -> bool:
    ssl = _ssl()
    return ssl is not None and isinstance(sock, ssl.SSLSocket)


def is_tls_error(error: BaseException) -> bool:
    ssl = _ssl()
    return ssl is not None and isinstance(error, ssl.SSLError)


def describe(error: BaseException) -> str:
    """An error in a few words: ssl's reason ("CERTIFICATE_VERIFY_FAILED: ...") when it has one."""
    ssl = _ssl()
    if ssl is None:
        return str(error) or type(error).__name__
    if isinstance(error, ssl.SSLCertVerificationError):
        return error.verify_message or str(error)
    if isinstance(error, ssl.SSLError) and error.reason:
        return error.reason.lower().replace("_", " ")
    return str(error) or type(error).__name__


def send_buffers(sock: socket.socket, buffers: list) -> int:
    """Send every buffer, in order; returns the bytes sent. The buffers are what the wire builds:
    bytes, bytearrays, 1-D memoryviews of bytes (their len is their size). Nothing is copied,
    and the loops over buffers run in C (a socket with a timeout often sends only part of a
    large batch: the call goes on from the first byte not sent)."""
    if is_tls(sock):
        return _send_tls(sock, [view for view in map(_bytes_view, buffers) if len(view)])
    buffers = list(buffers)
    total, i = 0, 0
    while i < len(buffers):
        batch = buffers[i : i + MAX_IOVECS]
        sent = sock.sendmsg(batch)
        total += sent
        ends = list(accumulate(map(len, batch)))
        whole = bisect_right(ends, sent)  # buffers sent whole
        i += whole
        if whole < len(batch):
            done = sent - (ends[whole - 1] if whole else 0)  # of the buffer sent in part
            buffers[i] = _bytes_view(buffers[i])[done:]
    return total


def _bytes_view(buffer) -> memoryview:
    return memoryview(buffer).cast("B")


def _send_tls(sock: ssl.SSLSocket, views: list[memoryview]) -> int:
    pending = bytearray()
    for view in views:
        if len(view) < COALESCE:
            pending += view
            if len(pending) < COALESCE:
                continue
        if pending:
            sock.sendall(pending)
            pending = bytearray()
        if len(view) >= COALESCE:
            sock.sendall(view)
    if pending:
        sock.sendall(pending)
    return sum(len(view) for view in views)


def receive_into(sock: socket.socket, targets: list[memoryview]) -> int:
    """Receive into `targets` in order, as much as one read yields; 0 at the end of the stream.
    A TLS peer that vanishes without closing the session reads as an end too (as a plain TCP
    one does): only a record that fails its check is an error (ssl.SSLError)."""
    if not is_tls(sock):
        return sock.recvmsg_into(targets[:MAX_IOVECS])[0]
    import ssl

    try:
        return sock.recv_into(targets[0])
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return 0
