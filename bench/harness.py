"""What the benchmarks share. bench/blk.py and bench/net.py: a guest under QEMU (KVM) as the
reference, KVM's own exit counters for a vCPU of either VMM, the CPU time a VMM spends outside its
guest, the configurations compared, and the figures' table rows and summary lines. The FT
benchmarks (bench/ft*.py): a free loopback port and a pykvm process whose stderr lines are waited on.

KVM counts every exit of a vCPU, also those it handles itself (an ioeventfd notify, an interrupt
window), in its binary statistics (`KVM_GET_STATS_FD`, the `exits` counter). pykvm's vCPUs are in
this process, so the fd is read directly; QEMU reads the same counters for us (QMP `query-stats`,
QEMU 7.1 and later). The exits that reach pykvm's Python loop are `Vcpu.exit_count`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

QEMU = shutil.which("qemu-system-x86_64")
KVM_GET_STATS_FD = 0xAE << 8 | 0xCE  # _IO(KVMIO, 0xce), on a VM or vCPU fd
_STATS_HEADER = struct.Struct("<6I")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_STATS_DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size; then the name

CONFIGS = ("qemu", "pykvm-exit", "pykvm-ioeventfd")
LABELS = {"qemu": "QEMU (KVM)", "pykvm-exit": "pykvm, Python exit", "pykvm-ioeventfd": "pykvm, ioeventfd"}


def mark_default_config(device: type) -> None:
    """Adds " (default)" to the label of the pykvm configuration `device` (Blk, Net) uses by default."""
    from pykvm.machine import MachineConfig, ioeventfd_for  # here: net.py's client process never needs it

    LABELS["pykvm-ioeventfd" if ioeventfd_for(MachineConfig(), device) else "pykvm-exit"] += " (default)"


class KvmStats:
    """KVM's binary statistics of one fd (here a vCPU's): read() -> {name: first value}."""

    def __init__(self, vcpu_fd: int) -> None:
        self.fd = fcntl.ioctl(vcpu_fd, KVM_GET_STATS_FD, 0)
        _, name_size, count, _, desc_offset, self._data_offset = _STATS_HEADER.unpack(os.pread(self.fd, 24, 0))
        size = _STATS_DESC.size + name_size
        raw = os.pread(self.fd, size * count, desc_offset)
        self._offsets: dict[str, int] = {}
        self._data_size = 0
        for i in range(count):
            _, _, length, offset, _ = _STATS_DESC.unpack_from(raw, i * size)
            name = raw[i * size + _STATS_DESC.size : (i + 1) * size].split(b"\0")[0].decode()
            self._offsets[name] = offset
            self._data_size = max(self._data_size, offset + 8 * length)

    def read(self) -> dict[str, int]:
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return {name: struct.unpack_from("<Q", data, offset)[0] for name, offset in self._offsets.items()}

    def exits(self) -> int:
        data = os.pread(self.fd, 8, self._data_offset + self._offsets["exits"])
        return struct.unpack("<Q", data)[0]

    def close(self) -> None:
        os.close(self.fd)


_TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def vmm_cpu_ns(pid: int, is_vcpu: Callable[[int, str], bool]) -> int:
    """CPU time so far (ns) that process `pid` spent outside its guest: its threads but the vCPUs
    (from /proc/PID/task/*/schedstat, exact), plus what its vCPU threads spent outside guest mode
    (user + system - guest time from /proc/PID/task/*/stat, sampled at the clock tick: the
    handling of exits, in the kernel or in the VMM, and the device work pykvm does during them).
    Threads that have exited no longer count."""
    total = 0
    for entry in os.scandir(f"/proc/{pid}/task"):
        try:
            name = Path(entry.path, "comm").read_text().strip()
            if is_vcpu(int(entry.name), name):
                fields = Path(entry.path, "stat").read_text().rsplit(")", 1)[1].split()
                utime, stime, guest = int(fields[11]), int(fields[12]), int(fields[40])
                total += max(utime + stime - guest, 0) * _TICK_NS
            else:
                total += int(Path(entry.path, "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def pykvm_cpu_ns(machine) -> int:
    """vmm_cpu_ns of this process, whose vCPU threads are the machine's."""
    vcpus = {vcpu.thread.native_id for vcpu in machine.vm.vcpus if vcpu.thread is not None}
    return vmm_cpu_ns(os.getpid(), lambda tid, name: tid in vcpus)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


_CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}


class Child:
    """A pykvm process; stderr lines kept so we can wait for one."""

    def __init__(self, *args: str) -> None:
        self.lines: list[str] = []
        self.cond = threading.Condition()
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", *args], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_CHILD_ENV)
        self.out = bytearray()
        threading.Thread(target=self._read, args=(self.proc.stderr, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, False), daemon=True).start()

    def _read(self, stream, is_err: bool) -> None:
        for raw in stream:
            with self.cond:
                if is_err:
                    self.lines.append(raw.decode(errors="replace").rstrip())
                else:
                    self.out += raw
                self.cond.notify_all()

    def wait_line(self, text: str, timeout: float = 30) -> str:
        with self.cond:
            if not self.cond.wait_for(lambda: any(text in line for line in self.lines), timeout):
                raise SystemExit(f"never saw {text!r}: {self.lines}")
            return next(line for line in self.lines if text in line)

    def wait_out(self, text: bytes, count: int = 1, timeout: float = 30) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: self.out.count(text) >= count, timeout):
                raise SystemExit(f"never printed {text!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class QemuGuest:
    """A guest under `qemu-system-x86_64 -accel kvm`: its serial lines as they come (each handed to
    `on_line(guest, time, line)` on a reader thread), its vCPU exit count over QMP, its exit status."""

    def __init__(self, image: Path, append: str, devices: list[str], workdir: Path, *,
                 on_line: Callable[[QemuGuest, float, str], None] | None = None, memory_mib: int = 64) -> None:
        if QEMU is None:
            raise SystemExit("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        self._qmp_path = workdir / "qmp.sock"
        self._qmp_path.unlink(missing_ok=True)
        self.stderr_path = workdir / "qemu.stderr"
        self.lines: list[str] = []
        self._on_line = on_line
        self._qmp_lock = threading.Lock()
        with self.stderr_path.open("wb") as stderr:
            self.proc = subprocess.Popen(
                [QEMU, "-accel", "kvm", "-M", "pc", "-m", str(memory_mib), "-nodefaults", "-no-reboot",
                 "-name", "bench,debug-threads=on",  # thread names: the vCPUs are "CPU n/KVM"
                 "-display", "none", "-serial", "stdio", "-monitor", "none",
                 "-qmp", f"unix:{self._qmp_path},server=on,wait=off",
                 "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01", *devices,
                 "-kernel", str(image), "-append", append],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr)
        self._qmp = self._connect_qmp()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _connect_qmp(self):
        deadline = time.monotonic() + 30
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self._qmp_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"QEMU did not start: {self.stderr_path.read_text(errors='replace')}") from None
                time.sleep(0.01)
        qmp = sock.makefile("rw")
        qmp.readline()  # greeting
        self._command(qmp, "qmp_capabilities")
        return qmp

    @staticmethod
    def _command(qmp, name: str, **arguments) -> object:
        qmp.write(json.dumps({"execute": name, "arguments": arguments}) + "\n")
        qmp.flush()
        while True:
            reply = json.loads(qmp.readline())
            if "event" in reply:
                continue
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            return reply["return"]

    def exits(self) -> int | None:
        """KVM's exit count summed over QEMU's vCPUs (None once QEMU is gone)."""
        try:
            with self._qmp_lock:
                vcpus = self._command(self._qmp, "query-stats", target="vcpu",
                                      providers=[{"provider": "kvm", "names": ["exits"]}])
        except (OSError, ValueError):
            return None
        return sum(stat["value"] for vcpu in vcpus for stat in vcpu["stats"] if stat["name"] == "exits")

    def vmm_cpu_ns(self) -> int:
        """vmm_cpu_ns of QEMU (its vCPU threads are named "CPU n/KVM")."""
        return vmm_cpu_ns(self.proc.pid, lambda tid, name: name.startswith("CPU "))

    def _read(self) -> None:
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\r\n")
            self.lines.append(line)
            if self._on_line is not None:
                self._on_line(self, time.perf_counter(), line)

    def wait(self, timeout: float) -> int:
        """The guest's exit status (0, or the status it wrote to port 0xf4)."""
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise SystemExit("QEMU: the guest did not finish:\n" + "\n".join(self.lines)) from None
        self._reader.join(5)
        return code >> 1 if code & 1 else code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            self._qmp.close()
        except OSError:
            pass


class Series:
    """One figure over the rounds of a benchmark."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")

    def spread(self, fmt: str) -> str:
        """'min-max' over the rounds, or '' for a single round."""
        if len(self.values) < 2:
            return ""
        return f"{format(min(self.values), fmt)}-{format(max(self.values), fmt)}"


def ratios(ours: Series, theirs: Series) -> Series:
    """Round-by-round ratios: the runs of one round were back to back, under the same load."""
    out = Series()
    for a, b in zip(ours.values, theirs.values):
        out.add(a / b if b else float("nan"))
    return out


def add_costs(f, result, requests: int) -> None:
    """A run's exits, exits that reached Python and VMM CPU microseconds per request, added to
    `f`'s series where the run knew them (not None)."""
    if result.exits is not None:
        f.exits.add(result.exits / requests)
    if result.py_exits is not None:
        f.py_exits.add(result.py_exits / requests)
    if result.cpu_ns is not None:
        f.cpu_us.add(result.cpu_ns / 1e3 / requests)


def ratio_columns(ours: Series, qemu: Series | None, config: str, worst: dict[str, float]) -> tuple[str, str]:
    """The "vs QEMU" median and spread columns for one configuration (blank for QEMU itself),
    keeping the lowest median per configuration in `worst`."""
    if config == "qemu" or qemu is None:
        return "", ""
    r = ratios(ours, qemu)
    worst[config] = min(worst.get(config, 9.9), r.median)
    return f"{r.median:.2f}", r.spread(".2f")


def cost_columns(f) -> tuple[str, str, str]:
    """Exits, exits that reached Python, and VMM CPU microseconds per request ("n/a" if unknown)."""
    def show(series: Series, fmt: str) -> str:
        return format(series.median, fmt) if series.values else "n/a"

    return show(f.exits, ".2f"), show(f.py_exits, ".2f"), show(f.cpu_us, ".1f")


def table_rows(group: dict, configs: list[str], compared: str, worst: dict[str, float]):
    """One group of the table (a test, a window): for each configuration that ran, its label, its
    figures, the "vs QEMU" columns of its series `compared` (ratio_columns) and its cost columns."""
    qemu = group.get("qemu")
    for config in configs:
        f = group.get(config)
        if f is None:
            continue
        theirs = getattr(qemu, compared) if qemu else None
        yield LABELS[config], f, ratio_columns(getattr(f, compared), theirs, config, worst), cost_columns(f)


def print_lowest_ratios(worst: dict[str, float], configs: list[str], headline: str) -> None:
    """Each configuration's lowest ratio to QEMU, then `headline` (blk_ratio, net_ratio): that of
    the default configuration."""
    for config, value in worst.items():
        print(f"{LABELS[config]}: lowest ratio to QEMU {value:.2f} (goal >= 0.9)")
    default = next((config for config in configs if LABELS[config].endswith("(default)")), None)
    if default in worst:  # the lowest of the groups' medians, with the default notification path
        print(f"{headline}: {worst[default]:.2f}")
