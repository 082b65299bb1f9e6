"""The validation layer of the `pykvm` command: every option's value is checked as it is parsed
(relations between options right after, in cli_parser), and each failure is one line and exit
status 2.

An option and its check are one line in cli.py: `parser.add_argument("--mem", type=valid.memory_size, ...)`.
A check is a callable from the text to the value (or the text, checked); it raises `Invalid`
with the reason, and the parser prints `pykvm: error: --mem -64M: REASON`. Files the VMM will
open are checked for their kind before anything opens them: a FIFO or a device named as an
image would block the open or stream without end.

The limits, and where they come from:
  --cpus    machine.MAX_CPUS (255: one-byte APIC IDs, 0xFF is broadcast); KVM's own limit is
            checked when the VM is made.
  --mem     at least 2 MiB, a multiple of 4 KiB, at most the host's RAM (MemTotal); a standby,
            which keeps all of it resident, at most what is available (MemAvailable).
  devices   machine.PCI_DEVICE_SLOTS (31 disks and NICs together).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import stat
from pathlib import Path
from typing import Callable, Iterable

from pykvm.errors import ConfigError
from pykvm.machine import MAX_CPUS, PCI_DEVICE_SLOTS

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
IFNAMSIZ = 16  # a network interface's name, with its NUL
MAX_MS = 24 * 3600 * 1000.0  # a day: beyond it a timeout or interval is a typo


class Invalid(argparse.ArgumentTypeError):
    """Why a value is refused; the parser prefixes the option and the value."""


# -- numbers --------------------------------------------------------------------------------------------


def _whole(text: str) -> int:
    try:
        return int(text, 10)
    except ValueError:
        raise Invalid(f"{text}: not a whole number") from None


def integer(low: int, high: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        value = _whole(text)
        if not low <= value <= high:
            raise Invalid(f"{text}: must be {low} to {high}")
        return value
    return check


def cpus(text: str) -> int:
    if not 1 <= _whole(text) <= MAX_CPUS:
        raise Invalid(f"{text}: this machine has 1 to {MAX_CPUS} vCPUs (one-byte APIC IDs, 0xFF is broadcast)")
    return int(text, 10)


def millis(low: float, high: float = MAX_MS) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise Invalid(f"{text}: not a number of milliseconds") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise Invalid(f"{text}: must be {low:g} to {high:.0f} ms")
        return value
    return check


def seconds(low: float, high: float) -> Callable[[str], float]:
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise Invalid(f"{text}: not a number of seconds") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise Invalid(f"{text}: must be {low:g} to {high:g} seconds")
        return value
    return check


_SIZE = re.compile(r"^\s*(\d{1,20})\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}  # bare number: MiB, as QEMU
MIN_MEMORY = 2 << 20


def host_memory(field: str = "MemTotal") -> int:
    """A /proc/meminfo field in bytes (MemTotal, MemAvailable)."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            name, _, value = line.partition(":")
            if name == field:
                return int(value.split()[0]) * 1024
    raise ConfigError(f"/proc/meminfo has no {field}")


def memory_size(text: str) -> int:
    """`--mem`: bytes; at least 2 MiB, whole pages, no more than the host has."""
    match = _SIZE.match(text)
    if not match:
        raise Invalid(f"{text}: not a size (examples: 64M, 1G, 65536K)")
    size = int(match.group(1)) * _UNITS[match.group(2).upper()]
    if size < MIN_MEMORY:
        raise Invalid(f"{text}: at least 2 MiB of guest RAM are needed")
    if size % 4096:
        raise Invalid(f"{text}: must be a multiple of 4 KiB")
    total = host_memory()
    if size > total:
        raise Invalid(f"{text}: more than this host's {total >> 20} MiB of RAM")
    return size


def address(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise Invalid(f"{text}: not an address (examples: 0x100000, 0x7c00)") from None
    if not 0 <= value < 1 << 64:
        raise Invalid(f"{text}: an address is 0 to 2^64-1")
    return value


# -- text and paths -----------------------------------------------------------------------------------


def _plain_path(text: str, what: str) -> str:
    if not text:
        raise Invalid(f"'': expected {what}, got nothing")
    if "\0" in text:
        raise Invalid(f"{text!r}: a path cannot hold a NUL byte")
    return text


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def _stat(path: str) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise Invalid(f"{path}: {error.strerror}") from None


def input_file(what: str, *, devices: tuple[Callable[[int], bool], ...] = ()) -> Callable[[str], str]:
    """An existing regular file (or one of `devices` kinds), read by the VMM."""
    def check(text: str) -> str:
        _plain_path(text, what)
        info = _stat(text)
        if info is None:
            raise Invalid(f"{text}: no such file")
        if not stat.S_ISREG(info.st_mode) and not any(test(info.st_mode) for test in devices):
            raise Invalid(f"{text}: is {_kind(info.st_mode)}, not {what}")
        return text
    return check


def output_file(what: str, *, devices: bool = False) -> Callable[[str], str]:
    """A file the VMM writes: its directory exists; the file is absent or regular (or, with
    `devices`, a character device such as /dev/null)."""
    def check(text: str) -> str:
        return check_output_path(_plain_path(text, what), what, devices=devices)
    return check


def check_output_path(text: str, what: str, *, devices: bool = False) -> str:
    info = _stat(text)
    if info is not None:
        if not (stat.S_ISREG(info.st_mode) or (devices and stat.S_ISCHR(info.st_mode))):
            raise Invalid(f"{text}: is {_kind(info.st_mode)}, not {what}")
        return text
    parent = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(parent):
        raise Invalid(f"{text}: directory {parent} does not exist")
    return text


def socket_path(text: str) -> str:
    """A Unix socket path to bind: fits sun_path, its directory exists, nothing but a socket there."""
    _plain_path(text, "a socket path")
    if len(os.fsencode(text)) > UNIX_PATH_MAX:
        raise Invalid(f"{text}: a Unix socket path has at most {UNIX_PATH_MAX} bytes ({len(os.fsencode(text))} given)")
    info = _stat(text)
    if info is not None and not stat.S_ISSOCK(info.st_mode):
        raise Invalid(f"{text}: is {_kind(info.st_mode)}, not a socket")
    parent = os.path.dirname(os.path.abspath(text))
    if info is None and not os.path.isdir(parent):
        raise Invalid(f"{text}: directory {parent} does not exist")
    return text


def existing_socket(text: str) -> str:
    """A Unix socket to connect to: fits sun_path and is a socket."""
    _plain_path(text, "a socket path")
    if len(os.fsencode(text)) > UNIX_PATH_MAX:
        raise Invalid(f"{text}: a Unix socket path has at most {UNIX_PATH_MAX} bytes ({len(os.fsencode(text))} given)")
    info = _stat(text)
    if info is None:
        raise Invalid(f"{text}: no pykvm is listening there (no such file)")
    if not stat.S_ISSOCK(info.st_mode):
        raise Invalid(f"{text}: is {_kind(info.st_mode)}, not a socket")
    return text


def directory(text: str) -> str:
    _plain_path(text, "a directory")
    if not os.path.isdir(text):
        raise Invalid(f"{text}: not a directory")
    return text


def tcp_uri(text: str) -> str:
    """tcp:HOST:PORT with a host name the resolver takes and a port 1-65535."""
    from pykvm.transfer import tcp

    try:
        tcp.parse_tcp_uri(text)
    except ConfigError as error:
        raise Invalid(str(error)) from None
    return text


def witness_uri(text: str) -> str:
    """--ft-witness: file:PATH (a regular file or none yet, in an existing directory) or etcd:HOST:PORT[/PREFIX]."""
    if text.startswith("file:"):
        check_output_path(_plain_path(text[5:], "a witness file"), "a witness file")
    elif text.startswith("etcd:"):
        tcp_uri("tcp:" + text[5:].partition("/")[0])
    else:
        raise Invalid(f"{text}: expected file:PATH or etcd:HOST:PORT[/PREFIX]")
    return text


def serial_spec(text: str) -> str:
    if text in ("stdio", "none"):
        return text
    if text.startswith("file:") and len(text) > 5:
        check_output_path(_plain_path(text[5:], "a file"), "a file", devices=True)
        return text
    raise Invalid(f"{text!r}: expected stdio, file:PATH or none")


def disk_spec(text: str) -> str:
    from pykvm.devices.virtio.blk import DiskSpec

    try:
        spec = DiskSpec.parse(text)
    except ConfigError as error:
        raise Invalid(str(error)) from None
    input_file("a disk image", devices=(stat.S_ISBLK,))(spec.path)
    return text


def net_spec(text: str) -> str:
    from pykvm.devices.net_backends import NetSpec

    try:
        spec = NetSpec.parse(text)
    except ConfigError as error:
        raise Invalid(str(error)) from None
    _check_net(spec, text)
    return text


def _check_net(spec, text: str) -> None:
    if spec.kind not in ("tap", "socket"):
        raise Invalid(f"{text}: expected tap:NAME or socket:PATH")
    if spec.kind == "tap" and not re.fullmatch(r"[A-Za-z0-9_.-]+", spec.target):
        raise Invalid(f"{text}: a TAP name is letters, digits, '_', '.', '-'")
    if spec.kind == "tap" and len(spec.target) > IFNAMSIZ - 1:
        raise Invalid(f"{text}: a TAP name has at most {IFNAMSIZ - 1} characters")
    if spec.kind == "socket":
        socket_path(spec.target)
        if spec.peer is not None:
            _plain_path(spec.peer, "a peer socket path")
            if len(os.fsencode(spec.peer)) > UNIX_PATH_MAX:
                raise Invalid(f"{text}: peer path over {UNIX_PATH_MAX} bytes")
    if spec.mac is not None:
        mac_address(spec.mac, text)


def check_saved_backends(where: str, disks: Iterable, nets: Iterable) -> None:
    """The disks and NICs a snapshot's configuration names (a file that may be damaged or
    hostile): checked as --disk and --net are, before anything opens them."""
    disks, nets = list(disks), list(nets)
    try:
        for disk in disks:
            input_file("a disk image", devices=(stat.S_ISBLK,))(disk.path)
        for net in nets:
            text = f"{net.kind}:{net.target}"
            _check_net(net, text if text.isprintable() else ascii(text))
    except Invalid as error:
        raise ConfigError(f"{where}: its saved backends: {error} (--disk and --net give others)") from None
    check_devices(disks, nets)


def mac_address(mac: str, text: str) -> bytes:
    if not re.fullmatch(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}", mac):
        raise Invalid(f"{text}: mac={mac} is not six hex bytes (example: 52:54:00:12:34:56)")
    value = bytes.fromhex(mac.replace(":", ""))
    if value[0] & 1:
        raise Invalid(f"{text}: mac={mac} is a multicast address (its first byte is odd)")
    if not any(value):
        raise Invalid(f"{text}: mac={mac} is all zeros")
    return value


def guest_or_image(names: Iterable[str]) -> Callable[[str], str]:
    names = tuple(names)

    def check(text: str) -> str:
        if text in names:
            return text
        if not text or ("/" not in text and "." not in text and not os.path.lexists(text)):
            raise Invalid(f"{text!r} is neither a bundled guest ({', '.join(names)}) nor a file")
        return input_file("an image")(text)
    return check


# -- checks across values ----------------------------------------------------------------------------


def check_devices(disks: Iterable, nets: Iterable) -> None:
    """Parsed DiskSpecs and NetSpecs: the bus has room, no file is two writable disks, no two
    NICs share a MAC or a socket."""
    from pykvm.devices.virtio.net import parse_mac
    from pykvm.machine import default_mac

    disks, nets = list(disks), list(nets)
    if len(disks) + len(nets) > PCI_DEVICE_SLOTS:
        raise ConfigError(f"{len(disks)} disks and {len(nets)} NICs: PCI bus 0 has room for {PCI_DEVICE_SLOTS}")
    seen: dict[tuple[int, int], object] = {}
    for disk in disks:
        info = os.stat(disk.path)
        key = (info.st_dev, info.st_ino)
        other = seen.get(key)
        if other is not None and not (disk.readonly and other.readonly):
            raise ConfigError(f"--disk {disk.path}: the same file as --disk {other.path}; "
                              "two disks may share a file only if both are readonly")
        seen[key] = disk
    macs: dict[bytes, int] = {}
    paths: set[str] = set()
    for index, net in enumerate(nets):
        mac = parse_mac(net.mac) if net.mac else default_mac(index)
        if mac in macs:
            raise ConfigError(f"--net: NICs {macs[mac] + 1} and {index + 1} have the same MAC {mac.hex(':')}")
        macs[mac] = index
        if net.kind == "socket":
            path = os.path.abspath(net.target)
            if path in paths:
                raise ConfigError(f"--net socket:{net.target}: two NICs cannot bind one socket")
            paths.add(path)


def check_standby_memory(size: int) -> None:
    available = host_memory("MemAvailable")
    if size > available:
        raise ConfigError(f"--mem {size >> 20}M: a standby keeps all guest RAM resident, "
                          f"and this host has {available >> 20} MiB available")


def resolve_client_path(text: str) -> str:
    """A path the user typed for the VMM to use: absolute, as this shell means it (the VMM's
    working directory may be another)."""
    return os.path.abspath(_plain_path(text, "a path"))


def check_cache_dir() -> None:
    """PYKVM_CACHE, when set, must name a directory (or nothing yet)."""
    cache = os.environ.get("PYKVM_CACHE")
    if cache is not None:
        path = Path(cache) if cache else None
        if path is None or (path.exists() and not path.is_dir()):
            raise ConfigError(f"PYKVM_CACHE={cache!r}: not a directory")
