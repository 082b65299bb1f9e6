"""The plain channel's vectored send: many buffers, of every size, through a socket with a
timeout (which sends only part of a large batch at a time) arrive whole and in order."""

from __future__ import annotations

import random
import socket
import threading

from pykvm.transfer.channel import MAX_IOVECS, send_buffers


def test_partial_sends_go_on_from_the_first_byte_not_sent():
    rng = random.Random(5)
    buffers: list = [bytes([i % 251]) * rng.choice([0, 1, 7, 4096, 100_000]) for i in range(3 * MAX_IOVECS + 5)]
    buffers = [memoryview(b) if i % 2 else b for i, b in enumerate(buffers)]
    expected = b"".join(bytes(b) for b in buffers)
    sender, receiver = socket.socketpair()
    sender.settimeout(30)  # a socket with a timeout: sendmsg returns after what fits
    received = bytearray()

    def read() -> None:
        while chunk := receiver.recv(1 << 16):
            received.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    with sender, receiver:
        assert send_buffers(sender, buffers) == len(expected)
        sender.shutdown(socket.SHUT_WR)
        reader.join(60)
    assert bytes(received) == expected
    assert [bytes(b) for b in buffers] == [bytes([i % 251]) * len(b) for i, b in enumerate(buffers)]  # untouched
