"""The bundled Linux guest: a small kernel from Debian's linux-source-6.1, an initramfs and a root disk.

`pykvm guests build linux` (and the first `pykvm run linux`) does:

1. Makes sure /usr/src/linux-source-6.1.tar.xz and the build tools are there, installing the
   Debian packages with apt-get when missing (as root), or says which command would.
2. Unpacks the source into a scratch directory next to the cache, configures it with
   `make tinyconfig` plus guests/linux/pykvm.config, checks that every option of the fragment
   survived `make olddefconfig` (Kconfig drops options whose dependencies are missing, silently),
   and runs `make bzImage` on every core, showing how many files are compiled.
3. Writes the initramfs, a newc cpio built here: busybox (static) with its applet links and
   /dev/console. It has no /init, on purpose: the kernel then mounts root= itself (ext4 on
   /dev/vda) and runs /sbin/init from there, so the root mount is the kernel's own work and
   happens even where user space cannot run (see README, "Booting Linux"). `rdinit=/bin/sh`
   gives a shell in the initramfs instead.
4. Makes the root file system image with `mkfs.ext4 -d`: busybox and an /sbin/init that mounts
   /proc and /sys, prints a marker line and powers the VM off (after `pykvm.hold=N` seconds if
   the kernel command line says so).

The results go to $PYKVM_CACHE/linux/HASH (default ~/.cache/pykvm), HASH covering the fragment,
the init script, the source package's and busybox's versions and this builder's; a second build
finds them and returns at once. The scratch tree is deleted afterwards.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .build import BuildError, ToolchainMissing, source_dir

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
BUSYBOX = Path("/bin/busybox")
# Debian packages the build needs besides the source, busybox-static and libelf-dev: by command.
TOOLS = {"make": "make", "gcc": "gcc", "flex": "flex", "bison": "bison", "bc": "bc", "xz": "xz-utils",
         "mkfs.ext4": "e2fsprogs"}
BUILDER_VERSION = "1"  # bump when the steps below change what they produce
ROOTFS_SIZE = "16M"

# Busybox applets linked in the initramfs and the root file system.
APPLETS = ("sh", "mount", "umount", "echo", "cat", "ls", "mkdir", "poweroff", "reboot", "ip", "ping",
           "ifconfig", "sleep", "dmesg", "uname", "sync", "halt", "grep")

INIT_SCRIPT = """#!/bin/sh
# /sbin/init of pykvm's bundled Linux root disk: prove user space runs, then power off.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "pykvm-linux: user space up on $(uname -r)"
echo "pykvm-linux: root: $(grep ' / ' /proc/mounts)"
# pykvm.hold=N on the kernel command line: stay up N seconds first (tests ping the guest meanwhile)
for arg in $(cat /proc/cmdline); do
    case "$arg" in pykvm.hold=*) sleep "${arg#pykvm.hold=}" ;; esac
done
sync
poweroff -f
"""

USERSPACE_MARKER = b"pykvm-linux: user space up"

# The command line `pykvm run linux` starts with (the user's --append goes after it):
#   console=ttyS0      kernel messages on COM1
#   root=/dev/vda rw   the first --disk (the bundled root image by default), mounted read-write
#   panic=-1           reboot at once on a panic, so the VMM exits instead of hanging
# and for this project's machines, whose KVM backend (PVM) emulates guest ring 0 with an
# instruction emulator that lacks some instructions, and passes the host's CPUID through to
# the guest (pykvm itself knows nothing of this; on hardware KVM these options only cost a
# little speed, and can be dropped):
#   noxsave                  XSAVE/XRSTOR: the emulator cannot execute them
#   clearcpuid=popcnt,smap   POPCNT, and CLAC/STAC (SMAP): neither can it
#   nopv                     the CPUID leaves the guest sees advertise the outer hypervisor's
#                            KVM PV features (PV IPIs hang a second vCPU here); use none
DEFAULT_APPEND = "console=ttyS0 root=/dev/vda rw panic=-1 noxsave clearcpuid=popcnt,smap nopv"
# Added when the guest has a NIC: the address the other pykvm guests use, the host at 10.0.2.2.
DEFAULT_IP = "ip=10.0.2.15::10.0.2.2:255.255.255.0::eth0:off"


def default_append(*, network: bool, extra: str = "") -> str:
    return " ".join(part for part in (DEFAULT_APPEND, DEFAULT_IP if network else "", extra) if part)


@dataclass(frozen=True)
class LinuxGuest:
    """The built artifacts."""

    directory: Path
    bzimage: Path
    vmlinux: Path
    initramfs: Path
    rootfs: Path  # the pristine root image; boots use a copy (see disk())
    config: Path

    def disk(self) -> Path:
        """The writable root disk `pykvm run linux` uses: a copy of the pristine image, made on
        first use and kept (it is the guest's disk: what the guest writes stays)."""
        disk = self.directory / "disk.ext4"
        if not disk.exists():
            tmp = disk.with_suffix(".tmp")
            shutil.copyfile(self.rootfs, tmp)
            os.replace(tmp, disk)
        return disk


def fragment() -> Path:
    return source_dir() / "linux" / "pykvm.config"


def _cache_root() -> Path:
    if "PYKVM_CACHE" in os.environ:
        return Path(os.environ["PYKVM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "pykvm"


def _package_version(package: str) -> str | None:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def _key() -> str:
    digest = hashlib.sha256()
    versions = [_package_version(package) or "" for package in (SOURCE_PACKAGE, "busybox-static")]
    for part in (fragment().read_text(), INIT_SCRIPT, " ".join(APPLETS), BUILDER_VERSION, *versions):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def _artifacts(directory: Path) -> LinuxGuest:
    return LinuxGuest(directory, directory / "bzImage", directory / "vmlinux", directory / "initramfs.cpio",
                      directory / "rootfs.ext4", directory / "config")


def build(*, log: Callable[[str], object] = print, jobs: int | None = None) -> LinuxGuest:
    """Build the kernel, initramfs and root image unless cached; returns where they are."""
    _ensure_packages(log)
    out = _cache_root() / "linux" / _key()
    guest = _artifacts(out)
    if guest.rootfs.exists():  # written last: its presence means everything is there
        return guest
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as scratch_name:
        scratch = Path(scratch_name)
        staging = scratch / "out"
        staging.mkdir()
        tree = _unpack(scratch, log)
        _configure(tree, staging / "config", log)
        _make(tree, jobs or os.cpu_count() or 1, log)
        shutil.copyfile(tree / "arch/x86/boot/bzImage", staging / "bzImage")
        shutil.copyfile(tree / "vmlinux", staging / "vmlinux")
        shutil.rmtree(tree)  # ~1 GiB of objects; a rebuild starts from the tarball again
        (staging / "initramfs.cpio").write_bytes(initramfs())
        _rootfs(scratch, staging / "rootfs.ext4", log)
        out.mkdir(exist_ok=True)
        for name in ("config", "bzImage", "vmlinux", "initramfs.cpio", "rootfs.ext4"):
            os.replace(staging / name, out / name)
    log(f"linux: built in {time.monotonic() - started:.0f} s: {out}")
    return guest


# -- steps ---------------------------------------------------------------------------------------------


def _ensure_packages(log: Callable[[str], object]) -> None:
    missing = [package for tool, package in TOOLS.items() if shutil.which(tool) is None]
    if not SOURCE_TARBALL.exists():
        missing.append(SOURCE_PACKAGE)
    if not BUSYBOX.exists():
        missing.append("busybox-static")
    if not Path("/usr/include/gelf.h").exists():
        missing.append("libelf-dev")  # objtool, which the kernel build runs, needs it
    if not Path("/usr/include/stdio.h").exists():
        missing.append("libc6-dev")  # the build's host programs (kconfig, fixdep)
    if not missing:
        return
    missing = sorted(set(missing))
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ToolchainMissing(f"building the Linux guest needs {', '.join(missing)}: "
                               f"install them with 'apt-get install {' '.join(missing)}' (as root)")
    log(f"linux: installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:  # perhaps stale package lists: refresh them once and retry
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ToolchainMissing(f"apt-get could not install {' '.join(missing)}: {tail[0]}")


def _unpack(scratch: Path, log: Callable[[str], object]) -> Path:
    log(f"linux: unpacking {SOURCE_TARBALL}")
    _run(["tar", "-xf", str(SOURCE_TARBALL), "-C", str(scratch)], scratch)  # tar is ~5x faster than tarfile
    trees = [p for p in scratch.iterdir() if p.name.startswith("linux-source")]
    if len(trees) != 1:
        raise BuildError(["tar", "xf", str(SOURCE_TARBALL)], f"expected one linux-source directory, found {trees}")
    return trees[0]


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(cmd, (result.stderr or result.stdout)[-4000:])


_OPTION = re.compile(r"^(CONFIG_[A-Z0-9_]+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_[A-Z0-9_]+) is not set$")


def _options(text: str) -> dict[str, str | None]:
    """Option -> value (None: explicitly not set) of a .config or a fragment."""
    options: dict[str, str | None] = {}
    for line in text.splitlines():
        if match := _OPTION.match(line.strip()):
            options[match.group(1)] = match.group(2)
        elif match := _UNSET.match(line.strip()):
            options[match.group(1)] = None
    return options


def _configure(tree: Path, saved: Path, log: Callable[[str], object]) -> None:
    log(f"linux: configuring: tinyconfig + {fragment()}")
    _run(["make", "tinyconfig"], tree)
    _run(["scripts/kconfig/merge_config.sh", "-m", ".config", str(fragment())], tree)
    _run(["make", "olddefconfig"], tree)
    wanted = _options(fragment().read_text())
    got = _options((tree / ".config").read_text())
    lost = [f"{name}={value or 'n'} (got {got.get(name) or 'n'})" for name, value in wanted.items()
            if got.get(name) != value]
    if lost:
        raise BuildError(["make", "olddefconfig"], "options of the fragment did not survive (missing "
                         "dependencies?): " + ", ".join(lost))
    shutil.copyfile(tree / ".config", saved)


def _make(tree: Path, jobs: int, log: Callable[[str], object]) -> None:
    """make bzImage, printing a running count of compiled files (one updating line on a terminal,
    a line every 250 files otherwise) and the tail of the output if it fails."""
    log(f"linux: compiling with {jobs} jobs (about 3 minutes on 2 cores)")
    cmd = ["make", f"-j{jobs}", "bzImage"]
    tty = sys.stderr.isatty()
    compiled, tail = 0, []
    with subprocess.Popen(cmd, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as make:
        assert make.stdout is not None
        for line in make.stdout:
            tail = (tail + [line])[-40:]
            if line.startswith("  CC ") or line.startswith("  AS "):
                compiled += 1
                if tty:
                    print(f"\rlinux: {compiled} files compiled: {line.split()[-1][:50]:<50}", end="",
                          file=sys.stderr, flush=True)
                elif compiled % 250 == 0:
                    log(f"linux: {compiled} files compiled")
        status = make.wait()
    if tty:
        print(file=sys.stderr)
    if status != 0:
        raise BuildError(cmd, "".join(tail))
    log(f"linux: {compiled} files compiled, bzImage linked")


# -- initramfs and root file system ----------------------------------------------------------------------


def _cpio_entry(name: str, mode: int, data: bytes = b"", *, ino: int, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc ("070701") entry: header, NUL-terminated name and data, each padded to 4 bytes."""
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
    pad = lambda n: b"\0" * (-n % 4)  # noqa: E731
    return header + encoded + pad(len(header) + len(encoded)) + data + pad(len(data))


def initramfs() -> bytes:
    """busybox, its applet links, /dev/console; no /init (see the module docstring)."""
    entries, ino = [], 1

    def add(name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        nonlocal ino
        entries.append(_cpio_entry(name, mode, data, ino=ino, rdev=rdev))
        ino += 1

    for directory in ("bin", "dev", "proc", "sys", "root", "mnt", "tmp"):
        add(directory, stat.S_IFDIR | 0o755)
    add("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))
    add("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes())
    for applet in APPLETS:
        add(f"bin/{applet}", stat.S_IFLNK | 0o777, b"busybox")
    add("TRAILER!!!", 0)
    return b"".join(entries)


def _rootfs(scratch: Path, image: Path, log: Callable[[str], object]) -> None:
    root = scratch / "rootfs"
    for directory in ("bin", "sbin", "dev", "proc", "sys", "etc", "root", "tmp", "mnt"):
        (root / directory).mkdir(parents=True)
    shutil.copyfile(BUSYBOX, root / "bin/busybox")
    (root / "bin/busybox").chmod(0o755)
    for applet in APPLETS:
        (root / "bin" / applet).symlink_to("busybox")
    init = root / "sbin/init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (root / "etc/hostname").write_text("pykvm\n")
    log(f"linux: making the root file system ({ROOTFS_SIZE}, ext4)")
    _run(["mkfs.ext4", "-q", "-F", "-L", "pykvm-root", "-d", str(root), str(image), ROOTFS_SIZE], scratch)
