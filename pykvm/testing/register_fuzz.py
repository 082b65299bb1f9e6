"""A hostile guest at the register surface: random port and MMIO accesses at every device of a
FakePc, through the I/O bus dispatch a vCPU exit uses, then one state round trip.

A case is a sequence of accesses. It fails (a "crash") when an exception escapes a device, a
read returns more bits than the access is wide (the vCPU could not hand it to the guest), a
device invariant breaks (MSI-X table and PBA sizes, vector registers naming a vector the table
has, BARs aligned to their size, live rings where the queue registers say and only while
the driver runs), the saved state does not restore into a fresh FakePc, or the
restored devices save a different state. A debug-exit write, an i8042 reset or an ACPI
power-off is the guest asking to stop: recorded, not a failure.

bench/fuzz_devices.py draws cases from random.Random; tests/test_register_fuzz.py from
hypothesis (which shrinks a failure to its shortest sequence). Both build accesses from
`register_surface`, so both aim at the same registers.
"""

from __future__ import annotations

import random
import time
import traceback
from dataclasses import dataclass, field

from pykvm.devices.acpi_pm import PM_BASE, PM_PORTS
from pykvm.devices.debug_exit import DEFAULT_PORT as DEBUG_EXIT_PORT
from pykvm.devices.pci import CONFIG_ADDRESS_PORT, MSIX_NO_VECTOR
from pykvm.devices.pci.msix import MSIX_ENTRY_SIZE
from pykvm.devices.virtio.legacy import LEGACY_BAR
from pykvm.devices.virtio.modern import COMMON_CFG, COMMON_CFG_SIZE, DEVICE_CFG, ISR_CFG, MODERN_BAR, NOTIFY_CFG, \
    NOTIFY_OFF_MULTIPLIER
from pykvm.devices.virtio.transport import MSIX_BAR, MSIX_PBA_OFFSET, VirtioPciFunction
from pykvm.machine import CMOS_PORT, COM1_PORT, I8042_COMMAND_PORT, I8042_DATA_PORT
from pykvm.testing.fake_pc import FakePc

MAX_ACCESSES = 64
PIO_SIZES = (1, 2, 4)  # an IN or OUT moves at most 4 bytes
MMIO_SIZES = (1, 2, 4, 8)
PCI_SLOTS = 4  # host bridge, blk, net, and one empty slot
FUZZ_MEMORY = 1 << 20  # small: the round trip copies it all, as a snapshot would


@dataclass(frozen=True)
class Region:
    """A window of the register surface: `length` bytes (ports when `pio`) from `start`."""

    name: str
    pio: bool
    start: int
    length: int


@dataclass(frozen=True)
class Access:
    pio: bool
    write: bool
    address: int
    size: int
    value: int = 0  # written; ignored for a read

    def __str__(self) -> str:
        space = "port" if self.pio else "mmio"
        what = f"write {self.value:#0{2 + 2 * self.size}x}" if self.write else "read"
        return f"{space} {self.address:#x} size {self.size} {what}"


@dataclass
class CaseResult:
    crash: str | None = None  # what went wrong, with the accesses that led there
    stop_requests: int = 0
    slowest: tuple[float, Access] | None = None  # (seconds, access)
    accesses: list[Access] = field(default_factory=list)


def register_surface(pc: FakePc) -> list[Region]:
    """Every device's registers where the guest finds them now: the legacy ports, PCI
    configuration mechanism 1, and each BAR of each function, its virtio structures apart."""
    regions = [
        Region("uart", True, COM1_PORT, 8), Region("cmos", True, CMOS_PORT, 2),
        Region("i8042-data", True, I8042_DATA_PORT, 1), Region("i8042-command", True, I8042_COMMAND_PORT, 1),
        Region("debug-exit", True, DEBUG_EXIT_PORT, 1), Region("acpi-pm", True, PM_BASE, PM_PORTS),
        Region("pci-config", True, CONFIG_ADDRESS_PORT, 8),
    ]
    for function in pc.virtio:
        regions += _function_surface(function)
    return regions


def _function_surface(function: VirtioPciFunction) -> list[Region]:
    name = f"slot{function.slot}"
    modern, msix = function.bars[MODERN_BAR].address, function.bars[MSIX_BAR].address
    regions = [
        Region(f"{name}.common-cfg", False, modern + COMMON_CFG, COMMON_CFG_SIZE),
        Region(f"{name}.isr", False, modern + ISR_CFG, 4),
        Region(f"{name}.device-cfg", False, modern + DEVICE_CFG, len(function.device.config_bytes())),
        Region(f"{name}.notify", False, modern + NOTIFY_CFG, NOTIFY_OFF_MULTIPLIER * len(function.queue_registers)),
        Region(f"{name}.msix-table", False, msix, MSIX_ENTRY_SIZE * function.msix.vectors),
        Region(f"{name}.msix-pba", False, msix + MSIX_PBA_OFFSET, 8),
    ]
    legacy = function.bars.get(LEGACY_BAR)
    if legacy is not None:
        regions.append(Region(f"{name}.legacy", True, legacy.address, legacy.size))
    return regions


# -- drawing cases ------------------------------------------------------------------------------------


def random_access(rng: random.Random, surface: list[Region]) -> Access:
    region = rng.choice(surface)
    size = rng.choice(PIO_SIZES if region.pio else MMIO_SIZES)
    write = rng.random() < 0.6
    if region.name == "pci-config" and write and rng.random() < 0.5:
        return Access(True, True, CONFIG_ADDRESS_PORT, 4, pci_config_address(rng))
    where = rng.random()
    if where < 0.5:  # a register as a driver would touch it: aligned, inside
        offset = rng.randrange(0, max(region.length, size), size) if region.length >= size else 0
    elif where < 0.8:  # anywhere inside, unaligned too
        offset = rng.randrange(region.length)
    else:  # straddling either end, or just outside
        offset = rng.choice((-size, -1, region.length - 1, region.length - size + 1, region.length))
    return Access(region.pio, write, max(region.start + offset, 0), size, random_value(rng, size) if write else 0)


def random_value(rng: random.Random, size: int) -> int:
    bits = 8 * size
    kind = rng.random()
    if kind < 0.3:
        return rng.randrange(min(0x20, 1 << bits))  # small: selectors, vector numbers, status bits
    if kind < 0.4:
        return (1 << bits) - 1  # all ones: BAR sizing, "no vector"
    if kind < 0.5:
        return 1 << rng.randrange(bits)
    return rng.getrandbits(bits)


def pci_config_address(rng: random.Random) -> int:
    """A mechanism-1 address, mostly for a register of a function that exists."""
    address = 0x8000_0000 | (rng.randrange(PCI_SLOTS) << 11) | rng.randrange(256)
    if rng.random() < 0.1:
        address ^= 1 << rng.randrange(31)  # another bus or function, disabled, or low bits set
    return address


def random_case(rng: random.Random, surface: list[Region]) -> list[Access]:
    return [random_access(rng, surface) for _ in range(rng.randint(1, MAX_ACCESSES))]


# -- running a case ---------------------------------------------------------------------------------------


def run_case(disk_path: str, accesses: list[Access]) -> CaseResult:
    """Run `accesses` against a fresh FakePc, then save, restore into another and compare."""
    result = CaseResult(accesses=accesses)
    with FakePc(disk_path, memory_size=FUZZ_MEMORY) as pc:
        result.crash = _drive(pc, accesses, result)
        result.stop_requests = len(pc.stop_requests)
        if result.crash is None:
            result.crash = _round_trip(pc, disk_path)
    if result.crash is not None:
        result.crash += "\naccesses:\n" + "\n".join(f"  {i:2d}  {a}" for i, a in enumerate(accesses))
    return result


def _drive(pc: FakePc, accesses: list[Access], result: CaseResult) -> str | None:
    bus = pc.platform.bus
    slowest = 0.0
    for index, access in enumerate(accesses):
        started = time.perf_counter()
        try:
            if access.pio:
                if access.write:
                    bus.pio_write(access.address, access.size, access.value)
                else:
                    value = bus.pio_read(access.address, access.size)
            elif access.write:
                bus.mmio_write(access.address, access.size, access.value)
            else:
                value = bus.mmio_read(access.address, access.size)
        except Exception:
            return f"access {index} ({access}) raised:\n{traceback.format_exc()}"
        elapsed = time.perf_counter() - started
        if elapsed > slowest:
            slowest, result.slowest = elapsed, (elapsed, access)
        if not access.write and not 0 <= value < 1 << (8 * access.size):
            return f"access {index} ({access}) read {value:#x}, wider than the access"
        broken = broken_invariant(pc)
        if broken:
            return f"after access {index} ({access}): {broken}"
    return None


def broken_invariant(pc: FakePc) -> str | None:
    """What a guest must never be able to change about a device, described; None if all hold."""
    for function in pc.virtio:
        msix, where = function.msix, f"slot {function.slot}"
        if len(msix.table) != MSIX_ENTRY_SIZE * msix.vectors or len(msix.pending) != msix.vectors:
            return f"{where}: MSI-X table of {len(msix.table)} bytes, {len(msix.pending)} pending bits " \
                   f"for {msix.vectors} vectors"
        vectors = [function.config_vector] + [q.vector for q in function.queue_registers]
        if any(vector >= msix.vectors and vector != MSIX_NO_VECTOR for vector in vectors):
            return f"{where}: vector registers {vectors} name vectors the table lacks ({msix.vectors})"
        rings = function.device.rings
        if not function.serving and any(ring is not None for ring in rings):
            return f"{where}: live rings while the driver is not running (status {function.status:#x})"
        # What a restore rebuilds the device from (registers, negotiated features) is what runs.
        for index, (q, ring) in enumerate(zip(function.queue_registers, rings)):
            if ring is not None and (ring.size, ring.desc, ring.avail, ring.used) != (q.size, q.desc, q.avail, q.used):
                return f"{where}: queue {index} runs at {ring.desc:#x}/{ring.avail:#x}/{ring.used:#x} size " \
                       f"{ring.size}, its registers say {q.desc:#x}/{q.avail:#x}/{q.used:#x} size {q.size}"
            if (ring is not None) != (function.serving and q.enabled):
                return f"{where}: queue {index} is {'' if q.enabled else 'not '}enabled, its ring " \
                       f"{'live' if ring is not None else 'absent'} (status {function.status:#x})"
        if function.serving and function.device.driver_features != function.driver_features:
            return f"{where}: the device runs with features {function.device.driver_features:#x}, " \
                   f"the driver's register says {function.driver_features:#x}"
    for function in pc.pci.functions.values():
        for bar in function.bars.values():
            if function.bar_address(bar.index) % bar.size:
                return f"slot {function.slot}: BAR{bar.index} at {function.bar_address(bar.index):#x}, " \
                       f"not aligned to its size {bar.size:#x}"
        if len(function.config) != 256:
            return f"slot {function.slot}: configuration space of {len(function.config)} bytes"
    return None


def _round_trip(pc: FakePc, disk_path: str) -> str | None:
    try:
        saved = pc.save_state()
    except Exception:
        return f"saving the state raised:\n{traceback.format_exc()}"
    with FakePc(disk_path, memory_size=FUZZ_MEMORY) as fresh:
        for source, target in zip(pc.platform.memory.slots, fresh.platform.memory.slots):
            target.view[:] = source.view  # RAM travels with the state, as in a snapshot
        try:
            fresh.restore_state(saved)
        except Exception:
            return f"restoring the saved state raised:\n{traceback.format_exc()}"
        again = fresh.save_state()
    differing = sorted(name for name in saved if saved[name] != again[name])
    if differing:
        name = differing[0]
        return f"the restored {', '.join(differing)} saved another state:\n  saved    {saved[name].decode()}\n" \
               f"  restored {again[name].decode()}"
    return None
