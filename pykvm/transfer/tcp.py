"""`tcp:HOST:PORT`, the address form that live migration and FT share, and listening on one."""

from __future__ import annotations

import ipaddress
import re
import socket

from pykvm.errors import ConfigError


# Dot-separated labels of letters, digits and '-' (1-63 each): what the resolver accepts without
# the IDNA codec failing on an empty or overlong label.
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")


def parse_tcp_uri(uri: str) -> tuple[str, int]:
    """("HOST", PORT) of "tcp:HOST:PORT"; an IPv6 host may be bracketed ("tcp:[::1]:4444")."""
    scheme, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    if scheme != "tcp" or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{uri!r}: expected tcp:HOST:PORT (port 1-65535)")
    host = host.strip("[]")
    if not (_HOST_NAME.fullmatch(host) or (":" in host and _is_ipv6(host))):
        raise ConfigError(f"{uri!r}: {host!r} is not a host name or address")
    return host, int(port)


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def listen(uri: str, option: str) -> socket.socket:
    """A listening socket at `uri`; `option` names the command-line option it came from, for the
    error message."""
    host, port = parse_tcp_uri(uri)
    try:
        server = socket.create_server((host, port), reuse_port=False)
    except OSError as error:
        raise ConfigError(f"{option} {uri}: cannot listen: {error.strerror}") from None
    return server
