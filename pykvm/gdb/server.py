"""The gdb server: one TCP connection at a time, speaking the remote serial protocol to a DebugTarget.

A thread accepts a gdb, then serves it: packets in (pykvm.gdb.packets), one reply each, and while
the guest runs, a stop reply when the target posts one (its wake-up pipe) or gdb interrupts
(0x03). When gdb detaches or its connection drops, every breakpoint is taken out and the guest
runs on; another gdb may attach later (the guest then stops where it is). When the guest ends,
gdb gets its exit status (`W`) and the server ends.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
from typing import Callable

from pykvm.gdb import packets as rsp
from pykvm.gdb import registers
from pykvm.gdb.breakpoints import BreakpointError
from pykvm.gdb.stepping import CannotStep
from pykvm.gdb.target import DebugTarget, StopEvent
from pykvm.gdb.virtual import MemoryFault

FEATURES = b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;QStartNoAckMode+" % rsp.MAX_PAYLOAD
E_MEMORY, E_ARGUMENT, E_BREAKPOINT = 0x0E, 0x16, 0x1F


class _Session:
    """One gdb connection."""

    def __init__(self, target: DebugTarget, conn: socket.socket) -> None:
        self.target, self.conn = target, conn
        self.decoder = rsp.Decoder()
        self.acks = True
        self.running = False
        self.step_thread = -1  # Hc: the thread `s` steps (-1/0: the current one)
        self.ended = False  # the guest ended (W sent) or gdb killed it
        self.detached = False

    def send(self, payload: bytes) -> None:
        self.conn.sendall(rsp.encode(payload))

    def report(self, event: StopEvent) -> None:
        self.running = False
        if event.exit_status is not None:
            self.send(rsp.exit_reply(event.exit_status))
            self.ended = True
            return
        self.send(rsp.stop_reply(event.signal, event.thread, swbreak=event.why == "breakpoint",
                                 hwbreak=event.why == "hw-breakpoint"))

    def received(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            if isinstance(event, rsp.Interrupt):
                if self.running:
                    self.report(self.target.interrupt())
            elif isinstance(event, rsp.BadPacket):
                self.conn.sendall(b"-")
            elif isinstance(event, rsp.Packet):
                if self.acks:
                    self.conn.sendall(b"+")
                reply = self.handle(event.payload)
                if reply is not None:
                    self.send(reply)
                if self.ended or self.detached:
                    return

    def handle(self, payload: bytes) -> bytes | None:
        """The reply to one packet; None for the packets answered later (c, s) or never (k)."""
        command = payload[:1]
        try:
            handler = _HANDLERS.get(command)
            if handler is not None:
                return handler(self, payload)
            return self.query(payload)
        except rsp.ProtocolError:
            return rsp.error_reply(E_ARGUMENT)
        except (MemoryFault, registers.RegisterError, LookupError):
            return rsp.error_reply(E_MEMORY)
        except BreakpointError:
            return rsp.error_reply(E_BREAKPOINT)

    def query(self, payload: bytes) -> bytes | None:
        target = self.target
        if payload.startswith(b"qSupported"):
            return FEATURES
        if payload == b"QStartNoAckMode":
            self.send(b"OK")  # acknowledged still; nothing after it is
            self.acks = False
            return None
        if payload.startswith(b"qXfer:features:read:target.xml:"):
            offset, length = rsp.parse_address_length(payload.rsplit(b":", 1)[1])
            document = registers.target_xml()
            chunk = document[offset: offset + length]
            return (b"l" if offset + length >= len(document) else b"m") + chunk
        if payload == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % thread for thread in target.threads)
        if payload == b"qsThreadInfo":
            return b"l"
        if payload == b"qC":
            return b"QC%x" % target.current
        if payload == b"qAttached":
            return b"1"  # gdb detaches (the guest runs on) when it quits
        if payload.startswith(b"qThreadExtraInfo,"):
            thread = rsp.parse_thread(payload.split(b",", 1)[1])
            return f"vCPU {target.vcpu(thread).index}".encode().hex().encode()
        if payload.startswith(b"qSymbol"):
            return b"OK"
        if payload.startswith(b"vKill"):
            self.kill()
            return b"OK"
        return b""  # not supported: gdb falls back (vCont: Hc with c and s)

    # -- packets ---------------------------------------------------------------------------------

    def stop_status(self, payload: bytes) -> bytes:
        event = self.target.stop or self.target.interrupt()
        if event.exit_status is not None:
            return rsp.exit_reply(event.exit_status)
        return rsp.stop_reply(event.signal, event.thread or self.target.current)

    def set_thread(self, payload: bytes) -> bytes:
        thread = rsp.parse_thread(payload[2:])
        if thread > 0:
            self.target.vcpu(thread)  # LookupError for a thread that does not exist
        if payload[1:2] == b"g":
            if thread > 0:
                self.target.current = thread
        else:
            self.step_thread = thread
        return b"OK"

    def thread_alive(self, payload: bytes) -> bytes:
        self.target.vcpu(rsp.parse_thread(payload[1:]))
        return b"OK"

    def read_registers(self, payload: bytes) -> bytes:
        return registers.encode_all(self.target.read_registers())

    def write_registers(self, payload: bytes) -> bytes:
        values = registers.decode_all(rsp.parse_hex_bytes(payload[1:]))
        self.target.write_registers(dict(enumerate(values)))
        return b"OK"

    def read_register(self, payload: bytes) -> bytes:
        number = rsp.parse_hex(payload[1:], "register")
        if number >= len(registers.REGISTERS):
            return rsp.error_reply(E_ARGUMENT)
        return registers.encode_one(number, self.target.read_registers()[number])

    def write_register(self, payload: bytes) -> bytes:
        number_text, equals, value_text = payload[1:].partition(b"=")
        number = rsp.parse_hex(number_text, "register")
        if not equals or number >= len(registers.REGISTERS):
            return rsp.error_reply(E_ARGUMENT)
        raw = rsp.parse_hex_bytes(value_text)
        if len(raw) != registers.REGISTERS[number].bits // 8:
            return rsp.error_reply(E_ARGUMENT)
        self.target.write_registers({number: int.from_bytes(raw, "little")})
        return b"OK"

    def read_memory(self, payload: bytes) -> bytes:
        address, length = rsp.parse_address_length(payload[1:])
        if length > rsp.MAX_PAYLOAD // 2:
            return rsp.error_reply(E_ARGUMENT)
        return self.target.read_memory(address, length).hex().encode()

    def write_memory(self, payload: bytes) -> bytes:
        where, colon, data = payload[1:].partition(b":")
        address, length = rsp.parse_address_length(where)
        content = rsp.parse_hex_bytes(data) if payload[:1] == b"M" else data
        if not colon or len(content) != length:
            return rsp.error_reply(E_ARGUMENT)
        if length:
            self.target.write_memory(address, content)
        return b"OK"

    def breakpoint(self, payload: bytes) -> bytes:
        request = rsp.parse_breakpoint(payload)
        if request.type not in (0, 1):
            return b""  # watchpoints: not supported
        change = self.target.insert_breakpoint if request.insert else self.target.remove_breakpoint
        change(request.address, hardware=request.type == 1)
        return b"OK"

    def resume(self, payload: bytes) -> bytes | None:
        """c/s [ADDR], C/S SIG[;ADDR]: signals mean nothing to a VM and are dropped."""
        argument = payload[1:]
        if payload[:1] in (b"C", b"S"):
            argument = argument.partition(b";")[2]
        if argument:
            self.target.write_registers({registers.NUMBER["rip"]: rsp.parse_hex(argument, "address")})
        step = payload[:1] in (b"s", b"S")
        thread = self.step_thread if self.step_thread > 0 else self.target.current
        self.running = True
        try:
            self.target.resume(step_thread=thread if step else None)
        except (CannotStep, MemoryFault, BreakpointError):
            self.running = False
            return rsp.error_reply(E_MEMORY)
        return None

    def detach(self, payload: bytes) -> bytes:
        self.target.detach()
        self.detached = True
        return b"OK"

    def kill(self, payload: bytes = b"") -> None:
        self.target.kill()
        self.ended = True
        return None


_HANDLERS: dict[bytes, Callable[[_Session, bytes], bytes | None]] = {
    b"?": _Session.stop_status, b"H": _Session.set_thread, b"T": _Session.thread_alive,
    b"g": _Session.read_registers, b"G": _Session.write_registers,
    b"p": _Session.read_register, b"P": _Session.write_register,
    b"m": _Session.read_memory, b"M": _Session.write_memory, b"X": _Session.write_memory,
    b"Z": _Session.breakpoint, b"z": _Session.breakpoint,
    b"c": _Session.resume, b"C": _Session.resume, b"s": _Session.resume, b"S": _Session.resume,
    b"D": _Session.detach, b"k": _Session.kill,
}


class GdbServer:
    """Serves `target` on `listener` from a thread of its own until the guest ends or close()."""

    def __init__(self, target: DebugTarget, listener: socket.socket, log: Callable[[str], None]) -> None:
        self.target, self.listener, self.log = target, listener, log
        self._closing_reader, self._closing = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name="gdb", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        while True:
            conn = self._accept()
            if conn is None:
                return
            session = _Session(self.target, conn)
            try:
                self._session(session)
            except OSError as error:
                self.log(f"pykvm: gdb connection lost: {error.strerror or error}")
            finally:
                conn.close()
            if session.ended:
                return
            if not session.detached:
                self.target.detach()
            self.log("pykvm: gdb detached; the guest runs on")

    def _accept(self) -> socket.socket | None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener, selectors.EVENT_READ)
            selector.register(self._closing_reader, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._closing_reader in ready:
                    return None
                conn, peer = self.listener.accept()
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self.log(f"pykvm: gdb connected from {peer[0]}:{peer[1]}")
                if self.target.stop is None:
                    self.target.interrupt()
                return conn

    def _session(self, session: _Session) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(session.conn, selectors.EVENT_READ)
            selector.register(self.target.wakeup_fd, selectors.EVENT_READ)
            selector.register(self._closing_reader, selectors.EVENT_READ)
            while not (session.ended or session.detached):
                ready = {key.fileobj for key, _ in selector.select()}
                if self.target.wakeup_fd in ready or self._closing_reader in ready:
                    _drain(self.target.wakeup_fd)
                    if session.running:
                        event = self.target.poll()
                        if event is not None:
                            session.report(event)
                if self._closing_reader in ready:
                    return
                if session.conn in ready:
                    data = session.conn.recv(65536)
                    if not data:
                        return
                    session.received(data)

    def close(self) -> None:
        """Stop serving. If the guest ended with gdb attached, its `W` reply has been sent first."""
        self.target.end_posted()  # a guest that ended has its exit ready for gdb
        os.write(self._closing, b"x")
        self._thread.join()
        os.close(self._closing_reader)
        os.close(self._closing)
        self.listener.close()


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass
