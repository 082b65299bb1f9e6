"""The VMM's own memory: the resident set of a `pykvm run` process minus the guest RAM it has
resident, with a small guest (`net-echo`, 64 MiB, one virtio-net NIC on a socket, serial to a
file) idling after boot; and where it goes.

The guest RAM is the mapping whose size is the RAM slot's (one slot below 3 GiB); its resident
pages are the guest's, not the VMM's. The breakdown imports each library alone in a fresh
interpreter and reports what its import adds to the resident set (the interpreter is a bare
`python3 -c pass`); the libraries share some pages, so the parts do not add up exactly.

    python bench/footprint.py [--mem 64M]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIBRARIES = ("numpy", "capstone", "construct", "xxhash", "ssl")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SystemExit(f"no VmRSS for {pid}")


def guest_ram_kib(pid: int, ram_kib: int) -> int:
    """Resident KiB of the mappings the size of guest RAM."""
    resident, size = 0, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        if line.startswith("Size:"):
            size = int(line.split()[1])
        elif line.startswith("Rss:") and size == ram_kib:
            resident += int(line.split()[1])
    return resident


def import_cost_kib(module: str | None) -> int:
    """KiB that importing `module` adds to a fresh interpreter's resident set (None: the bare
    interpreter's whole resident set)."""
    code = ("def rss():\n    return int(open('/proc/self/status').read().split('VmRSS:')[1].split()[0])\n"
            + (f"before = rss()\nimport {module}\nprint(rss() - before)" if module else "print(rss())"))
    return int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def loaded_libraries(pid: int) -> list[str]:
    """Which of LIBRARIES the running VMM has mapped (their compiled parts show in its maps)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    names = {"numpy": "numpy", "capstone": "capstone", "construct": None, "xxhash": "xxhash", "ssl": "_ssl"}
    return [lib for lib, marker in names.items() if marker and marker in maps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mem", default="64M", help="guest RAM (default 64M)")
    args = parser.parse_args()
    ram_kib = int(args.mem[:-1]) << (10 if args.mem[-1] in "Mm" else 20)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-footprint-") as tmp:
        serial = Path(tmp, "serial")
        vmm = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "net-echo", "--mem", args.mem,
                                "--append", "count=0", "--serial", f"file:{serial}",
                                "--net", f"socket:{tmp}/vm.sock"], env=env, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 60
            while not (serial.exists() and b"net-echo: ready" in serial.read_bytes()):
                if time.monotonic() > deadline or vmm.poll() is not None:
                    raise SystemExit(f"net-echo did not get ready: {vmm.stderr.read().decode() if vmm.poll() is not None else ''}")
                time.sleep(0.05)
            time.sleep(0.5)  # let start-up garbage settle; figures only
            total = rss_kib(vmm.pid)
            guest = guest_ram_kib(vmm.pid, ram_kib)
            loaded = loaded_libraries(vmm.pid)
        finally:
            vmm.terminate()
            vmm.wait(10)
    print(f"pykvm run net-echo --mem {args.mem}: RSS {total / 1024:.1f} MiB, guest RAM resident {guest / 1024:.1f} MiB")
    print(f"bare interpreter: {import_cost_kib(None) / 1024:.1f} MiB")
    for lib in LIBRARIES:
        state = "loaded in the VMM" if lib in loaded else "not loaded in the VMM"
        if lib == "construct":  # pure Python, so not in the maps: the image loader imports it
            state = "loaded in the VMM: it reads the guest image"
        print(f"  import {lib:10} {import_cost_kib(lib) / 1024:5.1f} MiB  ({state})")
    print(f"footprint_mib: {(total - guest) / 1024:.1f}")


if __name__ == "__main__":
    main()
