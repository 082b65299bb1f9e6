"""virtio-net UDP echo: requests per second and latency, pykvm against QEMU (KVM), the same guest
image in the same run.

The `net-echo` guest answers UDP datagrams to port 7. A client process (this script with
--client; a process of its own, so that it shares no interpreter lock with pykvm) speaks to it
over a Unix datagram socket carrying one Ethernet frame per datagram: pykvm's `--net socket:`,
QEMU's `-netdev dgram`. It keeps a window of requests outstanding (1, then 8), each answered
request replaced by a new one, for --seconds per window after a warm-up, and reports requests
per second and the median and 99th percentile of the round-trip times it saw; a request not
answered within 0.25 s counts as lost (the client then refills its window).

Why 8 and not 16: a Unix datagram socket queues at most net.unix.max_dgram_qlen (10) datagrams
for its reader. With more echoes outstanding than that, a client that falls behind makes the
VMM's send fail with EAGAIN, and there pykvm drops the frame (as a full wire would) while QEMU
holds it and stops its transmit queue until the socket drains; the figures would then measure
that policy and the client's 0.25 s loss timeout, not the device.

Each round runs QEMU, pykvm with queue notifications as exits to Python that serve the queue on
the vCPU thread (`MachineConfig(ioeventfd=False)`) and pykvm with KVM ioeventfds that wake the
device's I/O thread (`ioeventfd=True`, virtio-net's default), in an order that rotates; received
frames go through pykvm's I/O thread either way. Figures are
medians over the rounds with their min-max, and a ratio is pykvm / QEMU, the median of the
rounds' ratios.

Exits per request: KVM's count of every exit of the vCPU (pykvm: read in-process from KVM's
statistics fd; QEMU: QMP query-stats) and the exits that reached pykvm's Python loop, from
before the client starts to after it is done, divided by the echoes it got (warm-up included);
the guest idles in between. VMM CPU per request: the CPU time the VMM spent outside the guest
over the same span (see bench/blk.py; the client's is not in it).

    python bench/net.py [--rounds N] [--seconds S] [--size BYTES] [--windows 1,8] [--append ARGS]
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import (  # noqa: E402
    CONFIGS, LABELS, KvmStats, QemuGuest, Series, add_costs, mark_default_config, print_lowest_ratios, pykvm_cpu_ns,
    table_rows,
)
from pykvm.stats import percentile  # noqa: E402

GUEST_MAC, GUEST_IP = "52:54:00:12:34:56", "10.0.2.15"
HOST_MAC, HOST_IP = "52:54:00:00:00:02", "10.0.2.2"
ECHO_PORT, CLIENT_PORT = 7, 40000
PAYLOAD_AT = 14 + 20 + 8  # Ethernet, IPv4 (no options), UDP
WARMUP = 300


# -- the client (a process of its own) ------------------------------------------------------------

def client(path: str, peer: str, window: int, seconds: float, size: int) -> dict:
    """Echo requests with `window` outstanding; the first WARMUP are not timed."""
    from pykvm.testing.netframes import FrameSocket, Peer, udp_frame

    with FrameSocket(path, peer) as link:
        Peer(link, GUEST_IP, mac=HOST_MAC, ip=HOST_IP).resolve()
        template = bytearray(udp_frame(HOST_MAC, GUEST_MAC, HOST_IP, GUEST_IP, CLIENT_PORT, ECHO_PORT,
                                       bytes(max(size, 8)), with_checksum=False))  # UDP checksum 0: none
        sock = link.sock
        sock.settimeout(0.25)
        send, recv = sock.sendto, sock.recv
        sent_at: dict[int, float] = {}
        latencies: list[float] = []
        seq = echoes = lost = 0
        timed_from = timed_to = None
        timed_start_seq = None
        deadline = None

        def send_next() -> None:
            nonlocal seq
            struct.pack_into("<Q", template, PAYLOAD_AT, seq)
            sent_at[seq] = time.perf_counter()
            send(template, peer)
            seq += 1

        for _ in range(window):
            send_next()
        while sent_at:
            try:
                frame = recv(2048)
            except TimeoutError:  # a frame lost (no rx buffer, a full socket): give up on what is out
                lost += len(sent_at)
                sent_at.clear()
                if deadline is None or time.perf_counter() < deadline:
                    for _ in range(window):
                        send_next()
                continue
            now = time.perf_counter()
            if len(frame) < PAYLOAD_AT + 8 or frame[34:36] != b"\x00\x07" or frame[23] != 17:
                continue  # not an echo (an ARP request from the guest, say)
            answered = struct.unpack_from("<Q", frame, PAYLOAD_AT)[0]
            started = sent_at.pop(answered, None)
            if started is None:
                continue
            echoes += 1
            if timed_start_seq is not None and answered >= timed_start_seq:
                latencies.append(now - started)
                timed_to = now
            if echoes == WARMUP:
                timed_from, timed_start_seq = now, seq
                deadline = now + seconds
            if deadline is None or now < deadline:
                send_next()
    done = len(latencies)
    elapsed = (timed_to - timed_from) if timed_to and timed_from else float("nan")
    return {"window": window, "rate": done / elapsed if done else 0.0, "echoes": echoes, "lost": lost,
            "median_us": statistics.median(latencies) * 1e6 if latencies else float("nan"),
            "p99_us": percentile(latencies, 99) * 1e6 if latencies else float("nan")}


# -- the VMMs -------------------------------------------------------------------------------------

@dataclass
class WindowResult:
    rate: float
    median_us: float
    p99_us: float
    echoes: int
    lost: int
    exits: int | None
    py_exits: int | None
    cpu_ns: int | None


def run_client(workdir: Path, vm_socket: Path, window: int, args) -> dict:
    host_socket = workdir / "host.sock"
    host_socket.unlink(missing_ok=True)
    result = subprocess.run([sys.executable, __file__, "--client", str(host_socket), str(vm_socket), str(window),
                             str(args.seconds), str(args.size)], capture_output=True, text=True,
                            timeout=60 + 2 * args.seconds)
    if result.returncode != 0:
        raise SystemExit(f"the echo client failed:\n{result.stderr}")
    return json.loads(result.stdout)


def measure(workdir: Path, vm_socket: Path, args, counters) -> list[WindowResult]:
    results = []
    for window in args.windows:
        before = counters()
        out = run_client(workdir, vm_socket, window, args)
        after = counters()
        delta = [b - a if None not in (a, b) else None for a, b in zip(before, after)]
        results.append(WindowResult(out["rate"], out["median_us"], out["p99_us"], out["echoes"], out["lost"], *delta))
    return results


def run_qemu(image: Path, workdir: Path, args) -> list[WindowResult]:
    vm_socket, host_socket = workdir / "vm.sock", workdir / "host.sock"
    vm_socket.unlink(missing_ok=True)
    ready = threading.Event()

    def on_line(_guest: QemuGuest, _t: float, line: str) -> None:
        if line.startswith("net-echo: ready"):
            ready.set()

    guest = QemuGuest(image, f"count=0 {args.append}".strip(), [
        "-netdev", f"dgram,id=n0,local.type=unix,local.path={vm_socket},remote.type=unix,remote.path={host_socket}",
        "-device", f"virtio-net-pci,netdev=n0,disable-legacy=on,mac={GUEST_MAC}"], workdir, on_line=on_line)
    try:
        if not ready.wait(60):
            raise SystemExit("net-echo did not get ready under QEMU:\n" + "\n".join(guest.lines))
        time.sleep(0.2)
        return measure(workdir, vm_socket, args, lambda: (guest.exits(), None, guest.vmm_cpu_ns()))
    finally:
        guest.close()


def run_pykvm(image: Path, workdir: Path, args, *, ioeventfd: bool) -> list[WindowResult]:
    from pykvm.devices.net_backends import NetSpec
    from pykvm.machine import Machine, MachineConfig

    vm_socket = workdir / "vm.sock"
    vm_socket.unlink(missing_ok=True)
    output = bytearray()
    config = MachineConfig(nets=(NetSpec("socket", str(vm_socket), mac=GUEST_MAC),), ioeventfd=ioeventfd)
    with Machine(config, serial_output=output.extend) as machine:
        machine.load(image, cmdline=f"count=0 {args.append}".strip())
        vcpu = machine.vm.vcpus[0]
        stats = KvmStats(vcpu.fd.fd)
        machine.vm.start()
        try:
            deadline = time.monotonic() + 30
            while b"net-echo: ready" not in output:
                if time.monotonic() > deadline or machine.vm.control.stop_reason is not None:
                    raise SystemExit("net-echo did not get ready under pykvm:\n" + output.decode(errors="replace"))
                time.sleep(0.01)
            time.sleep(0.2)
            return measure(workdir, vm_socket, args,
                           lambda: (stats.exits(), vcpu.exit_count, pykvm_cpu_ns(machine)))
        finally:
            machine.vm.stop(0, "benchmark done")
            machine.vm.wait()
            stats.close()


@dataclass
class Figures:
    rate: Series = field(default_factory=Series)
    median: Series = field(default_factory=Series)
    p99: Series = field(default_factory=Series)
    exits: Series = field(default_factory=Series)
    py_exits: Series = field(default_factory=Series)
    cpu_us: Series = field(default_factory=Series)
    lost: int = 0


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        path, peer, window, seconds, size = sys.argv[2:7]
        print(json.dumps(client(path, peer, int(window), float(seconds), int(size))))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the three runs (default 3)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per window (default 2)")
    parser.add_argument("--size", type=int, default=64, help="UDP payload bytes (default 64)")
    parser.add_argument("--windows", type=lambda s: [int(w) for w in s.split(",")], default=[1, 8],
                        help="requests outstanding, comma-separated (default 1,8; see above on more than 10)")
    parser.add_argument("--only", choices=CONFIGS, action="append", help="run only these configurations")
    parser.add_argument("--append", default="", help="more of the guest's command line, for both VMMs "
                        "(e.g. idle=halt: guests/README.md)")
    args = parser.parse_args()

    from pykvm import guestbuild
    from pykvm.devices.virtio.net import Net

    mark_default_config(Net)
    image = guestbuild.image_path("net-echo")
    configs = args.only or list(CONFIGS)
    figures: dict[int, dict[str, Figures]] = {}
    print(f"net-echo UDP echo, {args.size}-byte payloads, windows {args.windows}, {args.seconds:g} s each: "
          f"{args.rounds} round(s) of {', '.join(LABELS[c] for c in configs)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-net-") as tmp:
        workdir = Path(tmp)
        for round_ in range(args.rounds):
            for config in configs[round_ % len(configs):] + configs[:round_ % len(configs)]:
                if config == "qemu":
                    results = run_qemu(image, workdir, args)
                else:
                    results = run_pykvm(image, workdir, args, ioeventfd=config == "pykvm-ioeventfd")
                for window, r in zip(args.windows, results):
                    f = figures.setdefault(window, {}).setdefault(config, Figures())
                    f.rate.add(r.rate)
                    f.median.add(r.median_us)
                    f.p99.add(r.p99_us)
                    f.lost += r.lost
                    add_costs(f, r, r.echoes)
            print(f"  round {round_ + 1} done", flush=True)

    print()
    print(f"{'':30} {'req/s':>7} {'(min-max)':>13} {'vs QEMU':>7} {'(min-max)':>11} {'median us':>9} {'p99 us':>7}"
          f" {'exits/req':>9} {'py-exits/req':>12} {'VMM CPU us/req':>14} {'lost':>5}")
    worst: dict[str, float] = {}
    for window in args.windows:
        print(f"window {window}")
        for label, f, (ratio, spread), (exits, py_exits, cpu) in table_rows(figures[window], configs, "rate", worst):
            print(f"  {label:28} {f.rate.median:7.0f} {f.rate.spread('.0f'):>13} {ratio:>7} {spread:>11}"
                  f" {f.median.median:9.0f} {f.p99.median:7.0f} {exits:>9} {py_exits:>12} {cpu:>14} {f.lost:>5}")
    print_lowest_ratios(worst, configs, "net_ratio")


if __name__ == "__main__":
    main()
