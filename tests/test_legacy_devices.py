"""The PC's legacy devices as a guest driver sees them, without KVM: each sits on a FakePlatform's
I/O bus at its usual port, and every access goes through the bus dispatch a vCPU's I/O exit uses.
The 16550 UART, the CMOS RTC and NVRAM, the i8042, the debug-exit port and the ACPI PM block."""

from __future__ import annotations

import calendar

import pytest

from pykvm.devices.acpi_pm import AcpiPm
from pykvm.devices.cmos import Cmos
from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.i8042 import I8042
from pykvm.devices.serial import Serial16550
from pykvm.testing.fake_platform import FakePlatform

pytestmark = pytest.mark.nokvm

# Where a PC guest finds them (and where pykvm.machine puts them).
COM1, COM1_IRQ = 0x3F8, 4
CMOS_INDEX, CMOS_DATA = 0x70, 0x71
I8042_DATA, I8042_COMMAND = 0x60, 0x64
KEYBOARD_IRQ, MOUSE_IRQ = 1, 12
DEBUG_EXIT = 0xF4
PM_BASE = 0x600
PM1_STS, PM1_EN, PM1_CNT, PM_TMR = PM_BASE, PM_BASE + 2, PM_BASE + 4, PM_BASE + 8

# 16550 registers, as offsets from COM1
THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7

THURSDAY_29_FEB_2024_13_45_56 = calendar.timegm((2024, 2, 29, 13, 45, 56, 0, 0, 0))
MEMORY = 128 << 20


class Board:
    """The legacy devices on a fake platform, wired as pykvm.machine wires them, with what they
    tell the VMM recorded: serial output, resets, exit statuses, power-offs. Both clocks (the RTC's
    wall clock and the PM timer's monotonic one) are a number the test sets."""

    def __init__(self, platform: FakePlatform) -> None:
        self.platform = platform
        self.bus = platform.bus
        self.serial_output = bytearray()
        self.resets: list[bool] = []
        self.exit_statuses: list[int] = []
        self.power_offs: list[bool] = []
        self.now = float(THURSDAY_29_FEB_2024_13_45_56)
        self.serial = Serial16550(self.serial_output.extend, irq=lambda level: platform.irq_line(COM1_IRQ, level))
        self.cmos = Cmos(memory_size=MEMORY, cpus=2, clock=lambda: self.now)
        i8042 = I8042(on_reset=lambda: self.resets.append(True), irq=platform.irq_line)
        debug_exit = DebugExit(on_exit=self.exit_statuses.append)
        acpi_pm = AcpiPm(on_power_off=lambda: self.power_offs.append(True), clock=lambda: self.now)
        self.bus.register_pio(COM1, 8, self.serial)
        self.bus.register_pio(CMOS_INDEX, 2, self.cmos)
        self.bus.register_pio(I8042_DATA, 1, i8042, base=I8042_DATA)
        self.bus.register_pio(I8042_COMMAND, 1, i8042, base=I8042_DATA)
        self.bus.register_pio(DEBUG_EXIT, 1, debug_exit)
        self.bus.register_pio(PM_BASE, 12, acpi_pm)

    def inb(self, port: int) -> int:
        return self.bus.pio_read(port, 1)

    def outb(self, port: int, value: int) -> None:
        self.bus.pio_write(port, 1, value)

    def cmos_read(self, index: int) -> int:
        self.outb(CMOS_INDEX, index)
        return self.inb(CMOS_DATA)

    def cmos_write(self, index: int, value: int) -> None:
        self.outb(CMOS_INDEX, index)
        self.outb(CMOS_DATA, value)

    def com1_irq(self) -> bool:
        return self.platform.irq_levels.get(COM1_IRQ, False)


@pytest.fixture
def board():
    with FakePlatform() as platform:
        yield Board(platform)


# -- 16550 UART --------------------------------------------------------------------------------------


def test_serial_transmits_at_once_and_the_line_status_says_so(board):
    assert board.inb(COM1 + LSR) & 0x60 == 0x60  # THR empty, transmitter empty
    for byte in b"ok\n":
        board.outb(COM1 + THR, byte)
    assert board.serial_output == b"ok\n"
    assert board.inb(COM1 + LSR) == 0x60  # still empty, and no data ready


def test_serial_received_bytes_are_data_ready_then_read_in_order(board):
    board.serial.feed(b"hi")
    assert board.inb(COM1 + LSR) & 0x01  # data ready
    assert bytes([board.inb(COM1 + RBR), board.inb(COM1 + RBR)]) == b"hi"
    assert not board.inb(COM1 + LSR) & 0x01


def test_serial_divisor_latch_hides_the_data_registers(board):
    board.outb(COM1 + IER, 0x05)
    board.outb(COM1 + LCR, 0x80 | 0x03)  # DLAB on, 8N1
    board.outb(COM1 + DLL, 0x0C)  # 9600 baud: divisor 12
    board.outb(COM1 + DLM, 0x00)
    assert (board.inb(COM1 + DLL), board.inb(COM1 + DLM)) == (0x0C, 0x00)
    board.outb(COM1 + DLL, 0x01)
    board.outb(COM1 + DLM, 0x02)
    assert board.serial_output == b""  # divisor writes never reach the line
    assert (board.inb(COM1 + DLL), board.inb(COM1 + DLM)) == (0x01, 0x02)
    board.outb(COM1 + LCR, 0x03)  # DLAB off: the interrupt enable register is back, unchanged
    assert board.inb(COM1 + IER) == 0x05 and board.inb(COM1 + LCR) == 0x03


def test_serial_interrupt_identification_and_the_irq_line_agree(board):
    assert board.inb(COM1 + IIR) & 0x0F == 0x01 and not board.com1_irq()  # nothing pending
    board.outb(COM1 + IER, 0x02)  # THR empty interrupt: THR is empty, so it is pending at once
    assert board.com1_irq()
    assert board.inb(COM1 + IIR) & 0x0F == 0x02  # reading IIR acknowledges it...
    assert not board.com1_irq()  # ...and the line drops
    board.outb(COM1 + THR, ord("x"))  # sent at once: THR empty again, pending again
    assert board.com1_irq()
    assert board.inb(COM1 + IIR) & 0x0F == 0x02 and not board.com1_irq()

    board.outb(COM1 + IER, 0x01)  # received data only
    board.serial.feed(b"k")
    assert board.com1_irq() and board.inb(COM1 + IIR) & 0x0F == 0x04
    assert board.com1_irq()  # data ready is acknowledged by reading the data, not IIR
    assert board.inb(COM1 + RBR) == ord("k")
    assert not board.com1_irq() and board.inb(COM1 + IIR) & 0x0F == 0x01
    assert board.platform.irq_changes == [(COM1_IRQ, level) for level in (True, False) * 3]


def test_serial_fifo_enable_shows_in_iir(board):
    board.outb(COM1 + FCR, 0x07)  # enable, clear both FIFOs
    assert board.inb(COM1 + IIR) & 0xC0 == 0xC0
    board.outb(COM1 + FCR, 0x00)
    assert board.inb(COM1 + IIR) & 0xC0 == 0


def test_serial_loopback_is_what_the_8250_probe_checks(board):
    board.outb(COM1 + MCR, 0x10 | 0x0A)  # loopback, RTS, OUT2
    assert board.inb(COM1 + MSR) & 0xF0 == 0x90  # RTS -> CTS, OUT2 -> DCD
    board.outb(COM1 + THR, 0x5A)
    assert board.serial_output == b""  # looped back, not sent
    assert board.inb(COM1 + LSR) & 0x01 and board.inb(COM1 + RBR) == 0x5A
    board.outb(COM1 + SCR, 0xA5)
    assert board.inb(COM1 + SCR) == 0xA5


# -- CMOS and RTC ------------------------------------------------------------------------------------


def test_rtc_reads_the_time_in_bcd_by_default(board):
    fields = [board.cmos_read(index) for index in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32)]
    #                  sec   min   hour  weekday (Thursday = 5) day  month year  century
    assert fields == [0x56, 0x45, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20]
    assert board.cmos_read(0x0D) & 0x80  # battery good


def test_rtc_binary_and_12_hour_modes(board):
    board.cmos_write(0x0B, 0x04 | 0x02)  # binary, 24 h
    assert [board.cmos_read(i) for i in (0x00, 0x02, 0x04, 0x09)] == [56, 45, 13, 24]
    board.cmos_write(0x0B, 0x00)  # BCD, 12 h: 1 PM
    assert board.cmos_read(0x04) == 0x80 | 0x01


def test_rtc_time_set_by_the_guest_keeps_running(board):
    board.cmos_write(0x0B, 0x80 | 0x02)  # SET: updates stop while the guest writes the time
    board.cmos_write(0x04, 0x08)
    board.cmos_write(0x02, 0x30)
    board.now += 5  # the chip is frozen while SET is on
    assert (board.cmos_read(0x04), board.cmos_read(0x02), board.cmos_read(0x00)) == (0x08, 0x30, 0x56)
    board.cmos_write(0x0B, 0x02)
    board.now += 10
    assert (board.cmos_read(0x04), board.cmos_read(0x02), board.cmos_read(0x00)) == (0x08, 0x31, 0x06)


def test_rtc_update_in_progress_in_the_last_244_microseconds(board):
    assert board.cmos_read(0x0A) == 0x26  # time base and rate as firmware leaves them, no UIP
    board.now += 0.9999
    assert board.cmos_read(0x0A) == 0x80 | 0x26
    board.now += 0.0002  # the second turned: update ended, flag in register C until read
    assert board.cmos_read(0x0A) == 0x26
    assert board.cmos_read(0x0C) & 0x10 and not board.cmos_read(0x0C) & 0x10


def test_cmos_nvram_tells_memory_sizes_and_cpus(board):
    nv = [board.cmos_read(i) for i in range(0x80)]
    assert nv[0x15] | nv[0x16] << 8 == 640  # base memory, KiB
    # KiB above 1 MiB, in 16 bits: 127 MiB does not fit, so it reads as the most it can say...
    assert nv[0x17] | nv[0x18] << 8 == 0xFFFF == nv[0x30] | nv[0x31] << 8
    # ...and the 64 KiB units above 16 MiB tell the real size
    assert nv[0x34] | nv[0x35] << 8 == (MEMORY - (16 << 20)) // (64 << 10)
    assert nv[0x5B:0x5E] == [0, 0, 0]  # nothing above 4 GiB
    assert nv[0x5F] == 2 - 1  # CPUs, less one
    assert nv[0x2E] << 8 | nv[0x2F] == sum(nv[0x10:0x2E])  # checksum of 0x10-0x2D


def test_cmos_index_port_keeps_the_nmi_bit_out_of_the_index(board):
    board.cmos_write(0x80 | 0x40, 0x77)  # NMI disabled, index 0x40
    assert board.cmos_read(0x40) == 0x77
    assert board.inb(CMOS_INDEX) == 0xFF  # the index register is write-only


# -- i8042 -------------------------------------------------------------------------------------------


def test_i8042_self_test_answers_0x55(board):
    assert not board.inb(I8042_COMMAND) & 0x01  # output buffer empty
    board.outb(I8042_COMMAND, 0xAA)
    assert board.inb(I8042_COMMAND) & 0x01
    assert board.inb(I8042_DATA) == 0x55
    assert not board.inb(I8042_COMMAND) & 0x01


def test_i8042_command_byte_round_trip(board):
    board.outb(I8042_COMMAND, 0x20)
    assert board.inb(I8042_DATA) == 0x45  # keyboard interrupt, system flag, translation
    board.outb(I8042_COMMAND, 0x60)
    board.outb(I8042_DATA, 0x47)  # and the mouse interrupt
    board.outb(I8042_COMMAND, 0x20)
    assert board.inb(I8042_DATA) == 0x47


def test_i8042_output_raises_the_keyboard_or_mouse_irq(board):
    board.outb(I8042_COMMAND, 0xD2)  # "write keyboard output buffer": a byte as if typed
    board.outb(I8042_DATA, 0x1C)
    assert board.platform.irq_levels[KEYBOARD_IRQ]
    assert board.inb(I8042_DATA) == 0x1C and not board.platform.irq_levels[KEYBOARD_IRQ]
    board.outb(I8042_COMMAND, 0xD3)  # mouse output buffer, but its interrupt is off
    board.outb(I8042_DATA, 0x08)
    assert board.inb(I8042_COMMAND) & 0x21 == 0x21  # full, from the aux port
    assert not board.platform.irq_levels.get(MOUSE_IRQ, False)


def test_i8042_keyboard_reset_acks_and_passes_its_self_test(board):
    board.outb(I8042_DATA, 0xFF)
    assert [board.inb(I8042_DATA), board.inb(I8042_DATA)] == [0xFA, 0xAA]


def test_i8042_pulsing_the_reset_line_resets_the_machine(board):
    board.outb(I8042_COMMAND, 0xFF)  # pulse no line
    assert board.resets == []
    board.outb(I8042_COMMAND, 0xFE)  # pulse line 0: CPU reset (the FADT's reset register)
    assert board.resets == [True]
    board.outb(I8042_COMMAND, 0xD1)  # write the output port with the reset bit low
    board.outb(I8042_DATA, 0x02)
    assert board.resets == [True, True]


# -- debug exit --------------------------------------------------------------------------------------


def test_debug_exit_passes_the_status_byte_through(board):
    assert board.inb(DEBUG_EXIT) == 0
    board.outb(DEBUG_EXIT, 3)
    board.bus.pio_write(DEBUG_EXIT, 2, 0x1234)  # a wider write: its low byte
    assert board.exit_statuses == [3, 0x34]


# -- ACPI PM -----------------------------------------------------------------------------------------


def test_acpi_pm1_control_soft_off_and_other_sleep_states(board):
    assert board.bus.pio_read(PM1_CNT, 2) & 1  # SCI_EN: always in ACPI mode
    board.bus.pio_write(PM1_CNT, 2, 5 << 10 | 1 << 13)  # SLP_TYP 5 with SLP_EN: not \_S5 here
    assert board.power_offs == []
    assert not board.bus.pio_read(PM1_CNT, 2) & 1 << 13  # SLP_EN reads as 0
    board.bus.pio_write(PM1_CNT, 2, 0 << 10 | 1 << 13)  # \_S5's SLP_TYP 0: soft-off
    assert board.power_offs == [True]


def test_acpi_pm_timer_counts_at_3_58_mhz_in_24_bits(board):
    first = board.bus.pio_read(PM_TMR, 4)
    board.now += 0.001
    second = board.bus.pio_read(PM_TMR, 4)
    assert (second - first) & 0xFF_FFFF == pytest.approx(3580, abs=2)
    assert first < 1 << 24 and second < 1 << 24
    assert board.bus.pio_read(PM_TMR, 1) == second & 0xFF  # byte reads see the same count
    board.now += 2**24 / 3_579_545  # a full period later: the same count again (it wraps)
    assert board.bus.pio_read(PM_TMR, 4) == pytest.approx(second, abs=1)


def test_acpi_pm1_enable_keeps_what_the_guest_writes(board):
    board.bus.pio_write(PM1_EN, 2, 0x0121)
    assert board.bus.pio_read(PM1_EN, 2) == 0x0121
    board.bus.pio_write(PM1_STS, 2, 0xFFFF)  # write-one-to-clear: nothing was set
    assert board.bus.pio_read(PM1_STS, 2) == 0
