"""A 16550A UART (COM1): what the Linux 8250 driver and simple polling guests expect.

Transmission is instantaneous: a byte written to THR goes straight to the output callback, so THR
is always empty (LSR.THRE|TEMT) and a THRE interrupt is re-armed at once. Received bytes queue in
a buffer fed by the host (stdin); the interrupt line follows IIR (level computed after every
access, edge seen by the in-kernel PIC on ISA IRQ 4).
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass
from typing import Callable

# Register offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA, IER_THRE, IER_RLS, IER_MS = 0x01, 0x02, 0x04, 0x08
IIR_NONE, IIR_MS, IIR_THRE, IIR_RDA, IIR_RLS = 0x01, 0x00, 0x02, 0x04, 0x06
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 0x01, 0x02, 0x04
LCR_DLAB = 0x80
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 0x01, 0x02, 0x04, 0x08, 0x10
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
MSR_DELTA_MASK = 0x0F

RX_BUFFER_LIMIT = 4096  # host input waits (back-pressure) once this much is queued


@dataclass
class SerialState:
    ier: int
    lcr: int
    mcr: int
    lsr_errors: int
    msr: int
    scr: int
    divisor: int
    fifo_enabled: bool
    thr_interrupt: bool
    rx: bytes  # received, not yet read by the guest


class Serial16550:
    state_type = SerialState
    def __init__(self, output: Callable[[bytes], None], irq: Callable[[bool], None]) -> None:
        self._output = output
        self._irq = irq
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._rx: collections.deque[int] = collections.deque()
        self.ier = 0
        self.lcr = 0x03  # 8N1
        self.mcr = MCR_OUT2
        self.lsr_errors = 0  # sticky LSR error bits, cleared by reading LSR
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.scr = 0
        self.divisor = 1  # 115200 baud
        self.fifo_enabled = False
        self.thr_interrupt = False  # THRE interrupt pending until IIR is read or THR written
        self._irq_level = False

    # -- guest side -----------------------------------------------------------------------------

    def pio_read(self, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset)
            self._update_irq()
            return value

    def pio_write(self, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def _read(self, offset: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                return self.divisor & 0xFF
            if not self._rx:
                return 0
            byte = self._rx.popleft()
            self._room.notify()
            return byte
        if offset == IER_DLM:
            return (self.divisor >> 8) if dlab else self.ier
        if offset == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRE:
                self.thr_interrupt = False  # reading IIR acknowledges THRE
            return iir | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if offset == LCR:
            return self.lcr
        if offset == MCR:
            return self.mcr
        if offset == LSR:
            lsr = LSR_THRE | LSR_TEMT | self.lsr_errors | (LSR_DR if self._rx else 0)
            self.lsr_errors = 0
            return lsr
        if offset == MSR:
            if self.mcr & MCR_LOOP:
                # loopback wires the modem outputs back to the inputs (the 8250 probe checks this)
                m = self.mcr
                return ((m & MCR_RTS) << 3) | ((m & MCR_DTR) << 5) | ((m & MCR_OUT1) << 4) | ((m & MCR_OUT2) << 4)
            value = self.msr
            self.msr &= ~MSR_DELTA_MASK
            return value
        return self.scr

    def _write(self, offset: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            elif self.mcr & MCR_LOOP:
                self._receive(value)
                self.thr_interrupt = bool(self.ier & IER_THRE)
            else:
                self._output(bytes((value,)))
                self.thr_interrupt = bool(self.ier & IER_THRE)  # sent at once: THR empty again
        elif offset == IER_DLM:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                enabling_thre = value & IER_THRE and not self.ier & IER_THRE
                self.ier = value & 0x0F
                if enabling_thre:
                    self.thr_interrupt = True  # THR is empty, so enabling THRE raises it at once
        elif offset == IIR_FCR:
            self.fifo_enabled = bool(value & FCR_ENABLE)
            if value & FCR_CLEAR_RX:
                self._rx.clear()
                self._room.notify_all()
        elif offset == LCR:
            self.lcr = value
        elif offset == MCR:
            self.mcr = value & 0x1F
        elif offset == SCR:
            self.scr = value

    def _iir(self) -> int:
        if self.ier & IER_RLS and self.lsr_errors:
            return IIR_RLS
        if self.ier & IER_RDA and self._rx:
            return IIR_RDA
        if self.ier & IER_THRE and self.thr_interrupt:
            return IIR_THRE
        if self.ier & IER_MS and self.msr & MSR_DELTA_MASK:
            return IIR_MS
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._iir() != IIR_NONE
        if level != self._irq_level:
            self._irq_level = level
            self._irq(level)

    def _receive(self, byte: int) -> None:
        if len(self._rx) >= RX_BUFFER_LIMIT:
            self.lsr_errors |= LSR_OE
            return
        self._rx.append(byte)

    # -- state -------------------------------------------------------------------------------------

    def save_state(self) -> SerialState:
        with self._lock:
            return SerialState(self.ier, self.lcr, self.mcr, self.lsr_errors, self.msr, self.scr, self.divisor,
                               self.fifo_enabled, self.thr_interrupt, bytes(self._rx))

    def restore_state(self, state: SerialState) -> None:
        with self._lock:
            (self.ier, self.lcr, self.mcr, self.lsr_errors, self.msr, self.scr, self.divisor,
             self.fifo_enabled, self.thr_interrupt) = (
                state.ier, state.lcr, state.mcr, state.lsr_errors, state.msr, state.scr, state.divisor,
                state.fifo_enabled, state.thr_interrupt)
            self._rx = collections.deque(state.rx)
            # The line's level is part of the interrupt controller's restored state: just agree with it.
            self._irq_level = self._iir() != IIR_NONE

    # -- host side ---------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read; blocks while the receive buffer is full."""
        with self._lock:
            for byte in data:
                self._room.wait_for(lambda: len(self._rx) < RX_BUFFER_LIMIT)
                self._rx.append(byte)
                self._update_irq()
