"""A private LAN for guests on TAP links, in a network namespace of its own: a bridge holding the
host side's address (10.0.2.2/24, the guests' default gateway) and TAPs on it, one per VMM. An FT
pair takes one TAP each: the standby's TAP carries nothing until it takes over, and its announce
(RARP) is what moves the bridge's idea of where the guest's MAC lives. Clients are sockets made
inside the namespace, so they talk to the guest through the host kernel's own TCP/IP.

Needs root and iproute2. The VMMs run inside with `prefix` before their command line."""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import threading
import uuid
from typing import Callable, TypeVar

HOST_IP, GUEST_IP, PREFIX_LEN = "10.0.2.2", "10.0.2.15", 24
BRIDGE = "br0"
BRIDGE_MAC = "02:00:00:00:00:02"  # fixed: a bridge otherwise takes its ports' lowest MAC, which moves
CLONE_NEWNET = 0x40000000
ETH_P_ALL, SOL_PACKET, PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC = 0x0003, 263, 1, 1
T = TypeVar("T")


class GuestLan:
    def __init__(self, taps: tuple[str, ...] = ("tap0",)) -> None:
        self.name = f"pykvm-lan-{uuid.uuid4().hex[:8]}"
        self.taps = taps
        self.prefix = ("ip", "netns", "exec", self.name)
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        try:
            self._ip("link", "set", "lo", "up")  # for an FT pair's own connection
            self._ip("link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge", "forward_delay", "0")
            self._ip("addr", "add", f"{HOST_IP}/{PREFIX_LEN}", "dev", BRIDGE)
            self._ip("link", "set", BRIDGE, "up")
            for tap in taps:
                self._ip("tuntap", "add", "dev", tap, "mode", "tap")
                self._ip("link", "set", tap, "master", BRIDGE)
                self._ip("link", "set", tap, "up")
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def inside(self, make: Callable[[], T]) -> T:
        """`make()` run inside the LAN's namespace (see run_in_netns); threads it starts are
        inside too (a relay between the VMMs)."""
        return run_in_netns(self.name, make)

    def connect(self, port: int, timeout: float = 30.0, *, receive_buffer: int | None = None) -> socket.socket:
        """A TCP connection from the host side to the guest's `port`; `timeout` bounds each call
        on it. `receive_buffer` (bytes) makes the host's receive window small."""
        sock = self.inside(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        try:
            sock.connect((GUEST_IP, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def packet_socket(self, *, promiscuous: bool = False) -> socket.socket:
        """An AF_PACKET socket on the bridge: whole Ethernet frames in and out (a test's raw
        segments, a SYN flood). `promiscuous`: it also sees frames addressed to other MACs."""
        sock = self.inside(lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL)))
        sock.bind((BRIDGE, 0))
        if promiscuous:
            index = self.inside(lambda: socket.if_nametoindex(BRIDGE))
            sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, struct.pack("iHH8s", index, PACKET_MR_PROMISC, 0, b""))
        return sock

    def set_host_mac(self, mac: str) -> None:
        """Give the host's side (the bridge) another MAC: frames the guest sends to the old one
        are lost from then on, while the host's frames still reach the guest."""
        self._ip("link", "set", BRIDGE, "address", mac)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)

    def __enter__(self) -> GuestLan:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_in_netns(name: str, make: Callable[[], T]) -> T:
    """`make()` run on a thread that entered network namespace `name`: a socket it makes stays in
    it and is usable from any thread. (setns changes the calling thread only; Python 3.11 has no
    os.setns, libc's does it.)"""
    made: list = []

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
        raise RuntimeError(f"cannot work in network namespace {name}: {made[0] if made else 'timeout'}")
    return made[0]
