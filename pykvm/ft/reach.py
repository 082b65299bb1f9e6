"""Reaching a standby: connect (over TLS if the primary has credentials), say Hello, and read its
answer. Each way it can fail is one FtError line that names the standby and what went wrong."""

from __future__ import annotations

import socket

from pykvm.ft import protocol as p
from pykvm.transfer import channel, wire
from pykvm.transfer.tls import TlsCredentials

CONNECT_TIMEOUT = 5.0


class FtError(Exception):
    """Protection could not be set up (the standby is unreachable or refused)."""


def greet_standby(uri: str, tls: TlsCredentials | None, hello: p.Hello,
                  patience: float) -> tuple[socket.socket, p.FtConnection]:
    """The connection to the standby at `uri`, which has accepted `hello`, and the protocol's
    state on it; `patience`: the socket's timeout from now on."""
    try:
        sock = channel.connect(uri, tls, CONNECT_TIMEOUT)
    except OSError as error:
        if channel.is_tls_error(error):
            raise FtError(f"the standby at {uri} failed the TLS handshake: {channel.describe(error)}") from None
        raise FtError(f"cannot reach the standby at {uri}: {error.strerror or error}") from None
    sock.settimeout(patience)
    protocol = p.FtConnection(p.Role.PRIMARY, authenticated=tls is not None)
    try:
        wire.send_buffers(sock, protocol.send(hello))
        reply = p.receive_event(sock, protocol)
    except (OSError, wire.ProtocolError) as error:
        sock.close()
        raise FtError(f"the standby at {uri} did not answer: {channel.describe(error)}") from None
    if isinstance(reply, p.Refused):
        sock.close()
        raise FtError(f"the standby at {uri} refused: {reply.reason}")
    return sock, protocol
