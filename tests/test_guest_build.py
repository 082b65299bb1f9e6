"""The guest build driver: images build, are cached, and honour the boot contract."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pykvm.guestbuild import GUESTS, UnknownGuest, build, cache_dir, elf_path, image_path

pytestmark = pytest.mark.nokvm

REPO = Path(__file__).resolve().parent.parent
LOAD_ADDR = 0x100000
MB_MAGIC = 0x1BADB002
MB_FLAGS = (1 << 1) | (1 << 16)
PT_LOAD = 1
PF_X = 1


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYKVM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def images(cache):
    return build(log=lambda _: None)


def test_builds_every_guest_once(images):
    assert list(images) == list(GUESTS)
    for name, path in images.items():
        assert path == image_path(name, build=False) == cache_dir() / f"{name}.bin"
        assert path.is_file() and elf_path(name, build=False).is_file()

    outputs = [p for name in GUESTS for p in (image_path(name, build=False), elf_path(name, build=False))]
    mtimes = [p.stat().st_mtime_ns for p in outputs]
    logged = []
    assert build(log=logged.append) == images
    assert [p.stat().st_mtime_ns for p in outputs] == mtimes
    assert logged == []


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.delenv("PYKVM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir().parent == tmp_path / "pykvm" / "guests"
    assert len(cache_dir().name) == 16
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir().parent == tmp_path / "elsewhere" / "guests"


def multiboot_header(image: bytes) -> tuple[int, tuple[int, ...]]:
    for offset in range(0, 8192, 4):
        if struct.unpack_from("<I", image, offset)[0] == MB_MAGIC:
            return offset, struct.unpack_from("<8I", image, offset)
    raise AssertionError("no multiboot header in the first 8 KiB")


@pytest.mark.parametrize("name", GUESTS)
def test_multiboot_header(images, name):
    image = images[name].read_bytes()
    offset, (magic, flags, checksum, header, load, load_end, bss_end, entry) = multiboot_header(image)
    assert (magic + flags + checksum) & 0xFFFFFFFF == 0
    assert flags == MB_FLAGS
    assert load == LOAD_ADDR
    assert header - load == offset
    assert load_end - load == len(image)
    assert bss_end >= load_end
    assert load <= entry < load_end


@pytest.mark.parametrize("name", GUESTS)
def test_elf_matches_the_flat_image(images, name):
    elf = elf_path(name, build=False).read_bytes()
    assert elf[:4] == b"\x7fELF" and elf[4] == 2  # ELFCLASS64
    (e_machine,) = struct.unpack_from("<H", elf, 18)
    e_entry, e_phoff = struct.unpack_from("<QQ", elf, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 54)
    assert e_machine == 0x3E  # x86-64

    image = images[name].read_bytes()
    loads = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", elf, e_phoff + i * e_phentsize
        )
        if p_type == PT_LOAD:
            loads.append((p_flags, p_vaddr, p_filesz, p_memsz))
            assert p_paddr == p_vaddr >= LOAD_ADDR
            start = p_vaddr - LOAD_ADDR
            assert image[start : start + p_filesz] == elf[p_offset : p_offset + p_filesz]
    assert min(vaddr for _, vaddr, _, _ in loads) == LOAD_ADDR
    assert any(flags & PF_X and vaddr <= e_entry < vaddr + filesz for flags, vaddr, filesz, _ in loads)


def test_unknown_guest(cache):
    with pytest.raises(UnknownGuest) as excinfo:
        build(["hello", "no-such-guest"])
    assert isinstance(excinfo.value, KeyError)
    assert "no-such-guest" in str(excinfo.value) and "hello" in str(excinfo.value)
    with pytest.raises(UnknownGuest):
        image_path("no-such-guest")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_toolchain_missing_names_the_package(tmp_path):
    code = (
        "from pykvm.guestbuild import ToolchainMissing, build\n"
        "try:\n"
        "    build(['hello'])\n"
        "except ToolchainMissing as e:\n"
        "    print('missing:', e)\n"
    )
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_python(code, PATH=str(empty), PYKVM_CACHE=str(tmp_path / "cache"))
    assert result.returncode == 0, result.stderr
    assert "missing: gcc not found: install it with 'apt-get install gcc binutils'" in result.stdout


def test_concurrent_builds(tmp_path):
    env = {"PYKVM_CACHE": str(tmp_path)}
    code = "from pykvm.guestbuild import build; build()"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO), **env},
            stdout=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    run = run_python("from pykvm.guestbuild import build; print(sorted(p.name for p in build().values()))", **env)
    assert run.stdout.strip() == str(sorted(f"{n}.bin" for n in GUESTS))
    assert not list(tmp_path.glob("guests/.build-*"))
