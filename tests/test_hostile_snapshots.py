"""Snapshot files whose checksums are all right but whose contents are hostile or nonsense (a
crafted file, or one written by something else): `pykvm restore` refuses each with one line and
exit status 2 before it reads, allocates or opens what the file claims, and runs nothing."""

from __future__ import annotations

import json
import os
import zlib

import pytest

from pykvm.machine import Machine, MachineConfig
from pykvm.transfer import snapshot
from tests.conftest import requires_kvm, run_pykvm

pytestmark = requires_kvm


@pytest.fixture
def hello_snapshot(tmp_path, guest_images) -> str:
    """A snapshot of `hello` loaded and not yet run (restoring it prints its greeting)."""
    path = str(tmp_path / "hello.snap")
    with Machine(MachineConfig(), serial_output=lambda data: None) as machine:
        machine.load(guest_images["hello"])
        with machine.quiesced():
            snapshot.save(machine, path)
    return path


def _table(path: str) -> list[dict]:
    with open(path, "rb") as f:
        header = snapshot.Header.parse(f.read(snapshot.Header.sizeof()))
        entries = [snapshot.SectionEntry.parse(f.read(snapshot.SectionEntry.sizeof())) for _ in range(header.sections)]
    return [{key: entry[key] for key in ("kind", "index", "offset", "length", "checksum", "reserved")}
            for entry in entries]


def _write_table(path: str, entries: list[dict]) -> None:
    """The section table, and the header's checksum over it, as a writer would make them."""
    table = b"".join(snapshot.SectionEntry.build(entry) for entry in entries)
    header = dict(version=snapshot.VERSION, sections=len(entries), checksum=0, reserved=bytes(12))
    header["checksum"] = zlib.crc32(snapshot.Header.build(header) + table)
    with open(path, "r+b") as f:
        f.write(snapshot.Header.build(header) + table)


def _rewrite_config(path: str, change) -> list[dict]:
    """The CONFIG section replaced by `change`(its JSON), appended, with a valid checksum."""
    entries = _table(path)
    config = next(entry for entry in entries if entry["kind"] == snapshot.SectionKind.CONFIG)
    with open(path, "rb") as f:
        f.seek(config["offset"])
        plain = json.loads(f.read(config["length"]))
    change(plain)
    blob = json.dumps(plain).encode()
    end = os.path.getsize(path)
    with open(path, "ab") as f:
        f.write(blob)
    config.update(offset=end, length=len(blob), checksum=zlib.crc32(blob))
    _write_table(path, entries)
    return entries


def _refused(path: str, *fragments: str) -> None:
    result = run_pykvm("restore", path, timeout=60)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert err.startswith("pykvm: error: ") and err.count("\n") == 1, err
    assert result.stdout == b""  # the guest never ran
    for fragment in fragments:
        assert fragment in err, err


def test_the_crafted_file_restores_when_left_alone(hello_snapshot):
    """The rewriting below keeps a snapshot whole: what is refused is what was changed."""
    _rewrite_config(hello_snapshot, lambda config: None)
    result = run_pykvm("restore", hello_snapshot, timeout=60)
    assert result.returncode == 0 and b"Hello from pykvm guest!" in result.stdout, result.stderr


def test_a_state_section_claiming_64_gib_is_refused_before_it_is_read(hello_snapshot):
    """A sparse file may claim a section of any length and still fit in it: reading it whole
    was a MemoryError traceback (or, below the host's RAM, that much allocated and read)."""
    entries = _table(hello_snapshot)
    state = next(entry for entry in entries if entry["kind"] == snapshot.SectionKind.STATE)
    end = os.path.getsize(hello_snapshot)
    state.update(offset=end, length=64 << 30)
    _write_table(hello_snapshot, entries)
    os.truncate(hello_snapshot, end + (64 << 30))
    _refused(hello_snapshot, "state section of 68719476736 bytes", f"limit is {snapshot.STATE_LIMIT}")


@pytest.mark.parametrize("memory", [0, 5])
def test_a_ram_size_that_is_not_whole_pages_is_refused(hello_snapshot, memory):
    """Its one RAM section as long as it says: the layout matched, and building the RAM raised
    a ValueError traceback."""
    entries = _rewrite_config(hello_snapshot, lambda config: config.update(memory=memory))
    for entry in entries:
        if entry["kind"] == snapshot.SectionKind.MEMORY:
            entry["length"] = memory
    _write_table(hello_snapshot, entries)
    _refused(hello_snapshot, f"RAM size {memory} is not a positive multiple of 4096")


def _disk(path: str) -> dict:
    return {"disks": [{"path": path, "readonly": False}]}


def _nic(target: str, kind: str = "socket", mac: str | None = None) -> dict:
    return {"nets": [{"kind": kind, "target": target, "peer": None, "mac": mac}]}


@pytest.mark.parametrize("saved, fragment", [
    (_disk("disk\0.img"), "cannot hold a NUL byte"),  # was a ValueError traceback from os.open
    (_disk("{fifo}"), "is a FIFO, not a disk image"),  # was opened read-write, then an OSError traceback
    (_disk("{dir}"), "is a directory, not a disk image"),
    (_nic("{dir}/link\0.sock"), "cannot hold a NUL byte"),  # was a ValueError traceback from os.stat
    (_nic("{dir}/bogus.sock", kind="bogus"), "expected tap:NAME or socket:PATH"),  # was taken for a socket
    (_nic("t" * 40, kind="tap"), "at most 15 characters"),
    (_nic("{dir}/link.sock", mac="00:00:00:00:00:00"), "is all zeros"),
])
def test_saved_backends_are_checked_as_the_options_are(hello_snapshot, tmp_path, saved, fragment):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for items in saved.values():
        for item in items:
            key = "path" if "path" in item else "target"
            item[key] = item[key].format(fifo=fifo, dir=tmp_path)
    _rewrite_config(hello_snapshot, lambda config: config.update(saved))
    _refused(hello_snapshot, "its saved backends", fragment, "--disk and --net give others")
    assert not (tmp_path / "link.sock").exists()  # nothing was bound
