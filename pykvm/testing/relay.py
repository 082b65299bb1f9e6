"""A TCP relay between an FT primary and its standby, for link faults in the tests and the fault
campaign (bench/ft_faults.py):

- `cut()` stops forwarding in both directions without closing anything (a silent link: no FIN,
  no RST, as when a switch dies or a host hangs);
- `slow_down(seconds)` delays every byte by that much from then on, in both directions, order
  kept (a congested or long link);
- `corrupt_after(n)` flips one bit of the byte n bytes further on, primary → standby.
"""

from __future__ import annotations

import queue
import selectors
import socket
import threading
import time


class Relay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0  # bytes primary → standby
        self.connections = 0
        self.delay = 0.0
        self._cut = threading.Event()
        self._flip_at: int | None = None
        self._lock = threading.Lock()
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, name="relay", daemon=True).start()

    @property
    def uri(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def cut(self) -> None:
        """From now on nothing crosses, and nothing is closed: both sides see silence."""
        self._cut.set()

    def slow_down(self, seconds: float) -> None:
        """What arrives from now on is passed on `seconds` (> 0) later; for good, as on a long link."""
        assert seconds > 0, "a slow link stays slow: what is on its way must keep its order"
        self.delay = seconds

    def corrupt_after(self, count: int) -> None:
        """Flip the low bit of the byte `count` bytes past what has been forwarded so far."""
        with self._lock:
            self._flip_at = self.forwarded + count

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self._held += [client, upstream]  # kept open after a cut: a cut link sends no FIN
            self.connections += 1
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, primary: socket.socket, standby: socket.socket) -> None:
        both = (primary, standby)
        outboxes = {primary: _Outbox(standby, both, self._cut), standby: _Outbox(primary, both, self._cut)}
        selector = selectors.DefaultSelector()
        for sock in both:
            selector.register(sock, selectors.EVENT_READ, outboxes[sock])
        connected = True
        while connected and not self._cut.is_set():
            for key, _ in selector.select(0.05):
                if self._cut.is_set() or not self._forward(key.fileobj, key.data, primary):
                    connected = False
                    break
        selector.close()
        for outbox in outboxes.values():
            outbox.put(STOP, 0.0)

    def _forward(self, source: socket.socket, outbox: _Outbox, primary: socket.socket) -> bool:
        """Pass on what `source` sent; False once it closed (passed on, after what came before).
        Until the link is slowed down, bytes go straight through, with TCP's own backpressure."""
        try:
            data = source.recv(1 << 16)
        except OSError:
            data = b""
        if source is primary:
            data = self._maybe_flip(data)
        if self.delay:
            outbox.put(data or CLOSE, self.delay)
            return bool(data)
        try:
            if not data:
                raise OSError("closed by the other side")
            outbox.to.sendall(data)
            return True
        except OSError:
            outbox.close_both()
            return False

    def _maybe_flip(self, data: bytes) -> bytes:
        with self._lock:
            start = self.forwarded
            self.forwarded += len(data)
            at = self._flip_at
            if at is None or not start <= at < self.forwarded:
                return data
            self._flip_at = None
        flipped = bytearray(data)
        flipped[at - start] ^= 1
        return bytes(flipped)

    def close(self) -> None:
        self.listener.close()
        for sock in self._held:
            sock.close()


CLOSE, STOP = b"", None  # what an outbox is given to close the connection, or just to end


class _Outbox:
    """One direction's bytes on their way: each chunk goes out when its delay has passed, in the
    order received; CLOSE closes both sockets once what came before it is out."""

    def __init__(self, to: socket.socket, both: tuple[socket.socket, socket.socket], cut: threading.Event) -> None:
        self.to, self.both, self.cut = to, both, cut
        self._chunks: queue.SimpleQueue[tuple[float, bytes | None]] = queue.SimpleQueue()
        threading.Thread(target=self._send, name="relay-out", daemon=True).start()

    def put(self, data: bytes | None, delay: float) -> None:
        """Send `data` (or CLOSE, or STOP) `delay` seconds from now, after what is queued."""
        self._chunks.put((time.monotonic() + delay, data))

    def _send(self) -> None:
        while True:
            due, data = self._chunks.get()
            if data is STOP or self.cut.wait(max(due - time.monotonic(), 0.0)):
                return  # a cut link loses what was on its way, and closes nothing
            try:
                if data == CLOSE:
                    raise OSError("closed by the other side")
                self.to.sendall(data)
            except OSError:
                self.close_both()
                return

    def close_both(self) -> None:
        for sock in self.both:
            sock.close()
