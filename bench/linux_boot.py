"""Linux boot time: pykvm against `qemu-system-x86_64 -enable-kvm`, same kernel, initrd, disk, NIC
and command line, in the same run.

Three moments, measured from the start of each VMM (so QEMU's firmware counts against it, as
pykvm's table writing counts against pykvm): the first byte on the serial console, the root
mount ("VFS: Mounted root"), and IP autoconfiguration ("IP-Config: Complete"). Prints pykvm's
time, QEMU's, and their ratio (goal: <= 1.0x), then pykvm's exits by reason.

Where QEMU cannot boot the kernel (on KVM's PVM backend it stops at the kernel's int3
self-test: see README, "Booting Linux"), prints where it stopped instead of a ratio.

    python bench/linux_boot.py [--cpus N] [--mem 128M] [--timeout S] [--vmlinux]
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm.guestbuild import linux_guest  # noqa: E402
from pykvm.kvm.constants import EXIT_REASON_NAMES  # noqa: E402
from pykvm.machine import Machine, MachineConfig  # noqa: E402
from pykvm.devices.virtio.blk import DiskSpec  # noqa: E402
from pykvm.devices.net_backends import NetSpec  # noqa: E402

MARKERS = {"first line": b"", "IP-Config": b"IP-Config: Complete", "root mount": b"VFS: Mounted root"}
# Like the tests, without netconsole (QEMU's user-mode network has no host socket to send to).
APPEND = linux_guest.default_append(network=True)


class Timeline:
    """Serial output with the time each marker first appeared."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.data = bytearray()
        self.seen: dict[str, float] = {}
        self.done = threading.Event()

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        now = time.monotonic() - self.start
        for name, marker in MARKERS.items():
            if name not in self.seen and marker in self.data:
                self.seen[name] = now
        if len(self.seen) == len(MARKERS):
            self.done.set()

    def last_line(self) -> str:
        lines = [line for line in self.data.decode(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else "(no serial output)"


class ExitCounter:
    """A vCPU trace hook counting exits by kind: port (and which), MMIO, other reasons."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()

    def __call__(self, vcpu, kind: str, **fields) -> None:
        if kind == "io":
            key = f"io {'out' if fields['write'] else 'in'} {fields['port']:#x}"
        elif kind == "mmio":
            key = f"mmio {fields['addr'] & ~0xFFF:#x}"
        else:
            key = EXIT_REASON_NAMES.get(fields["reason"], str(fields["reason"]))
        with self.lock:
            self.counts[key] += 1


def run_pykvm(kernel: Path, guest: linux_guest.LinuxGuest, disk: Path, args: argparse.Namespace, tmp: Path):
    started = time.monotonic()
    timeline = Timeline(started)
    config = MachineConfig(memory=args.mem << 20, cpus=args.cpus, disks=(DiskSpec(str(disk)),),
                           nets=(NetSpec("socket", str(tmp / "net.sock")),))
    counter = ExitCounter()
    with Machine(config, serial_output=timeline.feed) as machine:
        machine.load_linux(kernel, initrd=guest.initramfs, cmdline=APPEND)
        for vcpu in machine.vm.vcpus:
            vcpu.trace = counter
        machine.vm.start()
        timeline.done.wait(args.timeout)
        machine.vm.stop(0, "benchmark over")
        machine.vm.wait(30)
        completed = collections.Counter()
        for vcpu in machine.vm.vcpus:
            completed.update(vcpu.completed_instructions)
    return timeline, counter.counts, completed


def run_qemu(kernel: Path, guest: linux_guest.LinuxGuest, disk: Path, args: argparse.Namespace):
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return None, "qemu-system-x86_64 is not installed"
    # QEMU's default CPU model: `-cpu host` and `-cpu max` fail at once on PVM (MSR 0x10a).
    cmd = [qemu, "-enable-kvm", "-M", "pc", "-smp", str(args.cpus), "-m", f"{args.mem}M",
           "-kernel", str(kernel), "-initrd", str(guest.initramfs), "-append", APPEND,
           "-drive", f"file={disk},if=virtio,format=raw", "-nic", "user,model=virtio-net-pci",
           "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"]
    started = time.monotonic()
    timeline = Timeline(started)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    errors = bytearray()
    readers = [threading.Thread(target=_pump, args=(proc.stdout, timeline.feed), daemon=True),
               threading.Thread(target=_pump, args=(proc.stderr, errors.extend), daemon=True)]
    for reader in readers:
        reader.start()
    finished = threading.Event()
    threading.Thread(target=lambda: (proc.wait(), finished.set()), daemon=True).start()
    deadline = started + args.timeout
    # QEMU pauses the VM on a KVM internal error instead of exiting: watch its stderr for that.
    while (not timeline.done.is_set() and not finished.is_set() and time.monotonic() < deadline
           and b"KVM internal error" not in errors):
        timeline.done.wait(0.2)  # any of the conditions ends the wait; all are checked above
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for reader in readers:
        reader.join(5)
    error_lines = [line for line in errors.decode(errors="replace").splitlines() if line.strip()]
    code = next((line for line in error_lines if line.startswith("Code=")), "")
    reason = next((line for line in error_lines if "KVM internal error" in line), error_lines[0] if error_lines else "")
    return timeline, "; ".join(part for part in (reason, _at_marker(code)) if part)


def _at_marker(code_line: str) -> str:
    """QEMU's `Code=.. <cc> ..` dump: the instruction bytes at RIP are between < and >."""
    if "<" not in code_line:
        return ""
    return "instruction at RIP: " + code_line.split("<", 1)[1].split(">", 1)[0]


def _pump(stream, sink) -> None:
    for chunk in iter(lambda: stream.read1(65536), b""):
        sink(chunk)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=1)
    parser.add_argument("--mem", type=int, default=128, help="MiB (default 128)")
    parser.add_argument("--timeout", type=float, default=180, help="seconds per VMM (default 180)")
    parser.add_argument("--vmlinux", action="store_true", help="boot the ELF vmlinux instead of the bzImage")
    args = parser.parse_args()
    guest = linux_guest.build(log=lambda line: print(line, file=sys.stderr))
    kernel = guest.vmlinux if args.vmlinux else guest.bzimage
    print(f"kernel {kernel} ({kernel.stat().st_size >> 10} KiB), {args.cpus} vCPU(s), {args.mem} MiB")
    print(f"command line: {APPEND}")
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for name in ("pykvm.ext4", "qemu.ext4"):
            shutil.copyfile(guest.rootfs, tmp / name)
        ours, exits, completed = run_pykvm(kernel, guest, tmp / "pykvm.ext4", args, tmp)
        if args.vmlinux:
            theirs, qemu_error = None, "QEMU's -kernel takes no vmlinux ELF; compare with the bzImage"
        else:
            theirs, qemu_error = run_qemu(kernel, guest, tmp / "qemu.ext4", args)

    print(f"\n{'':<12} {'pykvm':>9} {'QEMU':>9}  ratio")
    for name in MARKERS:
        mine = ours.seen.get(name)
        other = theirs.seen.get(name) if theirs is not None else None
        ratio = f"{mine / other:5.2f}x" if mine is not None and other is not None else "  -"
        print(f"{name:<12} {_seconds(mine)} {_seconds(other)}  {ratio}")
    if theirs is None or len(theirs.seen) < len(MARKERS):
        where = theirs.last_line() if theirs is not None else "-"
        print(f"\nQEMU did not get through the boot: {qemu_error or 'timed out'}")
        print(f"  last serial line: {where}")
    if len(ours.seen) < len(MARKERS):
        print(f"\npykvm did not get through the boot in {args.timeout:.0f} s; last serial line: {ours.last_line()}")
    total = sum(exits.values())
    print(f"\npykvm exits until the last marker (or the timeout): {total}")
    for key, count in exits.most_common(12):
        print(f"  {key:<28} {count:>8}")
    if completed:
        print("instructions completed for the backend (KVM_EXIT_INTERNAL_ERROR): "
              + ", ".join(f"{name} x{count}" for name, count in completed.items()))
    return 0


def _seconds(value: float | None) -> str:
    return f"{value:8.1f}s" if value is not None else f"{'-':>9}"


if __name__ == "__main__":
    sys.exit(main())
