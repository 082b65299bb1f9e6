"""The PC board: a Vm with the legacy devices a PC guest expects at their usual places.

    port 0x3F8-0x3FF  COM1, 16550A UART, ISA IRQ 4
    port 0x70-0x71    CMOS RAM and RTC
    port 0x60, 0x64   i8042 (its reset line ends the run with status 0)
    port 0xF4         debug exit (a write of v ends the run with status v)
    in-kernel         PIC, IOAPIC, LAPICs, PIT (ports 0x20/0xA0, 0x40-0x43, 0x61)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pykvm.boot import LoadedImage, load_image
from pykvm.devices.cmos import Cmos
from pykvm.devices.debug_exit import DEFAULT_PORT as DEBUG_EXIT_PORT
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.i8042 import I8042
from pykvm.devices.serial import Serial16550
from pykvm.kvm import Kvm
from pykvm.vcpu import StopReason
from pykvm.vm import Vm

COM1_PORT, COM1_IRQ = 0x3F8, 4
CMOS_PORT = 0x70
I8042_DATA_PORT, I8042_COMMAND_PORT = 0x60, 0x64

MIB = 1024 * 1024
DEFAULT_MEMORY = 64 * MIB


@dataclass(frozen=True)
class MachineConfig:
    memory: int = DEFAULT_MEMORY
    cpus: int = 1


class Machine:
    def __init__(self, config: MachineConfig, *, serial_output: Callable[[bytes], None], kvm: Kvm | None = None) -> None:
        self.config = config
        self.vm = vm = Vm(config.memory, config.cpus, kvm=kvm)
        try:
            self.serial = Serial16550(serial_output, irq=lambda level: vm.irq_line(COM1_IRQ, level))
            self.cmos = Cmos(memory_size=config.memory, cpus=config.cpus)
            self.i8042 = I8042(on_reset=lambda: vm.stop(0, "guest reset"), irq=vm.irq_line)
            self.debug_exit = DebugExit(on_exit=lambda status: vm.stop(status, f"guest exited with status {status}"))
            vm.bus.register_pio(COM1_PORT, 8, self.serial)
            vm.bus.register_pio(CMOS_PORT, 2, self.cmos)
            vm.bus.register_pio(I8042_DATA_PORT, 1, self.i8042, base=I8042_DATA_PORT)
            vm.bus.register_pio(I8042_COMMAND_PORT, 1, self.i8042, base=I8042_DATA_PORT)
            vm.bus.register_pio(DEBUG_EXIT_PORT, 1, self.debug_exit)
        except BaseException:
            vm.close()
            raise

    def load(self, image: str | Path | bytes, *, cmdline: str = "", load_addr: int | None = None) -> LoadedImage:
        return load_image(self.vm, image, cmdline=cmdline, load_addr=load_addr)

    def run(self) -> StopReason:
        return self.vm.run()

    def close(self) -> None:
        self.vm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
