"""The `pykvm` command.

    pykvm run [GUEST|PATH] [--mem 64M] [--cpus N] [--append ARGS] [--serial stdio|file:PATH|none]
              [--load-addr ADDR] [--trace]
    pykvm guests list | build [NAME...] | path NAME

Exit status: the guest's (its debug-exit value, 0 for a reset or power-off), 1 when the guest
crashed or the VMM failed, 2 for bad input (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pykvm import guests
from pykvm.boot.embedded import default_guest_image
from pykvm.console import SerialConsole
from pykvm.devices.net_backends import NetSpec
from pykvm.devices.virtio.blk import DiskSpec
from pykvm.diagnostics import ExitTracer
from pykvm.errors import ConfigError
from pykvm.kvm import KvmError, KvmUnavailable
from pykvm.machine import DEFAULT_MEMORY, Machine, MachineConfig

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
    run.add_argument("--serial", default="stdio", help="COM1: stdio, file:PATH or none (default stdio)")
    run.add_argument("--load-addr", metavar="ADDR", help="load address of a flat binary")
    run.add_argument("--disk", action="append", default=[], metavar="PATH[,readonly]",
                     help="a virtio-blk disk on a file (repeatable)")
    run.add_argument("--net", action="append", default=[], metavar="SPEC",
                     help="a virtio-net NIC: tap:NAME or socket:PATH[,peer=PATH], each [,mac=M] (repeatable)")
    run.add_argument("--trace", action="store_true", help="print every VM exit to stderr")

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
    if name in guests.GUESTS:
        return guests.image_path(name)
    path = Path(name)
    if not path.exists() and "/" not in name and "." not in name:
        raise ConfigError(f"{name!r} is neither a bundled guest ({', '.join(guests.GUESTS)}) nor a file")
    return path


def cmd_run(args: argparse.Namespace) -> int:
    config = MachineConfig(
        memory=parse_size(args.mem),
        cpus=args.cpus,
        disks=tuple(DiskSpec.parse(text) for text in args.disk),
        nets=tuple(NetSpec.parse(text) for text in args.net),
    )
    load_addr = parse_address(args.load_addr) if args.load_addr is not None else None
    image = _resolve_image(args.image)
    console = SerialConsole(args.serial)
    try:
        with Machine(config, serial_output=console.output) as machine:
            loaded = machine.load(image, cmdline=args.append, load_addr=load_addr)
            if args.trace:
                tracer = ExitTracer()
                for vcpu in machine.vm.vcpus:
                    vcpu.trace = tracer
                print(f"pykvm: loaded {loaded.format} image [{loaded.start:#x}, {loaded.end:#x}), "
                      f"entry {loaded.entry:#x}", file=sys.stderr)
            console.attach(machine.serial.feed)
            stop = machine.run()
    finally:
        console.close()
    if stop.report:
        print(f"pykvm: {stop.reason}\n{stop.report}", file=sys.stderr)
    elif args.trace:
        print(f"pykvm: {stop.reason}", file=sys.stderr)
    return stop.status


def cmd_guests(args: argparse.Namespace) -> int:
    if args.action == "list":
        width = max(map(len, guests.GUESTS))
        for name, description in guests.GUESTS.items():
            print(f"{name:<{width}}  {description}")
    elif args.action == "build":
        for name in args.names:
            if name not in guests.GUESTS:
                raise guests.UnknownGuest(name)
        built = guests.build(args.names or None, log=lambda line: print(line, file=sys.stderr))
        for name, path in built.items():
            print(f"{name}: {path}")
    else:
        print(guests.image_path(args.name))
    return 0


def _print_error(error: Exception) -> None:
    print(f"pykvm: error: {error}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return cmd_run(args)
        return cmd_guests(args)
    except (ConfigError, KvmUnavailable, guests.ToolchainMissing, guests.UnknownGuest) as error:
        _print_error(error)
        return EXIT_USAGE
    except (KvmError, guests.BuildError) as error:
        _print_error(error)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
