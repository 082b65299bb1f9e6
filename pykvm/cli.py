"""The `pykvm` command.

    pykvm run [GUEST|PATH] [--kernel bzImage|vmlinux [--initrd FILE]] [--mem 64M] [--cpus N] [--append ARGS]
              [--serial stdio|file:PATH|none]
              [--load-addr ADDR] [--disk PATH[,readonly]]... [--net SPEC]... [--control PATH]
              [--incoming tcp:HOST:PORT] [--trace] [--gdb tcp:HOST:PORT] [--ft tcp:HOST:PORT [--ft-witness URI] [--ft-...]]
              [--tls-creds DIR | --insecure]
    pykvm ft standby --listen tcp:HOST:PORT [--ft-witness URI] [--ft-timeout MS] [--disk ...] [--net ...]
              [--tls-creds DIR | --insecure]
    pykvm restore FILE [--disk ...] [--net ...] [--serial ...] [--control PATH] [--verify] [--trace] [--gdb tcp:HOST:PORT] [--tls-creds DIR]
    pykvm ft study [--quick] [-o DIR] | pykvm ft report METRICS.jsonl [-o DIR]
    pykvm ctl SOCKET COMMAND [ARG] [--overwrite] [--timeout SECONDS]
    pykvm tls init DIR [--host NAME]... [--force]
    pykvm guests list | build [NAME...] | path NAME [--elf]

Exit status: the guest's (its debug-exit value, 0 for a reset or power-off), 1 when the guest
crashed or the VMM failed, 2 for bad input (one line on stderr, no traceback), 75 when an FT
primary or standby fenced itself (the other side won the witness's epoch; see ft/fencing.py),
128+N when signal N ended it (SIGTERM, SIGHUP, ^C; see cli_signals.py). Every option's value is
checked as it is parsed (cli_validate.py), the relations between options right after (cli_parser.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pykvm import __version__, cli_ctl, cli_ft, cli_guests, cli_parser, cli_signals, cli_tls, control, guestbuild, unixsock
from pykvm import cli_validate as valid
from pykvm.cli_lazy import loaded_errors, open_witness
from pykvm.ft.choices import DISK_MODES, EXIT_FENCED, MAX_RECORDS, MIN_RECORDS, SYNC_MODES
from pykvm.study import commands as study_commands
from pykvm.boot.embedded import default_guest_image
from pykvm.console import SerialConsole
from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.diagnostics import ExitTracer
from pykvm.errors import ConfigError
from pykvm.kvm import KvmError, KvmUnavailable
from pykvm.machine import Machine, MachineConfig
from pykvm.memory import GuestMemory
from pykvm.run_control import StopKind

if TYPE_CHECKING:  # migration, snapshots, FT and gdb are imported by the commands that use them (cli_lazy)
    from pykvm.ft import Primary

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_STATUSES = """exit status:
  N      the guest's: its debug-exit value; 0 for a reset or power-off
  1      the guest crashed or the VMM failed (a report on stderr)
  2      bad input: one line on stderr, nothing ran
  75     fenced (FT): the other side won the witness's epoch
  128+N  ended by signal N (SIGTERM, SIGHUP: its sockets removed)"""
_MEM_HELP = "guest RAM: K, M, G or T suffix, a bare number is MiB; 2M up to the host's RAM (default 64M)"
_CPUS_HELP = f"vCPUs, 1 to {valid.MAX_CPUS} (and KVM's limit) (default 1)"


def _example(parser: argparse.ArgumentParser, example: str, statuses: str = EXIT_STATUSES) -> None:
    parser.epilog = f"example:\n  {example}\n\n{statuses}"


def _add_machine_options(parser: argparse.ArgumentParser) -> None:
    """Options that run and restore share: backends, console, control, tracing."""
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[,readonly]", type=valid.disk_spec,
                        help="a virtio-blk disk on a regular file or block device (repeatable)")
    parser.add_argument("--net", action="append", default=[], metavar="SPEC", type=valid.net_spec,
                        help="a virtio-net NIC: tap:NAME or socket:PATH[,peer=PATH], each [,mac=M] (repeatable; "
                             f"disks and NICs: {valid.PCI_DEVICE_SLOTS} at most)")
    parser.add_argument("--serial", default="stdio", type=valid.serial_spec, metavar="stdio|file:PATH|none",
                        help="COM1: stdio, file:PATH (a regular file or a character device) or none (default stdio)")
    parser.add_argument("--control", metavar="PATH", type=valid.socket_path,
                        help="serve the JSON control protocol on this Unix socket "
                             f"(at most {valid.UNIX_PATH_MAX} bytes)")
    parser.add_argument("--trace", action="store_true", help="print every VM exit to stderr")
    cli_tls.add_options(parser)


GDB_HELP = "serve gdb's remote protocol there; the guest waits at its first instruction until gdb continues"


def _parser() -> argparse.ArgumentParser:
    parser = cli_parser.OneLineParser(prog="pykvm", description="A pure-Python hypervisor on Linux KVM.",
                                      epilog=EXIT_STATUSES)
    parser.add_argument("--version", action="version", version=f"pykvm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="boot a guest", description="Boot a guest image; exit with its status.")
    _example(run, "pykvm run kv --disk kv.img --net socket:/tmp/kv.sock --mem 128M --cpus 2")
    run.add_argument("image", nargs="?", metavar="GUEST|PATH", type=valid.guest_or_image([*guestbuild.GUESTS, "linux"]),
                     help="a guest name from `pykvm guests list`, or an ELF64, multiboot or flat image file "
                          "(default: the embedded greeting guest)")
    run.add_argument("--mem", default="64M", type=valid.memory_size, metavar="SIZE", help=_MEM_HELP)
    run.add_argument("--cpus", type=valid.cpus, default=1, metavar="N", help=_CPUS_HELP)
    run.add_argument("--append", default="", metavar="ARGS", help="the guest's command line")
    run.add_argument("--load-addr", metavar="ADDR", type=valid.address,
                     help="load address of a flat binary (required for one; not for ELF or multiboot images)")
    run.add_argument("--kernel", metavar="bzImage|vmlinux", type=valid.input_file("a kernel"),
                     help="boot a Linux kernel (x86 boot protocol)")
    run.add_argument("--initrd", metavar="FILE", type=valid.input_file("an initrd"),
                     help="the initrd/initramfs for --kernel")
    run.add_argument("--incoming", metavar="tcp:HOST:PORT", type=valid.tcp_uri,
                     help="wait for a live migration instead of booting (same options as the source)")
    run.add_argument("--ft", metavar="tcp:HOST:PORT", type=valid.tcp_uri,
                     help="run fault-tolerant, protected by the standby there")
    _add_machine_options(run)
    cli_ft.add_options(run, primary=True)
    run.add_argument("--gdb", metavar="tcp:HOST:PORT", help=GDB_HELP)

    ft = commands.add_parser("ft", help="fault tolerance: run a standby", description="Fault tolerance: the standby "
                             "side (the primary is `pykvm run GUEST --ft tcp:HOST:PORT`).")
    _example(ft, "pykvm ft standby --listen tcp:127.0.0.1:7000 --disk standby.img")
    roles = ft.add_subparsers(dest="role", required=True, metavar="ROLE")
    standby = roles.add_parser("standby", help="hold a copy of a primary's guest; take over if it dies",
                               description="Hold a copy of a primary's guest; take over if it dies. The "
                                           "sync mode and interval are the primary's: the standby follows.")
    _example(standby, "pykvm ft standby --listen tcp:127.0.0.1:7000 --ft-witness file:/shared/kv.epoch "
                      "--disk standby.img --net socket:/tmp/kv.sock")
    standby.add_argument("--listen", required=True, metavar="tcp:HOST:PORT", type=valid.tcp_uri,
                         help="where the primary connects")
    standby.add_argument("--mem", default="64M", type=valid.memory_size, metavar="SIZE",
                         help=_MEM_HELP.replace("the host's RAM", "the host's available RAM")
                         + "; must match the primary")
    standby.add_argument("--cpus", type=valid.cpus, default=1, metavar="N",
                         help=_CPUS_HELP + "; must match the primary")
    _add_machine_options(standby)
    cli_ft.add_options(standby, primary=False)
    study_commands.add_commands(roles)

    restore = commands.add_parser("restore", help="resume a snapshot",
                                  description="Resume a snapshot; --disk/--net replace its backends.")
    _example(restore, "pykvm restore /tmp/vm.snap --serial file:/tmp/serial.log")
    restore.add_argument("file", metavar="FILE", type=valid.input_file("a snapshot"), help="a regular file")
    restore.add_argument("--verify", action="store_true", help="check the RAM sections' checksums too (reads all RAM)")
    _add_machine_options(restore)
    restore.add_argument("--gdb", metavar="tcp:HOST:PORT", help=GDB_HELP)

    demo = commands.add_parser("demo", help="fault tolerance end to end: kill a primary, check the standby",
                               description="Run a standby and a kv primary, write records, kill the primary "
                                           "(SIGKILL) among them, read every acknowledged record back.")
    _example(demo, "pykvm demo --records 500 --seed 7 --ft-mode pipelined",
             "exit status: 0 every acknowledged record was served, 1 one was lost or the demo failed, 2 bad input")
    demo.add_argument("--records", type=valid.integer(MIN_RECORDS, MAX_RECORDS),
                      default=200, help=f"records the client writes, {MIN_RECORDS} to "
                                        f"{MAX_RECORDS} (default 200)")
    demo.add_argument("--seed", type=valid.integer(-(1 << 63), (1 << 63) - 1),
                      help="seed for the kill moment and the data (default: random)")
    demo.add_argument("--ft-mode", choices=SYNC_MODES, default="sync", help="see `pykvm run --ft-mode`")
    demo.add_argument("--ft-disk", choices=DISK_MODES, default="replicated", help="see `pykvm run --ft-disk`")

    cli_ctl.add_command(commands, _example)
    cli_tls.add_command(commands)

    cli_guests.add_command(commands, _example)
    return parser


def _resolve_image(name: str | None) -> Path | bytes:
    if name is None:
        return default_guest_image()
    if name in guestbuild.GUESTS:
        return guestbuild.image_path(name)
    return Path(name)  # checked as a regular file by the parser


def _backends(args: argparse.Namespace) -> tuple[tuple[DiskSpec, ...], tuple[NetSpec, ...]]:
    disks, nets = tuple(DiskSpec.parse(text) for text in args.disk), tuple(NetSpec.parse(text) for text in args.net)
    valid.check_devices(disks, nets)
    return disks, nets


def _check_guest_needs(args: argparse.Namespace) -> None:
    """A bundled guest that drives a disk or a NIC says so before it boots, not with a FAIL after."""
    needs = guestbuild.NEEDS.get(args.image, ())
    missing = [option for option in needs if not getattr(args, option[2:])]
    if missing and not args.incoming:
        raise ConfigError(f"the {args.image} guest needs {' and '.join(missing)} "
                          f"(example: pykvm run {args.image} {guestbuild.NEEDS_EXAMPLE[args.image]})")


def _linux_options(args: argparse.Namespace) -> None:
    """`run linux` is --kernel/--initrd/--disk of the bundled Linux guest (built on first use) with
    its default command line, the user's --append after it."""
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
    _check_guest_needs(args)
    _linux_options(args)
    fencing = open_witness(args.ft_witness, "primary", _log)  # before building
    disks, nets = _backends(args)
    config = MachineConfig(memory=args.mem, cpus=args.cpus, disks=disks, nets=nets)
    load_addr = args.load_addr
    image = None if args.incoming or args.kernel else _resolve_image(args.image)
    server = cli_tls.listen(args, args.incoming, "--incoming") if args.incoming else None
    console = SerialConsole(args.serial)
    try:
        # An incoming VM takes its NICs' backends only once the source has let go of them, and
        # faults its RAM in before it waits: a page fault a page received costs more (ARCHITECTURE.md).
        memory = GuestMemory(config.memory, populate=True) if server is not None else None
        with Machine(config, serial_output=console.output, attach_networks=server is None, memory=memory) as machine:
            if server is not None:
                from pykvm.transfer import migration

                print(f"pykvm: waiting for a migration on {args.incoming}", file=sys.stderr, flush=True)
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
            primary = cli_ft.protect(machine, args, fencing, _log) if args.ft else None
            return _run(machine, args, console, primary=primary)
    finally:
        console.close()


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cmd_ft(args: argparse.Namespace) -> int:
    """`pykvm ft standby`: follow a primary; on its loss, win the witness's next epoch (if it
    has one), then take over and run the guest here. (`ft study` and `ft report`: pykvm/study/.)"""
    if args.role in study_commands.ROLES:
        return study_commands.run(args)
    for option in cli_ft.PRIMARY_ONLY_FT_OPTIONS:
        if getattr(args, option[2:].replace("-", "_")) is not None:
            raise ConfigError(f"{option} is for `pykvm run --ft`: the standby follows the primary's choice")
    from pykvm.ft.fencing import Fenced
    from pykvm.ft.standby import Standby, TakeoverImpossible

    fencing = open_witness(args.ft_witness, "standby", _log)
    valid.check_standby_memory(args.mem)
    disks, nets = _backends(args)
    config = MachineConfig(memory=args.mem, cpus=args.cpus, disks=disks, nets=nets)
    server = cli_tls.listen(args, args.listen, "--listen")
    console = SerialConsole(args.serial)
    try:
        memory = GuestMemory(config.memory, populate=True)  # hot: commits never wait for page faults
        with Machine(config, serial_output=console.output, attach_networks=False, memory=memory) as machine:
            standby = Standby(machine, timeout=args.ft_timeout / 1000, verify=args.ft_verify, fencing=fencing,
                              tls=args.tls, log=_log, trace=cli_ft.trace(args, _log))
            control_server = control.ControlServer(args.control, machine, tls=args.tls) if args.control else None
            if control_server is not None:
                cli_ft.serve_standby_control(control_server, standby)
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
        valid.check_saved_backends(str(args.file), () if disks else config.disks, () if nets else config.nets)
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
    debugger = None
    if getattr(args, "gdb", None):
        from pykvm import gdb

        debugger = gdb.serve(machine.vm, args.gdb, _log)
    server = control.ControlServer(args.control, machine, tls=args.tls) if args.control else None
    if server is not None:
        cli_ft.serve_primary_control(server, primary)
    try:
        console.attach(machine.serial.feed)
        cli_signals.start(machine, started=started)  # from here a SIGTERM or SIGHUP stops the guest
        stop = machine.vm.wait()
    finally:
        cli_signals.ended()
        if primary is not None:
            primary.close()
        if server is not None:
            server.close()
        if debugger is not None:
            debugger.close()
    if stop.report:
        print(f"pykvm: {stop.reason}\n{stop.report}", file=sys.stderr)
    elif args.trace or stop.kind is StopKind.MIGRATED:
        print(f"pykvm: {stop.reason}", file=sys.stderr)
    return stop.status


def _print_error(error: Exception) -> None:
    print(f"pykvm: error: {error}", file=sys.stderr)


def cmd_demo(args: argparse.Namespace) -> int:
    from pykvm.ft import demo

    return demo.main(args.records, args.seed, args.ft_mode, args.ft_disk)


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "restore": cmd_restore, "ctl": cli_ctl.cmd_ctl,
            "guests": cli_guests.cmd_guests,
            "ft": cmd_ft, "tls": cli_tls.cmd_tls}


def main(argv: list[str] | None = None) -> int:
    cli_signals.install()
    try:
        args = _parser().parse_args(argv)
        cli_parser.check_relations(args)
        valid.check_cache_dir()
        if hasattr(args, "tls_creds"):  # run, restore, ft standby
            cli_tls.load(args)
        return COMMANDS[args.command](args)
    except cli_signals.Terminated as signalled:
        unixsock.remove_leftovers()  # the signal may have come between a bind and its owner's `try`
        _log(f"pykvm: ended by {signalled}")
        return 128 + signalled.signum
    except (ConfigError, KvmUnavailable, guestbuild.ToolchainMissing, guestbuild.UnknownGuest) as error:
        _print_error(error)
        return EXIT_USAGE
    except (KvmError, guestbuild.BuildError,
            *loaded_errors(("pykvm.transfer.migration", "MigrationError"), ("pykvm.ft.reach", "FtError"))) as error:
        _print_error(error)
        return EXIT_FAILURE
    except loaded_errors(("pykvm.ft.fencing", "Fenced")):
        return EXIT_FENCED  # its `fenced: ` line is out already
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
