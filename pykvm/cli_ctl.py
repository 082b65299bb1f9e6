"""`pykvm ctl SOCKET COMMAND [ARG]`: one request to a running VMM's control socket, its reply
printed as one JSON line. The commands, their argument and how long a reply may take are
declared once, in COMMANDS; paths are made absolute here, on the client's side (the VMM's
working directory may be another)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Callable

from pykvm import cli_validate as valid, control
from pykvm.errors import ConfigError

EXIT_FAILURE = 1
QUICK_TIMEOUT = 15.0  # seconds: a reply that needs no more than a pause of the vCPUs (a busy VMM says so within 10)
LONG_TIMEOUT = 600.0  # seconds: a reply that waits for all of the guest's RAM to be written or sent


@dataclass(frozen=True)
class CtlCommand:
    summary: str
    argument: str | None = None  # the request's key for ARG; None: the command takes none
    metavar: str = ""
    convert: Callable[[str], str] = str
    timeout: float = QUICK_TIMEOUT


COMMANDS: dict[str, CtlCommand] = {
    "query-status": CtlCommand("the run state and who holds the guest paused"),
    "stop": CtlCommand("pause every vCPU (the user's pause)"),
    "cont": CtlCommand("release the user's pause"),
    "query-vcpus": CtlCommand("each vCPU's RIP and exit count"),
    "snapshot": CtlCommand("write a snapshot to a new regular file (--overwrite: replace one)", "file", "FILE",
                           valid.resolve_client_path, LONG_TIMEOUT),
    "migrate": CtlCommand("live-migrate to `pykvm run ... --incoming tcp:HOST:PORT`; the source then exits 0",
                          "uri", "tcp:HOST:PORT", valid.tcp_uri, LONG_TIMEOUT),
    "ft-protect": CtlCommand("protect an FT primary again, with a new standby", "uri", "tcp:HOST:PORT",
                             valid.tcp_uri, LONG_TIMEOUT),
    "ft-stats": CtlCommand("FT counts and percentiles"),
    "quit": CtlCommand("stop the guest; the VMM exits 0"),
}


def add_command(commands: argparse._SubParsersAction, example: Callable[[argparse.ArgumentParser, str], None]) -> None:
    listing = "\n".join(f"  {name} {spec.metavar}".ljust(32) + spec.summary for name, spec in COMMANDS.items())
    ctl = commands.add_parser("ctl", help="send a command to a running pykvm's control socket",
                              description="Send one command to a VMM's --control socket and print its reply "
                                          "(one JSON line).\n\ncommands:\n" + listing)
    example(ctl, "pykvm ctl /tmp/vm.sock snapshot vm.snap",
            "exit status: 0 an ok reply, 1 an error reply (an unknown command among them) or none within\n"
            "--timeout, 2 bad input (no VMM there, a missing or extra argument)")
    ctl.add_argument("socket", metavar="SOCKET", type=valid.existing_socket, help="the VMM's --control path")
    ctl.add_argument("cmd", metavar="COMMAND", help="one of the commands above")
    ctl.add_argument("arg", nargs="?", metavar="ARG", help="FILE for snapshot, tcp:HOST:PORT for migrate, ft-protect")
    ctl.add_argument("--overwrite", action="store_true", help="snapshot: replace an existing FILE")
    ctl.add_argument("--timeout", type=valid.seconds(0.1, 86400.0), metavar="SECONDS",
                     help=f"how long to wait for the reply, 0.1 to 86400 (default {QUICK_TIMEOUT:g}; "
                          f"{LONG_TIMEOUT:g} for snapshot, migrate and ft-protect)")


def request_of(args: argparse.Namespace) -> dict:
    """The request the command line asks for, or a ConfigError naming what is wrong with it."""
    spec = COMMANDS.get(args.cmd)
    if spec is None:  # sent as it is: the VMM knows the commands it serves, and says which in its error
        spec = CtlCommand("", "arg", "ARG") if args.arg is not None else CtlCommand("")
    request: dict = {"cmd": args.cmd}
    if spec.argument is None and args.arg is not None:
        raise ConfigError(f"ctl {args.cmd} takes no argument (got {args.arg!r})")
    if spec.argument is not None:
        if args.arg is None:
            raise ConfigError(f"ctl {args.cmd} needs {spec.metavar}")
        try:
            request[spec.argument] = spec.convert(args.arg)
        except valid.Invalid as error:
            raise ConfigError(f"ctl {args.cmd} {error}") from None
    if args.overwrite:
        if args.cmd != "snapshot":
            raise ConfigError(f"--overwrite is for snapshot, not {args.cmd}")
        request["overwrite"] = True
    return request


def cmd_ctl(args: argparse.Namespace) -> int:
    request = request_of(args)
    timeout = args.timeout if args.timeout is not None else COMMANDS.get(args.cmd, CtlCommand("")).timeout
    try:
        reply = control.request(args.socket, request, timeout=timeout)
    except control.NoReply as error:
        print(f"pykvm: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    print(json.dumps(reply))
    return 0 if reply.get("ok") is True else EXIT_FAILURE
