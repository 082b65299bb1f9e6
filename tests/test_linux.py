"""Linux on pykvm: the bundled kernel (pykvm/guestbuild/linux_guest.py) booted with a virtio-blk root and a
virtio-net NIC on a TAP in a private network namespace, checked from its serial log and the host.

One boot serves most tests (module-scoped fixture `boot`): each Linux boot costs ~45 s where KVM
emulates guest ring 0. The boot's command line adds netconsole (to a UDP socket of this test in
the namespace) and `pykvm.hold=20` (read by the root disk's /sbin/init, which then waits before it
powers off, so a host can ping a guest whose user space runs).

User space cannot run on the PVM backend (system calls from native ring 3 never reach an
unmodified kernel): there the kernel's attempt to start /sbin/init ends in a panic, which
reboots (panic=-1), which ends the VMM with status 0. The user-space test is skipped there.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import VmmProcess, requires_kvm, run_pykvm
from pykvm.guestbuild import linux_guest as linux
from pykvm.testing.lan import run_in_netns

pytestmark = requires_kvm

BOOT_TIMEOUT = 240  # seconds to IP-Config; ~40 s measured where ring 0 is emulated
GUEST_IP, HOST_IP = "10.0.2.15", "10.0.2.2"
NETCONSOLE_PORT = 6666
# "IP-Config: Complete:" and its continuation line (after that line's printk timestamp)
IP_CONFIG = r"IP-Config: Complete:(?:\n\[[ \d.]+\])?"


def _pvm_backend() -> bool:
    """KVM's PVM backend (no VMX/SVM; guest ring 3 native, ring 0 emulated), where Linux user
    space cannot run. Only the tests look: pykvm itself treats every backend alike."""
    return Path("/sys/module/kvm_pvm").exists()


needs_userspace = pytest.mark.skipif(
    _pvm_backend(), reason="Linux user space cannot run on this machine's KVM (PVM backend: system calls from guest "
                           "ring 3 never reach an unmodified kernel); runs on hardware KVM")
needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists(),
    reason="needs root, iproute2 and /dev/net/tun for a TAP in a network namespace")


@pytest.fixture(scope="module")
def guest() -> linux.LinuxGuest:
    """The bundled kernel, initramfs and root image (built by scripts/test.sh; cached)."""
    return linux.build(log=lambda line: None)


def _dumpe2fs(image: Path) -> dict[str, str]:
    out = subprocess.run(["dumpe2fs", "-h", str(image)], capture_output=True, text=True, check=True).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)


def _mount_count(image: Path) -> int:
    return int(_dumpe2fs(image)["Mount count"])


class Netns:
    """A network namespace with a TAP (host side 10.0.2.2/24) made before pykvm opens it."""

    def __init__(self, name: str, tap: str = "tap0") -> None:
        self.name, self.tap = name, tap
        subprocess.run(["ip", "netns", "add", name], check=True)
        try:
            for command in (["tuntap", "add", "dev", tap, "mode", "tap"], ["addr", "add", f"{HOST_IP}/24", "dev", tap],
                            ["link", "set", tap, "up"], ["link", "set", "lo", "up"]):
                subprocess.run(["ip", "-n", name, *command], check=True)
        except BaseException:
            self.close()
            raise

    def prefix(self) -> tuple[str, ...]:
        return ("ip", "netns", "exec", self.name)

    def udp_socket(self, port: int) -> socket.socket:
        """A UDP socket bound in the namespace: made by a thread that entered it (setns changes
        the calling thread's namespace only), usable from any thread afterwards."""
        def bound() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((HOST_IP, port))
            return sock

        return run_in_netns(self.name, bound)

    def ping(self, address: str, count: int = 3) -> subprocess.CompletedProcess:
        """busybox's ping (busybox-static is a build dependency of the Linux guest)."""
        return subprocess.run([*self.prefix(), "busybox", "ping", "-c", str(count), "-W", "5", address],
                              capture_output=True, text=True, timeout=60)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True)


@dataclass
class Boot:
    log: str = ""
    errors: str = ""
    status: int | None = None
    ping: subprocess.CompletedProcess | None = None
    netconsole: list[bytes] = field(default_factory=list)
    mounts_before: int = 0
    mounts_after: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # marker -> seconds after start


def _collect(sock: socket.socket, into: list[bytes], stop: threading.Event) -> None:
    sock.settimeout(0.5)
    while not stop.is_set():
        try:
            into.append(sock.recv(65536))
        except TimeoutError:
            continue
        except OSError:
            return


@pytest.fixture(scope="module")
def boot(guest: linux.LinuxGuest, tmp_path_factory: pytest.TempPathFactory) -> Boot:
    """One boot of `pykvm run linux` with 2 vCPUs, its own copy of the root disk, a NIC on a TAP in
    a fresh namespace and netconsole to this test; pings the guest once IP-Config completed."""
    if os.geteuid() != 0 or shutil.which("ip") is None or not Path("/dev/net/tun").exists():
        pytest.skip("needs root, iproute2 and /dev/net/tun for a TAP in a network namespace")
    disk = tmp_path_factory.mktemp("linux") / "root.ext4"
    shutil.copyfile(guest.rootfs, disk)
    result = Boot(mounts_before=_mount_count(disk))
    netns = Netns(f"pykvm-linux-{os.getpid()}")
    stop = threading.Event()
    try:
        sock = netns.udp_socket(NETCONSOLE_PORT)
        collector = threading.Thread(target=_collect, args=(sock, result.netconsole, stop), daemon=True)
        collector.start()
        append = f"netconsole=@{GUEST_IP}/eth0,{NETCONSOLE_PORT}@{HOST_IP}/ pykvm.hold=20"
        started = time.monotonic()
        vmm = VmmProcess("run", "linux", "--cpus", "2", "--mem", "128M", "--disk", str(disk), "--net",
                         f"tap:{netns.tap}", "--append", append, prefix=netns.prefix())
        try:
            for marker in ("Linux version", "IP-Config: Complete"):
                vmm.wait_for(marker.encode(), timeout=BOOT_TIMEOUT)
                result.seconds[marker] = time.monotonic() - started
            result.ping = netns.ping(GUEST_IP)
            result.status = vmm.wait(timeout=BOOT_TIMEOUT)
        finally:
            vmm.kill()
            result.log, result.errors = vmm.output.replace("\r\n", "\n"), vmm.errors  # the UART sends CR LF
            (disk.parent / "serial.log").write_text(result.log)  # for a look after a failure
        stop.set()
        collector.join(5)
        sock.close()
    finally:
        stop.set()
        netns.close()
    result.mounts_after = _mount_count(disk)
    return result


def _assert_in_log(boot: Boot, pattern: str) -> re.Match:
    match = re.search(pattern, boot.log)
    assert match, f"no {pattern!r} in the serial log:\n{boot.log}\nstderr:\n{boot.errors[-2000:]}"
    return match


def test_kernel_probes_virtio_blk_and_net(boot: Boot) -> None:
    _assert_in_log(boot, r"pci 0000:00:01\.0: \[1af4:1001\]")  # virtio-blk, slot 1
    _assert_in_log(boot, r"pci 0000:00:02\.0: \[1af4:1000\]")  # virtio-net, slot 2
    _assert_in_log(boot, r"virtio_blk virtio\d+: \[vda\] \d+ 512-byte logical blocks")
    _assert_in_log(boot, IP_CONFIG + r"\s+device=eth0, hwaddr=52:54:00:12:34:56")


def test_acpi_tables_bring_up_both_vcpus(boot: Boot) -> None:
    _assert_in_log(boot, r"ACPI: PM-Timer IO Port: 0x608")
    _assert_in_log(boot, r"ACPI: PCI Root Bridge \[PCI0\]")
    _assert_in_log(boot, r"smp: Brought up 1 node, 2 CPUs")


def test_root_mounted_read_write_from_vda(boot: Boot) -> None:
    _assert_in_log(boot, r"EXT4-fs \(vda\): mounted filesystem")
    _assert_in_log(boot, r"VFS: Mounted root \(ext4 filesystem\) on device")  # "readonly" would follow "filesystem)"
    assert boot.mounts_after == boot.mounts_before + 1, "dumpe2fs: the mount count did not increase"


def test_ip_autoconfig_static_address(boot: Boot) -> None:
    match = _assert_in_log(boot, IP_CONFIG + r".*")
    assert f"ipaddr={GUEST_IP}" in match.group(0) and "mask=255.255.255.0" in match.group(0)
    assert f"gw={HOST_IP}" in match.group(0)


def test_netconsole_messages_reach_the_host(boot: Boot) -> None:
    received = b"".join(boot.netconsole).decode(errors="replace")
    assert "IP-Config: Complete" in received or "EXT4-fs (vda)" in received, (
        f"{len(boot.netconsole)} netconsole datagrams, none with a boot message: {received[:2000]!r}")


def test_guest_answers_ping_from_the_host(boot: Boot) -> None:
    assert boot.ping is not None
    # At least one reply, not 0% loss: the first waits for ARP, and a loaded host may delay others.
    assert boot.ping.returncode == 0 and f"bytes from {GUEST_IP}" in boot.ping.stdout, (
        boot.ping.stdout + boot.ping.stderr)


def test_vmm_exits_0_when_the_guest_reboots_or_powers_off(boot: Boot) -> None:
    """Here the end is the panic path: init cannot run, the kernel panics, panic=-1 reboots
    through the ACPI reset register (the i8042), the VMM exits 0. With user space it is
    /sbin/init's ACPI power-off, also 0."""
    if _pvm_backend():
        _assert_in_log(boot, r"Kernel panic - not syncing: Attempted to kill init")
    assert boot.status == 0, boot.errors[-3000:]


@needs_userspace
def test_user_space_runs_and_powers_off(boot: Boot) -> None:
    assert linux.USERSPACE_MARKER.decode() in boot.log
    _assert_in_log(boot, r"pykvm-linux: root: /dev/root / ext4 rw")
    assert boot.status == 0


def test_bzimage_boots_through_the_boot_protocol(guest: linux.LinuxGuest) -> None:
    """The main boot uses the vmlinux (no decompressor: ~27 s less where ring 0 is emulated); this
    one checks the bzImage path as far as the kernel's own report of what the loader gave it:
    decompressor, 64-bit entry, zero page with command line and e820 map."""
    append = linux.default_append(network=False, extra="pykvm.test=bzimage")
    vmm = VmmProcess("run", "--kernel", str(guest.bzimage), "--initrd", str(guest.initramfs), "--mem", "128M",
                     "--append", append, "--serial", "stdio")
    try:
        vmm.wait_for(b"Kernel command line: " + append.encode(), timeout=BOOT_TIMEOUT)
    finally:
        vmm.kill()
    assert "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable" in vmm.output
    assert "ACPI: RSDP 0x00000000000E0000" in vmm.output


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU is not installed")
def test_bundled_guest_user_space_under_qemu_tcg(guest: linux.LinuxGuest, tmp_path: Path) -> None:
    """The guest itself (kernel config, root disk, /sbin/init, ACPI S5 power-off) checked where its
    user space can run whatever the KVM backend: QEMU's TCG emulator, with no KVM at all. This is
    what test_user_space_runs_and_powers_off expects of pykvm on hardware KVM."""
    disk = tmp_path / "root.ext4"
    shutil.copyfile(guest.rootfs, disk)
    result = subprocess.run(
        ["qemu-system-x86_64", "-accel", "tcg", "-M", "pc", "-cpu", "max", "-m", "128M", "-kernel", str(guest.bzimage),
         "-initrd", str(guest.initramfs), "-append", "console=ttyS0 root=/dev/vda rw panic=-1",
         "-drive", f"file={disk},if=virtio,format=raw", "-display", "none", "-serial", "stdio", "-monitor", "none",
         "-no-reboot"], capture_output=True, timeout=180, stdin=subprocess.DEVNULL)
    log = result.stdout.decode(errors="replace")
    assert linux.USERSPACE_MARKER.decode() in log, log[-3000:]
    assert "pykvm-linux: root: /dev/root / ext4 rw" in log and "reboot: Power down" in log, log[-3000:]
    assert result.returncode == 0 and _mount_count(disk) == 1


# -- bad input: no boot needed ---------------------------------------------------------------------


def test_broken_bzimage_header_is_refused(guest: linux.LinuxGuest, tmp_path: Path) -> None:
    broken = bytearray(guest.bzimage.read_bytes())
    broken[0x202:0x206] = b"XXXX"  # the "HdrS" signature
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(broken)
    result = run_pykvm("run", "--kernel", str(kernel), timeout=60)
    assert result.returncode == 2
    assert result.stderr.decode().startswith("pykvm: error: ") and "not a Linux kernel" in result.stderr.decode()
    assert len(result.stderr.decode().strip().splitlines()) == 1


def test_truncated_bzimage_is_refused(guest: linux.LinuxGuest, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(guest.bzimage.read_bytes()[:300_000])
    result = run_pykvm("run", "--kernel", str(kernel), timeout=60)
    assert result.returncode == 2 and b"truncated bzImage" in result.stderr, result.stderr


def test_truncated_initrd_is_refused(guest: linux.LinuxGuest, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(guest.initramfs.read_bytes()[:1_000_000])
    result = run_pykvm("run", "--kernel", str(guest.bzimage), "--initrd", str(initrd), timeout=60)
    assert result.returncode == 2, result.stderr
    assert b"truncated initrd" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_initrd_too_large_for_ram_is_refused(guest: linux.LinuxGuest, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    with initrd.open("wb") as out:
        out.truncate(80 << 20)  # sparse: 80 MiB of zeros
    result = run_pykvm("run", "--kernel", str(guest.bzimage), "--initrd", str(initrd), "--mem", "64M", timeout=60)
    assert result.returncode == 2, result.stderr
    assert b"does not fit" in result.stderr and b"raise --mem" in result.stderr, result.stderr


def test_initrd_without_kernel_and_kernel_with_a_guest_are_refused(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    for args in (("run", "--initrd", str(initrd)), ("run", "hello", "--kernel", str(initrd))):
        result = run_pykvm(*args, timeout=60)
        assert result.returncode == 2 and result.stderr.startswith(b"pykvm: error: "), result.stderr
