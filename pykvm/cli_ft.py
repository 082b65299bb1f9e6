"""The FT options of `pykvm run --ft` and `pykvm ft standby`, and what the primary's side of the
command does with them: protect the machine before it runs, protect it again on `ft-protect`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Callable

from pykvm import cli_validate as valid, control
from pykvm.cli_lazy import loaded_errors
from pykvm.ft.choices import DISK_MODES, SYNC_MODES
from pykvm.ft.trace import OFF, FtTrace
from pykvm.machine import Machine

if TYPE_CHECKING:  # FT loads with the first command that uses it
    from pykvm.ft import Primary
    from pykvm.ft.fencing import Fencing
    from pykvm.ft.standby import Standby

PRIMARY_ONLY_FT_OPTIONS = ("--ft-mode", "--ft-interval", "--ft-disk", "--metrics")  # the standby follows the Hello


def add_options(parser: argparse.ArgumentParser, *, primary: bool) -> None:
    """The FT options; the standby parses the primary's too (hidden), to refuse them in one line."""
    parser.add_argument("--ft-timeout", type=valid.millis(1), default=200, metavar="MS",
                        help="the standby takes over after this long without a word from the primary "
                             "(milliseconds, 1 to 86400000; default 200)")
    parser.add_argument("--ft-verify", action="store_true",
                        help="check at every sync that the standby's RAM equals the primary's (slow; for tests)")
    parser.add_argument("--ft-witness", metavar="URI", type=valid.witness_uri,
                        help="file:PATH or etcd:HOST:PORT[/PREFIX], the same for primary and standby: when they "
                             "lose each other, only the side that wins the next epoch there runs the guest")
    parser.add_argument("--trace-ft", action="store_true",
                        help="print each sync's phases as they happen, one line each (primary: paused, harvested, "
                             "sent, acknowledged, released, resumed; standby: staged, committed, takeover steps)")
    shown = (lambda text: text) if primary else (lambda text: argparse.SUPPRESS)
    parser.add_argument("--metrics", metavar="FILE", type=valid.output_file("a metrics file"),
                        help=shown("the primary appends one JSON line per sync here"))
    parser.add_argument("--ft-mode", choices=SYNC_MODES, default="sync" if primary else None,
                        help=shown("sync: the guest waits for the standby's ack (Kemari); pipelined: it runs on "
                                   "once the sync is captured and only the outputs wait; cow: it pauses only to "
                                   "capture state, its pages are copied out under write-protection (root; "
                                   "userfaultfd) (default sync)"))
    parser.add_argument("--ft-disk", choices=DISK_MODES, default="replicated" if primary else None,
                        help=shown("replicated: the standby has its own copy of each disk, writes complete at once "
                                   "and travel with the next sync; shared: both open the same file, a write waits "
                                   "for a sync (default replicated)"))
    parser.add_argument("--ft-interval", type=valid.millis(0), default=0 if primary else None, metavar="MS",
                        help=shown("also sync every MS milliseconds, output or not (periodic, Remus-style; "
                                   "0 to 86400000; default 0: only at outputs)"))


def protect(machine: Machine, args: argparse.Namespace, fencing: Fencing | None, log: Callable[[str], None]) -> Primary:
    """Before the guest runs: win the next epoch at the witness (or warn there is none), then
    connect to the standby and give it everything."""
    from pykvm.ft import Primary
    from pykvm.ft.fencing import NO_WITNESS_WARNING

    if fencing is not None:
        fencing.claim_start()
    else:
        log(NO_WITNESS_WARNING)
    metrics = open(args.metrics, "a", buffering=1) if args.metrics else None
    primary = Primary(machine, timeout=args.ft_timeout / 1000, metrics=metrics, verify=args.ft_verify,
                      interval=args.ft_interval / 1000, mode=args.ft_mode, fencing=fencing,
                      tls=args.tls, disk_mode=args.ft_disk, log=log, trace=trace(args, log))
    primary.protect(args.ft)
    return primary


def trace(args: argparse.Namespace, log: Callable[[str], None]) -> FtTrace:
    return FtTrace(log) if args.trace_ft else OFF


def ft_protect(primary: Primary | None, request: dict) -> dict:
    """The control socket's `ft-protect`: a new standby for a primary that lost its own."""
    uri = request.get("uri")
    if not isinstance(uri, str):
        raise control.CommandError("ft-protect needs a 'uri' string")
    if primary is None:
        raise control.CommandError("this VMM was not started with --ft")
    try:
        primary.protect(uri)
    except loaded_errors(("pykvm.ft.reach", "FtError"), ("pykvm.ft.fencing", "Fenced")) as error:
        raise control.CommandError(str(error)) from None
    return primary.summary()


def serve_primary_control(server: control.ControlServer, primary: Primary | None) -> None:
    """The FT commands of `pykvm run`'s control socket. A protected guest is not migrated: the
    migration would harvest the dirty log its next syncs need, and the standby, still holding
    the guest, could take over once this VMM had gone, a second copy."""
    server.register("ft-stats", lambda request: {"role": "primary", **(primary.summary() if primary else {})})
    server.register("ft-protect", lambda request: ft_protect(primary, request))
    if primary is not None:
        server.refuse("migrate", lambda: (
            f"refused while the FT standby at {primary.stats.standby} protects the guest: it would hold a second "
            "copy of it; end the standby first (this VMM then runs the guest unprotected)"
            if primary.stats.protected else None))


STANDBY_SERVES = ("query-status", "ft-stats")


def serve_standby_control(server: control.ControlServer, standby: Standby) -> None:
    """A standby's control socket, until it takes over (then `pykvm run`'s serves the guest): its
    status and FT counts. Whatever acts on a running guest is refused: none runs here yet, and a
    snapshot or a migration of what the standby holds would be a second copy of the guest."""
    server.register("query-status", lambda request: {"status": "standby", "paused_by": []})
    server.register("ft-stats", lambda request: {
        "role": "standby", "mode": standby.mode, "interval_ms": standby.interval_ms,
        "disk_mode": standby.disk_mode, **standby.stats.__dict__})
    for name in set(server.handlers) - set(STANDBY_SERVES):
        server.refuse(name, lambda: "this VMM is an FT standby: no guest runs here until it takes over")
