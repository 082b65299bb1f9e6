"""Cost of one VM exit: pykvm's Python exit loop against a minimal C KVM_RUN loop.

Both run the `pio` guest (port I/O at CPL3, one exit each) from the same initial state: pykvm
loads the guest, and the C loop receives pykvm's RAM image and vCPU registers, so the two differ
only in who handles the exits. Each side runs the guest with N and 2N exits; the difference
cancels boot time, so cost per exit = (t(2N) - t(N)) / (exits(2N) - exits(N)).

Two ports: reads of the debug-exit port (0xF4), which has a device, so pykvm takes its fast path
(the `ratio:` line: one index into the port table, the device's pio_read); and writes to port
0x80, which has none, so pykvm leaves the fast path for `_port_io_slow` and the bus's lookup
(the `fallback path` line). The C loop answers both as cheaply as it can (a read: all-ones).

Also measures pause/resume latency of all vCPUs while the `compute` guest runs: request →
every vCPU parked with its I/O completed → resumed.

    python bench/exits.py [--count N] [--pauses N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm import guestbuild  # noqa: E402
from pykvm.devices.debug_exit import DEFAULT_PORT as DEBUG_EXIT_PORT  # noqa: E402
from pykvm.machine import Machine, MachineConfig  # noqa: E402
from pykvm.stats import percentile  # noqa: E402

MEMORY = 64 << 20

C_LOOP = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what) { perror(what); exit(1); }

static void slurp(const char *path, void *buf, size_t len) {
    int fd = open(path, O_RDONLY);
    if (fd < 0 || read(fd, buf, len) != (ssize_t)len) die(path);
    close(fd);
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: loop RAM RAMSIZE REGS SREGS CPUID\n"); return 2; }
    size_t ram_size = strtoull(argv[2], NULL, 0);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("/dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, 0xfffbd000) < 0) die("KVM_SET_TSS_ADDR");
    uint64_t ident = 0xfffbc000;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0) die("KVM_SET_IDENTITY_MAP_ADDR");
    if (ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0) die("KVM_CREATE_IRQCHIP");
    struct kvm_pit_config pit = {0};
    if (ioctl(vm, KVM_CREATE_PIT2, &pit) < 0) die("KVM_CREATE_PIT2");
    void *ram = mmap(NULL, ram_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (ram == MAP_FAILED) die("mmap");
    slurp(argv[1], ram, ram_size);
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = ram_size, .userspace_addr = (uint64_t)ram};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) die("KVM_SET_USER_MEMORY_REGION");
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0) die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    /* The guest's CPUID as pykvm set it: KVM checks e.g. EFER.LME against it. */
    static char cpuid_buf[sizeof(struct kvm_cpuid2) + 256 * sizeof(struct kvm_cpuid_entry2)];
    int cpuid_fd = open(argv[5], O_RDONLY);
    if (cpuid_fd < 0 || read(cpuid_fd, cpuid_buf, sizeof cpuid_buf) <= 0) die(argv[5]);
    close(cpuid_fd);
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid_buf) < 0) die("KVM_SET_CPUID2");
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    slurp(argv[3], &regs, sizeof regs);
    slurp(argv[4], &sregs, sizeof sregs);
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) die("KVM_SET_SREGS");
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) die("KVM_SET_REGS");

    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    unsigned long exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) die("KVM_RUN");
        exits++;
        if (run->exit_reason != KVM_EXIT_IO) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        if (run->io.direction == KVM_EXIT_IO_IN) {
            memset(data, 0xff, run->io.size * run->io.count);
        } else if (run->io.port == 0x3f8) {
            fwrite(data, 1, run->io.count, stderr);
        } else if ((run->io.port == 0x64 && data[0] == 0xfe) || run->io.port == 0xf4) {
            break;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("%lu %lld\n", exits, (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec));
    return 0;
}
"""


DEVICE_PORT = f"mode=in port={DEBUG_EXIT_PORT:#x}"  # a read of the debug-exit port: a device's pio_read
NO_DEVICE_PORT = "mode=out port=0x80"  # nothing there: the fallback path


def python_run(image: Path, count: int, how: str) -> tuple[int, float]:
    """(exits, seconds) for one run of the pio guest under pykvm."""
    output = bytearray()
    with Machine(MachineConfig(memory=MEMORY), serial_output=output.extend) as machine:
        machine.load(image, cmdline=f"count={count} {how}")
        start = time.perf_counter()
        stop = machine.run()
        elapsed = time.perf_counter() - start
        if stop.status != 0 or b"pio: done" not in output:
            raise SystemExit(f"pio guest failed under pykvm: {stop.reason}\n{output.decode(errors='replace')}")
        return machine.vm.vcpus[0].exit_count, elapsed


def c_run(loop: Path, workdir: Path, image: Path, count: int, how: str) -> tuple[int, float]:
    """(exits, seconds) for the same guest, same initial state, under the C loop."""
    with Machine(MachineConfig(memory=MEMORY), serial_output=lambda data: None) as machine:
        machine.load(image, cmdline=f"count={count} {how}")
        vcpu = machine.vm.vcpus[0].fd
        (workdir / "ram").write_bytes(machine.vm.memory.read(0, MEMORY))
        (workdir / "regs").write_bytes(bytes(vcpu.get_regs()))
        (workdir / "sregs").write_bytes(bytes(vcpu.get_sregs()))
        (workdir / "cpuid").write_bytes(bytes(vcpu.get_cpuid2()))
    files = [str(workdir / name) for name in ("ram", "regs", "sregs", "cpuid")]
    result = subprocess.run([str(loop), files[0], str(MEMORY), *files[1:]], capture_output=True, text=True, check=True)
    exits, nanoseconds = map(int, result.stdout.split())
    return exits, nanoseconds / 1e9


def per_exit(run, count: int, repeats: int = 3) -> float:
    """Best-of-`repeats` marginal cost of one exit, in seconds."""
    costs = []
    for _ in range(repeats):
        exits_n, t_n = run(count)
        exits_2n, t_2n = run(2 * count)
        costs.append((t_2n - t_n) / (exits_2n - exits_n))
    return min(costs)


def pause_latency(image: Path, pauses: int, cpus: int) -> tuple[list[float], list[float]]:
    """Latencies (s) of pause() and of pause()+resume() while `compute` runs on `cpus` vCPUs."""
    output = bytearray()
    pause_times, cycle_times = [], []
    with Machine(MachineConfig(memory=MEMORY, cpus=cpus), serial_output=output.extend) as machine:
        machine.load(image, cmdline="rounds=1000000")
        vm = machine.vm
        vm.start()
        time.sleep(0.2)  # let the guest reach its CPL3 loop; only affects what is measured, not correctness
        for _ in range(pauses):
            t0 = time.perf_counter()
            hold = vm.pause("bench")
            t1 = time.perf_counter()
            vm.resume(hold)
            t2 = time.perf_counter()
            pause_times.append(t1 - t0)
            cycle_times.append(t2 - t0)
            time.sleep(0.001)
        vm.stop(0, "benchmark done")
        vm.wait()
    return pause_times, cycle_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200_000, help="exits in the shorter run (default 200000)")
    parser.add_argument("--pauses", type=int, default=300, help="pause/resume cycles (default 300)")
    args = parser.parse_args()

    pio = guestbuild.image_path("pio")
    compute = guestbuild.image_path("compute")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        source = workdir / "loop.c"
        source.write_text(C_LOOP)
        loop = workdir / "loop"
        subprocess.run(["gcc", "-O2", "-o", str(loop), str(source)], check=True)
        costs = {}
        for how in (DEVICE_PORT, NO_DEVICE_PORT):
            costs[how] = (per_exit(lambda n: c_run(loop, workdir, pio, n, how), args.count),
                          per_exit(lambda n: python_run(pio, n, how), args.count))

    c_cost, py_cost = costs[DEVICE_PORT]
    print(f"exit cost, C loop:      {c_cost * 1e6:7.2f} us/exit (in from port {DEBUG_EXIT_PORT:#x}, the debug-exit device)")
    print(f"exit cost, pykvm loop:  {py_cost * 1e6:7.2f} us/exit")
    print(f"ratio: {py_cost / c_cost:.2f}")
    c_slow, py_slow = costs[NO_DEVICE_PORT]
    print(f"fallback path (out to port 0x80, no device): C loop {c_slow * 1e6:.2f} us/exit, pykvm {py_slow * 1e6:.2f}"
          f" us/exit, {py_slow / c_slow:.2f}x")

    for cpus in (1, 2):
        pauses, cycles = pause_latency(compute, args.pauses, cpus)
        print(f"pause, {cpus} vCPU(s):   request -> all paused  median {statistics.median(pauses) * 1e6:6.0f} us"
              f"  p99 {percentile(pauses, 99) * 1e6:6.0f} us")
        print(f"pause+resume, {cpus} vCPU(s): request -> resumed  median {statistics.median(cycles) * 1e6:6.0f} us"
              f"  p99 {percentile(cycles, 99) * 1e6:6.0f} us")


if __name__ == "__main__":
    main()
