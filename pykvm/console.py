"""Where the guest's serial port goes: `--serial stdio` (terminal in and out), `file:PATH`, `none`."""

from __future__ import annotations

import os
import sys
import termios
import threading
from typing import Callable

from pykvm.errors import ConfigError


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class SerialConsole:
    """The host end of COM1. Call attach() with the UART's feed() once the machine exists."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._out_fd: int | None = None
        self._own_fd = False
        self._failed = False  # writing failed once: output is dropped from then on
        self._input = False
        self._saved_tty: list | None = None
        if spec == "stdio":
            self._out_fd = sys.stdout.fileno() if sys.stdout is not None else None  # None: stdout closed
            self._input = True
        elif spec.startswith("file:") and len(spec) > 5:
            path = spec[5:]
            try:
                self._out_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            except OSError as error:
                raise ConfigError(f"--serial {spec}: cannot open {path}: {error.strerror}") from None
            self._own_fd = True
        elif spec != "none":
            raise ConfigError(f"--serial {spec!r}: expected stdio, file:PATH or none")

    def output(self, data: bytes) -> None:
        if self._out_fd is not None and not self._failed:
            try:
                _write_all(self._out_fd, data)
            except BrokenPipeError:
                self._failed = True  # the reader went away; the guest keeps running, as with a closed terminal
            except OSError as error:  # a full disk, a closed descriptor: said once, the guest runs on
                self._failed = True
                where = "stdout" if self.spec == "stdio" else self.spec[5:]
                print(f"pykvm: serial output to {where} failed ({error.strerror}); "
                      "the guest's COM1 output is dropped from here on", file=sys.stderr, flush=True)

    def attach(self, feed: Callable[[bytes], None]) -> None:
        """Start forwarding stdin to the guest (for `stdio`). Keys reach the guest one by one:
        the terminal leaves line mode and echo off, but keeps ^C for the VMM."""
        if not self._input:
            return
        fd = sys.stdin.fileno() if sys.stdin is not None else -1
        if fd < 0:
            return
        if os.isatty(fd):
            self._saved_tty = termios.tcgetattr(fd)
            raw = termios.tcgetattr(fd)
            raw[3] &= ~(termios.ICANON | termios.ECHO)  # lflags
            raw[6][termios.VMIN], raw[6][termios.VTIME] = 1, 0
            termios.tcsetattr(fd, termios.TCSANOW, raw)
        threading.Thread(target=self._pump, args=(fd, feed), name="serial-stdin", daemon=True).start()

    @staticmethod
    def _pump(fd: int, feed: Callable[[bytes], None]) -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            feed(data)

    def close(self) -> None:
        if self._saved_tty is not None:
            termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._saved_tty)
            self._saved_tty = None
        if self._own_fd and self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None
