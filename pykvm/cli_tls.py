"""The TLS parts of the `pykvm` command: `--tls-creds DIR` and `--insecure` (on run, restore and
ft standby), `pykvm tls init`, and the rule that a listener beyond loopback needs credentials."""

from __future__ import annotations

import argparse
import socket

from pykvm.cli_validate import directory
from pykvm.errors import ConfigError
from pykvm.transfer import tcp, tls


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-creds", metavar="DIR", type=directory,
                        help="mutual TLS for FT and migration, both ways (`ctl migrate` and `ctl ft-protect` "
                             "too): DIR holds ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, "
                             "client-key.pem (`pykvm tls init DIR` makes them)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow listening beyond loopback without --tls-creds (anyone who can reach the "
                             "port may then send this VMM a guest)")


def add_command(commands: argparse._SubParsersAction) -> None:
    command = commands.add_parser("tls", help="make credentials for --tls-creds",
                                  epilog="example:\n  pykvm tls init /etc/pykvm/tls --host vmhost1 --host 10.0.0.5"
                                         "\n\nexit status: 0 made, 2 bad input (DIR holds credentials: --force)")
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create DIR, a CA, and server and client certificates signed by it")
    init.add_argument("directory", metavar="DIR")
    init.add_argument("--host", action="append", default=[], metavar="NAME",
                      help="a name or address the server certificate is valid for, checked by clients "
                           f"(repeatable; default: {', '.join(tls.DEFAULT_HOSTS)})")
    init.add_argument("--force", action="store_true", help="replace existing files")


def load(args: argparse.Namespace) -> None:
    """args.tls: the loaded --tls-creds (None without); a ConfigError names what is wrong."""
    args.tls = tls.TlsCredentials.load(args.tls_creds) if args.tls_creds else None


def listen(args: argparse.Namespace, uri: str, option: str) -> socket.socket:
    """The listening socket for `--incoming` or `--listen`. Beyond this host's loopback, only
    with --tls-creds (or --insecure): whoever reaches the port could otherwise send us a guest."""
    host, _ = tcp.parse_tcp_uri(uri)
    if args.tls is None and not args.insecure and not tls.is_loopback(host):
        raise ConfigError(f"{option} {uri}: listening beyond loopback needs --tls-creds DIR "
                          "(or --insecure, to let anyone who can reach the port send this VMM a guest)")
    return tcp.listen(uri, option)


def cmd_tls(args: argparse.Namespace) -> int:
    for path in tls.make_credentials(args.directory, args.host, force=args.force):
        print(path)
    return 0
