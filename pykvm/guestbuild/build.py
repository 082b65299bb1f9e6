"""Builds the test guests with the system gcc and binutils.

A guest is `runtime/` plus its own directory, linked against `lib/` as an archive, so it carries
only the shared drivers (PCI, virtio, the network stack) it calls.

Images are cached outside the source tree under a hash of the sources, their
directory and the flags, so a second build is a no-op and an edit rebuilds (the
directory: an image's debug information names its sources by absolute path, so
an image built in another checkout, since removed, would leave gdb without them).  Each guest is
compiled into a private temporary directory and renamed into the cache, so
concurrent builds (pytest-xdist, two CLIs) never see half-written files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .catalog import GUESTS

CFLAGS = (
    "-std=gnu11", "-O2", "-g", "-Wall", "-Wextra",  # -g: NAME.elf carries what gdb needs
    "-ffreestanding", "-nostdlib", "-static", "-fno-pic", "-fno-pie", "-no-pie",
    "-mcmodel=small",  # linked at 1 MiB: every address fits in 31 bits
    "-mno-red-zone",  # interrupts at CPL0 push onto the interrupted stack
    "-mgeneral-regs-only",  # interrupt stubs save no SSE/x87 state
    "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
)
LDFLAGS = (
    "-Wl,--build-id=none", "-Wl,-z,max-page-size=0x1000", "-Wl,-z,noexecstack",
    "-Wl,--no-warn-rwx-segments",
)
SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld"}
TOOLS = ("gcc", "ld", "objcopy", "ar")


class ToolchainMissing(Exception):
    """gcc or binutils is not installed."""


class UnknownGuest(KeyError):
    """No guest has this name."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown guest {self.name!r}: known guests are {', '.join(GUESTS)}"


class BuildError(Exception):
    """A compiler or linker command failed; stderr holds its output."""

    def __init__(self, cmd: list[str], stderr: str):
        super().__init__(f"{' '.join(cmd)} failed:\n{stderr}")
        self.stderr = stderr


def source_dir() -> Path:
    """The guest sources: inside an installed wheel, else in the repo checkout."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_guest_sources", package.parent / "guests"):
        if (candidate / "runtime").is_dir():
            return candidate
    raise FileNotFoundError(f"guest sources not found next to {package}")


def cache_dir() -> Path:
    """Where images built from the current sources live (may not exist yet)."""
    if "PYKVM_CACHE" in os.environ:
        root = Path(os.environ["PYKVM_CACHE"])
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(xdg) / "pykvm"
    return root / "guests" / _source_hash()


def _source_hash() -> str:
    src = source_dir()
    digest = hashlib.sha256(str(src).encode() + b"\0")  # where gdb will look for them (-g)
    for path in sorted(p for p in src.rglob("*") if p.suffix in SOURCE_SUFFIXES):
        digest.update(path.relative_to(src).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    return digest.hexdigest()[:16]


def _check_names(names: list[str]) -> None:
    for name in names:
        if name not in GUESTS:
            raise UnknownGuest(name)


def _require_toolchain() -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            raise ToolchainMissing(f"{tool} not found: install it with 'apt-get install gcc binutils'")


def _run(cmd: list[str], log: Callable[[str], object]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(cmd, result.stderr)
    if result.stderr:
        log(result.stderr.rstrip())


def _includes() -> list[str]:
    src = source_dir()
    return [f"-I{src / 'runtime'}", f"-I{src / 'lib'}"]


def _compile_library(tmp: Path, log: Callable[[str], object]) -> Path:
    """lib/*.c as an archive: a guest links only the members it calls (PCI, virtio, the net stack)."""
    objects = []
    for source in sorted((source_dir() / "lib").glob("*.c")):
        objects.append(tmp / f"lib-{source.stem}.o")
        _run(["gcc", *CFLAGS, *_includes(), "-c", str(source), "-o", str(objects[-1])], log)
    archive = tmp / "libguest.a"
    _run(["ar", "rcs", str(archive), *map(str, objects)], log)
    return archive


def _compile(name: str, library: Path, tmp: Path, log: Callable[[str], object]) -> None:
    """NAME.elf is the linked image; NAME.bin its flat multiboot form."""
    src = source_dir()
    runtime = src / "runtime"
    sources = [*sorted(runtime.glob("*.[cS]")), *sorted((src / name).glob("*.[cS]"))]
    elf, bin_ = tmp / f"{name}.elf", tmp / f"{name}.bin"
    _run(["gcc", *CFLAGS, *_includes(), "-T", str(runtime / "link.ld"), *LDFLAGS,
          *map(str, sources), str(library), "-o", str(elf)], log)
    _run(["objcopy", "-O", "binary", str(elf), str(bin_)], log)


def build(names: list[str] | None = None, *, log: Callable[[str], object] = print) -> dict[str, Path]:
    """Builds the named guests (all if None) unless cached; returns name -> NAME.bin."""
    names = list(GUESTS) if names is None else list(names)
    _check_names(names)
    out = cache_dir()
    missing = [n for n in names if not (out / f"{n}.bin").exists()]
    if missing:
        _require_toolchain()
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".build-") as tmp:
            library = _compile_library(Path(tmp), log)
            with ThreadPoolExecutor() as pool:
                list(pool.map(lambda n: _compile(n, library, Path(tmp), log), missing))
            for name in missing:
                # .bin last: its presence means both files are complete.
                for suffix in (".elf", ".bin"):
                    os.replace(Path(tmp) / f"{name}{suffix}", out / f"{name}{suffix}")
                log(f"built guest {name}: {out / name}.bin")
    return {n: out / f"{n}.bin" for n in names}


def _output(name: str, suffix: str, want_build: bool) -> Path:
    _check_names([name])
    if want_build:
        build([name], log=lambda _: None)
    return cache_dir() / f"{name}{suffix}"


def image_path(name: str, *, build: bool = True) -> Path:
    """NAME.bin (multiboot v1, loaded at 1 MiB), built first unless build=False."""
    return _output(name, ".bin", build)


def elf_path(name: str, *, build: bool = True) -> Path:
    """NAME.elf (ELF64 with a 64-bit entry), built first unless build=False."""
    return _output(name, ".elf", build)
