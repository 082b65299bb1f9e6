"""Host-side helpers for the virtio guest tests: the Ethernet frame tools (kept in the package as
`pykvm.testing.netframes`, which `pykvm demo` uses too), the `blk` guest's disk pattern, and
sockets made inside a network namespace."""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from typing import Callable

import numpy as np

from pykvm.testing.netframes import (  # noqa: F401  (re-exported for the tests)
    ARP_REPLY, ARP_REQUEST, BROADCAST, ETHERTYPE_ARP, ETHERTYPE_IPV4, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
    PROTO_ICMP, PROTO_UDP, Arp, Frame, FrameSocket, Icmp, Ipv4, Peer, Udp, arp_reply, arp_request, checksum,
    ethernet, icmp_echo, ip_bytes, ip_str, ipv4_packet, mac_bytes, mac_str, parse_frame, udp_frame,
)


def blk_pattern(offset: int, length: int, seed: int) -> bytes:
    """What the `blk` guest writes at disk bytes [offset, offset + length): the little-endian u64 at
    each offset o (a multiple of 8) is (o * 0x9E3779B97F4A7C15) ^ seed, mod 2**64."""
    if offset % 8 or length % 8:
        raise ValueError("offset and length must be multiples of 8")
    o = np.arange(offset, offset + length, 8, dtype=np.uint64)
    with np.errstate(over="ignore"):
        words = o * np.uint64(0x9E3779B97F4A7C15) ^ np.uint64(seed)
    return words.astype("<u8").tobytes()


CLONE_NEWNET = 0x40000000


def socket_in_netns(name: str, make: Callable[[], socket.socket]) -> socket.socket:
    """`make()` run on a thread that entered network namespace `name`: the socket it returns stays
    in that namespace and is usable from any thread afterwards (setns changes the calling
    thread's namespace only; Python 3.11 has no os.setns, libc's does it)."""
    made: list[socket.socket | BaseException] = []

    def enter_and_make() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(make())
        except BaseException as error:  # reported in the caller's thread
            made.append(error)

    thread = threading.Thread(target=enter_and_make)
    thread.start()
    thread.join(10)
    if not made or isinstance(made[0], BaseException):
        raise RuntimeError(f"cannot make a socket in network namespace {name}: {made[0] if made else 'timeout'}")
    return made[0]
