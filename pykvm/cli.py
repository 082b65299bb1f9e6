"""The `pykvm` command.

    pykvm run [GUEST|PATH] [--kernel bzImage|vmlinux [--initrd FILE]] [--mem 64M] [--cpus N] [--append ARGS]
              [--serial stdio|file:PATH|none]
              [--load-addr ADDR] [--disk PATH[,readonly]]... [--net SPEC]... [--control PATH]
              [--incoming tcp:HOST:PORT] [--trace] [--ft tcp:HOST:PORT [--ft-witness URI] [--ft-...]]
              [--tls-creds DIR | --insecure]
    pykvm ft standby --listen tcp:HOST:PORT [--ft-witness URI] [--ft-timeout MS] [--disk ...] [--net ...]
              [--tls-creds DIR | --insecure]
    pykvm restore FILE [--disk ...] [--net ...] [--serial ...] [--control PATH] [--verify] [--trace] [--tls-creds DIR]
    pykvm ctl SOCKET COMMAND [ARG] [--overwrite]
    pykvm tls init DIR [--host NAME]... [--force]
    pykvm guests list | build [NAME...] | path NAME

Exit status: the guest's (its debug-exit value, 0 for a reset or power-off), 1 when the guest
crashed or the VMM failed, 2 for bad input (one line on stderr, no traceback), 75 when an FT
primary or standby fenced itself (the other side won the witness's epoch; see ft/fencing.py).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pykvm import cli_tls, control, guestbuild
from pykvm.cli_lazy import loaded_errors, open_witness
from pykvm.boot.embedded import default_guest_image
from pykvm.console import SerialConsole
from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.diagnostics import ExitTracer
from pykvm.errors import ConfigError
from pykvm.kvm import KvmError, KvmUnavailable
from pykvm.machine import DEFAULT_MEMORY, Machine, MachineConfig
from pykvm.memory import GuestMemory
from pykvm.run_control import StopKind

if TYPE_CHECKING:  # migration, snapshots and FT are imported by the commands that use them (cli_lazy)
    from pykvm.ft import Primary
    from pykvm.ft.fencing import Fencing

EXIT_FAILURE = 1
EXIT_USAGE = 2

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # bare number: MiB, as QEMU


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(f"--mem {text!r}: not a size (examples: 64M, 1G, 65536K)")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < 2 << 20:
        raise ConfigError(f"--mem {text}: at least 2 MiB of guest RAM are needed")
    if size % 4096:
        raise ConfigError(f"--mem {text}: must be a multiple of 4 KiB")
    return size


def parse_address(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise ConfigError(f"--load-addr {text!r}: not an address (examples: 0x100000, 0x7c00)") from None


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    """Options that run and restore share: backends, console, control, tracing."""
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[,readonly]",
                        help="a virtio-blk disk on a file (repeatable)")
    parser.add_argument("--net", action="append", default=[], metavar="SPEC",
                        help="a virtio-net NIC: tap:NAME or socket:PATH[,peer=PATH], each [,mac=M] (repeatable)")
    parser.add_argument("--serial", default="stdio", help="COM1: stdio, file:PATH or none (default stdio)")
    parser.add_argument("--control", metavar="PATH", help="serve the JSON control protocol on this Unix socket")
    parser.add_argument("--trace", action="store_true", help="print every VM exit to stderr")
    cli_tls.add_options(parser)


PRIMARY_ONLY_FT_OPTIONS = ("--ft-mode", "--ft-interval", "--metrics")  # the standby follows the Hello


def _add_ft_options(parser: argparse.ArgumentParser, *, primary: bool) -> None:
    """The FT options; the standby parses the primary's too (hidden), to refuse them in one line."""
    parser.add_argument("--ft-timeout", type=float, default=200, metavar="MS",
                        help="the standby takes over after this long without a word from the primary (default 200)")
    parser.add_argument("--ft-verify", action="store_true",
                        help="check at every sync that the standby's RAM equals the primary's (slow; for tests)")
    parser.add_argument("--ft-witness", metavar="URI",
                        help="file:PATH or etcd:HOST:PORT[/PREFIX], the same for primary and standby: when they "
                             "lose each other, only the side that wins the next epoch there runs the guest")
    shown = (lambda text: text) if primary else (lambda text: argparse.SUPPRESS)
    parser.add_argument("--metrics", metavar="FILE", help=shown("the primary writes one JSON line per sync here"))
    parser.add_argument("--ft-mode", choices=("sync", "pipelined"), default="sync" if primary else None,
                        help=shown("sync: the guest waits for the standby's ack (Kemari); pipelined: it runs on "
                                   "once the sync is captured and only the outputs wait (default sync)"))
    parser.add_argument("--ft-interval", type=float, default=0 if primary else None, metavar="MS",
                        help=shown("also sync every MS milliseconds, output or not (periodic, Remus-style; "
                                   "default: only at outputs)"))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pykvm", description="A pure-Python hypervisor on Linux KVM.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="boot a guest", description="Boot a guest image; exit with its status.")
    run.add_argument("image", nargs="?", metavar="GUEST|PATH",
                     help="a guest name from `pykvm guests list`, or an ELF64, multiboot or flat image "
                          "(default: the embedded greeting guest)")
    run.add_argument("--mem", default=str(DEFAULT_MEMORY >> 20) + "M", help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--cpus", type=int, default=1, help="number of vCPUs (default 1)")
    run.add_argument("--append", default="", metavar="ARGS", help="the guest's command line")
    run.add_argument("--load-addr", metavar="ADDR", help="load address of a flat binary")
    run.add_argument("--kernel", metavar="bzImage|vmlinux", help="boot a Linux kernel (x86 boot protocol)")
    run.add_argument("--initrd", metavar="FILE", help="the initrd/initramfs for --kernel")
    run.add_argument("--incoming", metavar="tcp:HOST:PORT",
                     help="wait for a live migration instead of booting (same options as the source)")
    run.add_argument("--ft", metavar="tcp:HOST:PORT", help="run fault-tolerant, protected by the standby there")
    _add_machine_options(run)
    _add_ft_options(run, primary=True)

    ft = commands.add_parser("ft", help="fault tolerance: run a standby (or a primary)")
    roles = ft.add_subparsers(dest="role", required=True, metavar="ROLE")
    standby = roles.add_parser("standby", help="hold a copy of a primary's guest; take over if it dies")
    standby.add_argument("--listen", required=True, metavar="tcp:HOST:PORT", help="where the primary connects")
    standby.add_argument("--mem", default=str(DEFAULT_MEMORY >> 20) + "M", help="guest RAM (must match the primary)")
    standby.add_argument("--cpus", type=int, default=1, help="vCPUs (must match the primary)")
    _add_machine_options(standby)
    _add_ft_options(standby, primary=False)

    restore = commands.add_parser("restore", help="resume a snapshot",
                                  description="Resume a snapshot; --disk/--net replace its backends.")
    restore.add_argument("file", metavar="FILE")
    restore.add_argument("--verify", action="store_true", help="check the RAM sections' checksums too (reads all RAM)")
    _add_machine_options(restore)

    demo = commands.add_parser("demo", help="fault tolerance end to end: kill a primary, check the standby")
    demo.add_argument("--records", type=int, default=200, help="records the client writes (default 200)")
    demo.add_argument("--seed", type=int, help="seed for the kill moment and the data (default: random)")
    demo.add_argument("--ft-mode", choices=("sync", "pipelined"), default="sync", help="see `pykvm run --ft-mode`")

    ctl = commands.add_parser("ctl", help="send a command to a running pykvm's control socket")
    ctl.add_argument("socket", metavar="SOCKET")
    ctl.add_argument("cmd", metavar="COMMAND", help="query-status, stop, cont, snapshot FILE, query-vcpus, "
                                                    "migrate tcp:HOST:PORT, quit")
    ctl.add_argument("arg", nargs="?", metavar="ARG")
    ctl.add_argument("--overwrite", action="store_true", help="snapshot: replace an existing FILE")

    cli_tls.add_command(commands)

    guest_cmd = commands.add_parser("guests", help="list, build or locate the bundled test guests")
    actions = guest_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="list the bundled guests")
    build = actions.add_parser("build", help="build guests (all by default) into the cache")
    build.add_argument("names", nargs="*", metavar="NAME")
    path = actions.add_parser("path", help="print the path of a built guest image (building it if needed)")
    path.add_argument("name", metavar="NAME")
    return parser


def _resolve_image(name: str | None) -> Path | bytes:
    if name is None:
        return default_guest_image()
    if name in guestbuild.GUESTS:
        return guestbuild.image_path(name)
    path = Path(name)
    if not path.exists() and "/" not in name and "." not in name:
        raise ConfigError(f"{name!r} is neither a bundled guest ({', '.join(guestbuild.GUESTS)}) nor a file")
    return path


def _backends(args: argparse.Namespace) -> tuple[tuple[DiskSpec, ...], tuple[NetSpec, ...]]:
    return tuple(DiskSpec.parse(text) for text in args.disk), tuple(NetSpec.parse(text) for text in args.net)


def _linux_options(args: argparse.Namespace) -> None:
    """`run linux` is --kernel/--initrd/--disk of the bundled Linux guest (built on first use) with
    its default command line, the user's --append after it."""
    if args.kernel is None and args.initrd is not None:
        raise ConfigError("--initrd needs --kernel")
    if args.kernel is not None and args.image is not None:
        raise ConfigError(f"give either a guest ({args.image}) or --kernel, not both")
    if args.image != "linux" or args.incoming:
        return
    from pykvm.guestbuild import linux_guest

    guest = linux_guest.build(log=_log)
    # The uncompressed vmlinux: no decompressor to run, which matters where guest ring 0 is emulated
    # (~27 s saved); `--kernel PATH/bzImage` boots the same kernel through the bzImage path.
    args.image, args.kernel, args.initrd = None, str(guest.vmlinux), str(guest.initramfs)
    args.disk = args.disk or [str(guest.disk())]
    args.append = linux_guest.default_append(network=bool(args.net), extra=args.append)


def cmd_run(args: argparse.Namespace) -> int:
    _linux_options(args)
    if args.ft_witness and not args.ft:
        raise ConfigError("--ft-witness needs --ft")
    fencing = open_witness(args.ft_witness, "primary", _log)  # before building
    disks, nets = _backends(args)
    config = MachineConfig(memory=parse_size(args.mem), cpus=args.cpus, disks=disks, nets=nets)
    load_addr = parse_address(args.load_addr) if args.load_addr is not None else None
    image = None if args.incoming or args.kernel else _resolve_image(args.image)
    server = cli_tls.listen(args, args.incoming, "--incoming") if args.incoming else None
    console = SerialConsole(args.serial)
    try:
        # An incoming VM takes its NICs' backends only once the source has let go of them, and
        # faults its RAM in before it waits: a page fault a page received costs more (ARCHITECTURE.md).
        memory = GuestMemory(config.memory, populate=True) if server is not None else None
        with Machine(config, serial_output=console.output, attach_networks=server is None, memory=memory) as machine:
            if server is not None:
                print(f"pykvm: waiting for a migration on {args.incoming}", file=sys.stderr, flush=True)
                from pykvm.transfer import migration
                migration.migrate_in(machine, server, tls=args.tls)
                machine.attach_networks(wait=10.0)
            else:
                if args.kernel is not None:
                    loaded = machine.load_linux(args.kernel, initrd=args.initrd, cmdline=args.append)
                else:
                    loaded = machine.load(image, cmdline=args.append, load_addr=load_addr)
                if args.trace:
                    print(f"pykvm: loaded {loaded.format} image [{loaded.start:#x}, {loaded.end:#x}), "
                          f"entry {loaded.entry:#x}", file=sys.stderr)
            primary = _protect(machine, args, fencing) if args.ft else None
            return _run(machine, args, console, primary=primary)
    finally:
        console.close()


def _protect(machine: Machine, args: argparse.Namespace, fencing: Fencing | None) -> Primary:
    """Before the guest runs: win the next epoch at the witness (or warn there is none), then
    connect to the standby and give it everything."""
    from pykvm.ft import Primary
    from pykvm.ft.fencing import NO_WITNESS_WARNING
    if fencing is not None:
        fencing.claim_start()
    else:
        _log(NO_WITNESS_WARNING)
    metrics = open(args.metrics, "a", buffering=1) if args.metrics else None
    primary = Primary(machine, timeout=args.ft_timeout / 1000, metrics=metrics, verify=args.ft_verify,
                      interval=args.ft_interval / 1000, pipelined=args.ft_mode == "pipelined", fencing=fencing,
                      tls=args.tls, log=_log)
    primary.protect(args.ft)
    return primary


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_ft(args: argparse.Namespace) -> int:
    """`pykvm ft standby`: follow a primary; on its loss, win the witness's next epoch (if it
    has one), then take over and run the guest here."""
    for option in PRIMARY_ONLY_FT_OPTIONS:
        if getattr(args, option[2:].replace("-", "_")) is not None:
            raise ConfigError(f"{option} is for `pykvm run --ft`: the standby follows the primary's choice")
    from pykvm.ft.fencing import EXIT_FENCED, Fenced
    from pykvm.ft.standby import Standby, TakeoverImpossible
    fencing = open_witness(args.ft_witness, "standby", _log)
    disks, nets = _backends(args)
    config = MachineConfig(memory=parse_size(args.mem), cpus=args.cpus, disks=disks, nets=nets)
    server = cli_tls.listen(args, args.listen, "--listen")
    console = SerialConsole(args.serial)
    try:
        memory = GuestMemory(config.memory, populate=True)  # hot: commits never wait for page faults
        with Machine(config, serial_output=console.output, attach_networks=False, memory=memory) as machine:
            standby = Standby(machine, timeout=args.ft_timeout / 1000, verify=args.ft_verify, fencing=fencing,
                              tls=args.tls, log=_log)
            control_server = control.ControlServer(args.control, machine, tls=args.tls) if args.control else None
            if control_server is not None:
                control_server.register("ft-stats", lambda request: {
                    "role": "standby", "mode": standby.mode, "interval_ms": standby.interval_ms,
                    **standby.stats.__dict__})
            _log(f"ft standby: waiting for a primary on {args.listen}")
            try:
                outcome = standby.serve(server)
            finally:
                server.close()
                if control_server is not None:
                    control_server.close()
            if outcome == "goodbye":
                return 0
            if outcome in ("refused", "fault"):  # a standby that faulted never takes over
                return EXIT_FAILURE
            if standby.committed is None:
                _log("ft standby: the primary is gone before a first complete sync; nothing to take over")
                return EXIT_FAILURE
            try:
                standby.restore_committed()
            except TakeoverImpossible as error:
                _log(f"ft standby: {error}; not taking over")
                return EXIT_FAILURE
            if fencing is not None:
                try:
                    won = fencing.settle("the primary went silent or closed the connection")
                except Fenced as error:
                    _log(f"fenced: {error}")
                    return EXIT_FENCED
                _log(f"ft standby: won epoch {won.number} at {fencing.uri}")
            standby.take_over()
            return _run(machine, args, console, started=True)
    finally:
        console.close()


def cmd_restore(args: argparse.Namespace) -> int:
    from pykvm.transfer import snapshot
    snap = snapshot.open_snapshot(args.file, verify_memory=args.verify)
    console = SerialConsole(args.serial)
    try:
        disks, nets = _backends(args)
        config = snap.config
        if disks or nets:
            config = MachineConfig(config.memory, config.cpus, disks or config.disks, nets or config.nets,
                                   config.legacy_virtio, config.ioeventfd)
        with snap.machine(serial_output=console.output, config=config) as machine:
            return _run(machine, args, console)
    finally:
        console.close()
        snap.close()


def _run(machine: Machine, args: argparse.Namespace, console: SerialConsole, *,
         primary: Primary | None = None, started: bool = False) -> int:
    """Run a built (loaded or restored) machine to its end; returns the exit status."""
    if args.trace:
        tracer = ExitTracer()
        for vcpu in machine.vm.vcpus:
            vcpu.trace = tracer
    server = control.ControlServer(args.control, machine, tls=args.tls) if args.control else None
    if server is not None:
        server.register("ft-stats", lambda request: {"role": "primary", **(primary.summary() if primary else {})})
        server.register("ft-protect", lambda request: _ft_protect(machine, args, primary, request))
    try:
        console.attach(machine.serial.feed)
        if not started:
            machine.vm.start()
        stop = machine.vm.wait()
    finally:
        if primary is not None:
            primary.close()
        if server is not None:
            server.close()
    if stop.report:
        print(f"pykvm: {stop.reason}\n{stop.report}", file=sys.stderr)
    elif args.trace or stop.kind is StopKind.MIGRATED:
        print(f"pykvm: {stop.reason}", file=sys.stderr)
    return stop.status


def _ft_protect(machine: Machine, args: argparse.Namespace, primary: Primary | None, request: dict) -> dict:
    uri = request.get("uri")
    if not isinstance(uri, str):
        raise control.CommandError("ft-protect needs a 'uri' string")
    if primary is None:
        raise control.CommandError("this VMM was not started with --ft")
    try:
        primary.protect(uri)
    except loaded_errors(("pykvm.ft.primary", "FtError"), ("pykvm.ft.fencing", "Fenced")) as error:
        raise control.CommandError(str(error)) from None
    return primary.summary()


_CTL_ARGUMENT = {"snapshot": "file", "migrate": "uri", "ft-protect": "uri"}


def cmd_ctl(args: argparse.Namespace) -> int:
    request = {"cmd": args.cmd}
    if args.arg is not None:
        request[_CTL_ARGUMENT.get(args.cmd, "arg")] = args.arg
    if args.overwrite:
        request["overwrite"] = True
    reply = control.request(args.socket, request)
    print(json.dumps(reply))
    return 0 if reply.get("ok") else EXIT_FAILURE


def cmd_guests(args: argparse.Namespace) -> int:
    if args.action == "list":
        width = max(map(len, guestbuild.GUESTS))
        for name, description in guestbuild.GUESTS.items():
            print(f"{name:<{width}}  {description}")
        print(f"{'linux':<{width}}  Linux 6.1 (tinyconfig + guests/linux/pykvm.config), busybox initramfs and ext4 "
              "root; built on request (`guests build linux`, a few minutes)")
    elif args.action == "build":
        for name in args.names:
            if name not in guestbuild.GUESTS and name != "linux":
                raise guestbuild.UnknownGuest(name)
        others = [name for name in args.names if name != "linux"]
        if others or not args.names:
            built = guestbuild.build(others or None, log=lambda line: print(line, file=sys.stderr))
            for name, path in built.items():
                print(f"{name}: {path}")
        if "linux" in args.names:
            from pykvm.guestbuild import linux_guest

            print(f"linux: {linux_guest.build(log=_log).directory}")
    elif args.name == "linux":
        from pykvm.guestbuild import linux_guest

        print(linux_guest.build(log=_log).bzimage)
    else:
        print(guestbuild.image_path(args.name))
    return 0


def _print_error(error: Exception) -> None:
    print(f"pykvm: error: {error}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from pykvm.ft import demo
    return demo.main(args.records, args.seed, args.ft_mode)


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "restore": cmd_restore, "ctl": cmd_ctl, "guests": cmd_guests, "ft": cmd_ft,
            "tls": cli_tls.cmd_tls}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if hasattr(args, "tls_creds"):  # run, restore, ft standby
            cli_tls.load(args)
        return COMMANDS[args.command](args)
    except (ConfigError, KvmUnavailable, guestbuild.ToolchainMissing, guestbuild.UnknownGuest) as error:
        _print_error(error)
        return EXIT_USAGE
    except (KvmError, guestbuild.BuildError,
            *loaded_errors(("pykvm.transfer.migration", "MigrationError"), ("pykvm.ft.primary", "FtError"))) as error:
        _print_error(error)
        return EXIT_FAILURE
    except loaded_errors(("pykvm.ft.fencing", "Fenced")):
        from pykvm.ft.fencing import EXIT_FENCED
        return EXIT_FENCED  # its `fenced: ` line is out already
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
