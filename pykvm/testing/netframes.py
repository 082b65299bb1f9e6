"""Ethernet frames as a host on a guest's link sees them: build and parse Ethernet, ARP, IPv4,
ICMP echo and UDP, and talk to a guest over a frame-per-datagram socket (pykvm's `--net socket:`,
QEMU's `-netdev dgram`). Used by `pykvm demo` (the kv client) and by the tests.

Frames are plain `bytes` (no FCS). Addresses are given as text ("52:54:00:12:34:56", "10.0.2.15").
`FrameSocket` is the test's end of a link that carries one frame per Unix datagram (QEMU's
`-netdev dgram`, pykvm's `--net socket:`); `Peer` is a host on that link with its own addresses,
which pings, sends UDP and waits for the guest's answers.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

BROADCAST = "ff:ff:ff:ff:ff:ff"
ETHERTYPE_IPV4, ETHERTYPE_ARP = 0x0800, 0x0806
ARP_REQUEST, ARP_REPLY = 1, 2
PROTO_ICMP, PROTO_UDP = 1, 17
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
ETH_FRAME_MIN = 60  # shorter frames are padded, as a NIC would

_ETH = struct.Struct("!6s6sH")
_ARP = struct.Struct("!HHBBH6s4s6s4s")
_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_ICMP_ECHO = struct.Struct("!BBHHH")
_UDP = struct.Struct("!HHHH")


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def ip_bytes(ip: str) -> bytes:
    return ipaddress.IPv4Address(ip).packed


def ip_str(ip: bytes) -> str:
    return str(ipaddress.IPv4Address(ip))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071); 0 over data that includes a correct one."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst_mac: str, src_mac: str, ethertype: int, payload: bytes) -> bytes:
    frame = _ETH.pack(mac_bytes(dst_mac), mac_bytes(src_mac), ethertype) + payload
    return frame.ljust(ETH_FRAME_MIN, b"\0")


def arp_request(src_mac: str, src_ip: str, target_ip: str) -> bytes:
    """Broadcast who-has target_ip, tell src_ip."""
    arp = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, ARP_REQUEST, mac_bytes(src_mac), ip_bytes(src_ip),
                    bytes(6), ip_bytes(target_ip))
    return ethernet(BROADCAST, src_mac, ETHERTYPE_ARP, arp)


def arp_reply(src_mac: str, src_ip: str, dst_mac: str, dst_ip: str) -> bytes:
    """src_ip is at src_mac, told to dst_mac/dst_ip."""
    arp = _ARP.pack(1, ETHERTYPE_IPV4, 6, 4, ARP_REPLY, mac_bytes(src_mac), ip_bytes(src_ip),
                    mac_bytes(dst_mac), ip_bytes(dst_ip))
    return ethernet(dst_mac, src_mac, ETHERTYPE_ARP, arp)


def ipv4_packet(src_ip: str, dst_ip: str, proto: int, payload: bytes, *, ident: int = 0, ttl: int = 64) -> bytes:
    header = _IPV4.pack(0x45, 0, _IPV4.size + len(payload), ident, 0x4000, ttl, proto, 0,
                        ip_bytes(src_ip), ip_bytes(dst_ip))
    return header[:10] + struct.pack("!H", checksum(header)) + header[12:] + payload


def icmp_echo(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, ident: int, seq: int,
              data: bytes = b"") -> bytes:
    """An ICMP echo request frame."""
    message = _ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + data
    message = message[:2] + struct.pack("!H", checksum(message)) + message[4:]
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4_packet(src_ip, dst_ip, PROTO_ICMP, message))


def _udp_checksum(src_ip: str, dst_ip: str, datagram: bytes) -> int:
    pseudo = ip_bytes(src_ip) + ip_bytes(dst_ip) + struct.pack("!BBH", 0, PROTO_UDP, len(datagram))
    return checksum(pseudo + datagram) or 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes,
              *, with_checksum: bool = True) -> bytes:
    datagram = _UDP.pack(sport, dport, _UDP.size + len(payload), 0) + payload
    if with_checksum:
        datagram = datagram[:6] + struct.pack("!H", _udp_checksum(src_ip, dst_ip, datagram)) + datagram[8:]
    return ethernet(dst_mac, src_mac, ETHERTYPE_IPV4, ipv4_packet(src_ip, dst_ip, PROTO_UDP, datagram))


@dataclass(frozen=True)
class Arp:
    op: int
    sender_mac: str
    sender_ip: str
    target_mac: str
    target_ip: str


@dataclass(frozen=True)
class Ipv4:
    src: str
    dst: str
    proto: int
    ident: int
    ttl: int
    checksum_ok: bool


@dataclass(frozen=True)
class Icmp:
    type: int
    code: int
    ident: int
    seq: int
    data: bytes
    checksum_ok: bool


@dataclass(frozen=True)
class Udp:
    sport: int
    dport: int
    payload: bytes
    checksum_ok: bool | None  # None: the sender sent none (0)


@dataclass(frozen=True)
class Frame:
    dst: str
    src: str
    ethertype: int
    arp: Arp | None = None
    ip: Ipv4 | None = None
    icmp: Icmp | None = None
    udp: Udp | None = None


def parse_frame(frame: bytes) -> Frame:
    """Decodes what the guests send; raises ValueError on a malformed frame."""
    if len(frame) < _ETH.size:
        raise ValueError(f"a {len(frame)}-byte frame")
    dst, src, ethertype = _ETH.unpack_from(frame)
    fields = dict(dst=mac_str(dst), src=mac_str(src), ethertype=ethertype)
    body = frame[_ETH.size:]
    if ethertype == ETHERTYPE_ARP:
        if len(body) < _ARP.size:
            raise ValueError("short ARP packet")
        _, _, _, _, op, sha, spa, tha, tpa = _ARP.unpack_from(body)
        return Frame(**fields, arp=Arp(op, mac_str(sha), ip_str(spa), mac_str(tha), ip_str(tpa)))
    if ethertype != ETHERTYPE_IPV4:
        return Frame(**fields)
    if len(body) < _IPV4.size:
        raise ValueError("short IPv4 header")
    ver_ihl, _, total, ident, _, ttl, proto, _, src_ip, dst_ip = _IPV4.unpack_from(body)
    hlen = (ver_ihl & 0xF) * 4
    if ver_ihl >> 4 != 4 or hlen < _IPV4.size or not hlen <= total <= len(body):
        raise ValueError(f"bad IPv4 header: version/ihl 0x{ver_ihl:02x}, total length {total}")
    ip = Ipv4(ip_str(src_ip), ip_str(dst_ip), proto, ident, ttl, checksum(body[:hlen]) == 0)
    payload = body[hlen:total]
    if proto == PROTO_ICMP and len(payload) >= _ICMP_ECHO.size:
        icmp_type, code, _, icmp_id, seq = _ICMP_ECHO.unpack_from(payload)
        return Frame(**fields, ip=ip, icmp=Icmp(icmp_type, code, icmp_id, seq, payload[_ICMP_ECHO.size:],
                                                checksum(payload) == 0))
    if proto == PROTO_UDP and len(payload) >= _UDP.size:
        sport, dport, length, sent_sum = _UDP.unpack_from(payload)
        if not _UDP.size <= length <= len(payload):
            raise ValueError(f"bad UDP length {length}")
        datagram = payload[:length]
        ok = None if sent_sum == 0 else _udp_checksum(ip.src, ip.dst, datagram[:6] + b"\0\0" + datagram[8:]) == sent_sum
        return Frame(**fields, ip=ip, udp=Udp(sport, dport, datagram[_UDP.size:], ok))
    return Frame(**fields, ip=ip)


class FrameSocket:
    """A Unix datagram socket bound at `path`, one Ethernet frame per datagram. Frames go to `peer`
    (the VMM's socket; it need not exist yet when this one is bound). Closing removes `path`."""

    def __init__(self, path: str | os.PathLike, peer: str | os.PathLike) -> None:
        self.path, self.peer = os.fspath(path), os.fspath(peer)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def send(self, frame: bytes) -> None:
        self.sock.sendto(frame, self.peer)

    def receive(self, timeout: float) -> bytes | None:
        """The next frame, or None if none came within timeout seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            return self.sock.recv(65536)
        except TimeoutError:
            return None

    def expect(self, match: Callable[[Frame], bool], timeout: float) -> Frame:
        """The first frame within timeout seconds that match accepts; earlier ones are dropped."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            data = self.receive(left)
            if data is not None and match(frame := parse_frame(data)):
                return frame
        raise TimeoutError(f"no matching frame within {timeout} s")

    def close(self) -> None:
        self.sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def __enter__(self) -> FrameSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Peer:
    """A host on the guest's link: resolves the guest with ARP, pings it, talks UDP to it."""

    def __init__(self, link: FrameSocket, guest_ip: str = "10.0.2.15", *, mac: str = "52:54:00:00:00:02",
                 ip: str = "10.0.2.2", timeout: float = 10.0) -> None:
        self.link, self.guest_ip, self.mac, self.ip, self.timeout = link, guest_ip, mac, ip, timeout
        self.guest_mac: str | None = None

    def resolve(self) -> str:
        """ARP for the guest; returns (and remembers) its MAC address."""
        self.link.send(arp_request(self.mac, self.ip, self.guest_ip))
        reply = self.link.expect(lambda f: f.arp is not None and f.arp.op == ARP_REPLY
                                 and f.arp.sender_ip == self.guest_ip and f.dst == self.mac, self.timeout)
        self.guest_mac = reply.arp.sender_mac
        return self.guest_mac

    def ping(self, seq: int, data: bytes = b"", ident: int = 0x1234) -> Frame:
        """Sends an echo request and returns the matching echo reply."""
        self.link.send(icmp_echo(self.mac, self._guest_mac(), self.ip, self.guest_ip, ident, seq, data))
        return self.link.expect(lambda f: f.icmp is not None and f.icmp.type == ICMP_ECHO_REPLY
                                and (f.icmp.ident, f.icmp.seq) == (ident, seq), self.timeout)

    def send_udp(self, dport: int, payload: bytes, sport: int = 40000, *, with_checksum: bool = True) -> None:
        self.link.send(udp_frame(self.mac, self._guest_mac(), self.ip, self.guest_ip, sport, dport, payload,
                                 with_checksum=with_checksum))

    def receive_udp(self, sport: int, dport: int = 40000, timeout: float | None = None) -> Frame:
        """The next datagram from the guest's port sport to our port dport."""
        return self.link.expect(lambda f: f.udp is not None and (f.udp.sport, f.udp.dport) == (sport, dport)
                                and f.ip.dst == self.ip, self.timeout if timeout is None else timeout)

    def udp(self, dport: int, payload: bytes, sport: int = 40000, timeout: float | None = None) -> bytes:
        """Sends a datagram and returns the payload of the guest's reply."""
        self.send_udp(dport, payload, sport)
        return self.receive_udp(dport, sport, timeout).udp.payload

    def _guest_mac(self) -> str:
        return self.guest_mac or self.resolve()
