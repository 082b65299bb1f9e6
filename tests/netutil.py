"""Host-side helpers for the virtio guest tests: the Ethernet frame tools (kept in the package as
`pykvm.testing.netframes`, which `pykvm demo` uses too) and the `blk` guest's disk pattern.
(Sockets made inside a network namespace: pykvm.testing.lan.run_in_netns.)"""

from __future__ import annotations

import socket

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



def send_a_stray_pages_frame(port: int, page: int) -> None:
    """Connect to 127.0.0.1:`port` as a peer that is not ours and send one well-formed frame of
    page data (page `page` of slot 0, all 0xA5) before any HELLO, then read until dropped."""
    from pykvm.memory import PAGE_SIZE
    from pykvm.transfer import wire

    frame = wire.page_frame(0, 0, np.array([page], dtype="<u4"), [b"\xa5" * PAGE_SIZE])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"".join(bytes(part) for part in frame))
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass
        except OSError:
            pass  # a reset: it dropped us with some of our bytes unread
