"""`pykvm guests list | build [NAME...] | path NAME [--elf]`: the bundled test guests."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from pykvm import guestbuild


def add_command(commands: argparse._SubParsersAction, example: Callable[[argparse.ArgumentParser, str], None]) -> None:
    guest_cmd = commands.add_parser("guests", help="list, build or locate the bundled test guests")
    example(guest_cmd, "pykvm guests build kv",
            "exit status: 0 done, 1 a build failed, 2 bad input (an unknown guest, no toolchain)")
    actions = guest_cmd.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="list the bundled guests")
    build = actions.add_parser("build", help="build guests (all by default) into the cache")
    build.add_argument("names", nargs="*", metavar="NAME")
    path = actions.add_parser("path", help="print the path of a built guest image (building it if needed)")
    path.add_argument("name", metavar="NAME")
    path.add_argument("--elf", action="store_true", help="the unstripped ELF with symbols, for gdb")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


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

        guest = linux_guest.build(log=_log)
        print(guest.vmlinux if args.elf else guest.bzimage)
    else:
        print(guestbuild.elf_path(args.name) if args.elf else guestbuild.image_path(args.name))
    return 0
