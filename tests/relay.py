"""A TCP relay between an FT primary and its standby, for injecting link faults:
`cut()` stops forwarding in both directions without closing anything (a silent link: no FIN, no
RST, as when a switch dies or a host hangs); `corrupt_after(n)` flips one bit of the byte n bytes
further on in the primary → standby direction."""

from __future__ import annotations

import selectors
import socket
import threading


class Relay:
    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.forwarded = 0  # bytes primary → standby
        self.connections = 0
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
        selector = selectors.DefaultSelector()
        selector.register(primary, selectors.EVENT_READ, standby)
        selector.register(standby, selectors.EVENT_READ, primary)
        while not self._cut.is_set():
            for key, _ in selector.select(0.05):
                if self._cut.is_set():
                    break
                try:
                    data = key.fileobj.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:  # a real close on one side is passed on as a close
                    primary.close(), standby.close()
                    return
                if key.fileobj is primary:
                    data = self._maybe_flip(data)
                try:
                    key.data.sendall(data)
                except OSError:
                    primary.close(), standby.close()
                    return
        selector.close()

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
