"""`tcp:HOST:PORT`, the address form that live migration and FT share, and listening on one."""

from __future__ import annotations

import socket

from pykvm.errors import ConfigError


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    """("HOST", PORT) of "tcp:HOST:PORT"; an IPv6 host may be bracketed ("tcp:[::1]:4444")."""
    scheme, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT")
    return host.strip("[]"), int(port)


def listen(uri: str, option: str) -> socket.socket:
    """A listening socket at `uri`; `option` names the command-line option it came from, for the
    error message."""
    host, port = parse_tcp_uri(uri)
    try:
        server = socket.create_server((host, port), reuse_port=False)
    except OSError as error:
        raise ConfigError(f"{option} {uri}: cannot listen: {error.strerror}") from None
    return server
