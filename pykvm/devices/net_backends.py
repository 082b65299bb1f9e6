"""Where a virtio-net device's frames go: a TAP device, or a datagram socket.

    --net tap:NAME[,mac=M]                 a TAP device (created if absent, brought up)
    --net socket:PATH[,peer=PEER][,mac=M]  a Unix datagram socket bound at PATH, one frame per
                                           datagram; frames go to PEER, or else to whoever sent
                                           the last frame (so a test or another VMM can wire
                                           itself in; QEMU's `-netdev dgram` speaks the same)

A backend moves frames with vectored I/O on the caller's memoryviews: `send(views)` and
`receive_into(views)`, which returns the frame length, None when nothing is waiting, or -1 for a
frame that did not fit (dropped). `next_length()` tells, without reading it, how long the frame
waiting is (None: none is; -1: the backend cannot tell), so the device takes only the receive
buffers that frame needs. `broadcast(views)` sends a frame to everyone on the link: on a socket
link without PEER, to each of the last few addresses that sent to it (`senders()`), which travel
with the guest (LinkMemory) so the next VMM to run it can announce the guest's MAC to them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pykvm import unixsock
from pykvm.errors import ConfigError
from pykvm.state import StateError

TUN_PATH = "/dev/net/tun"
TUNSETIFF, TUNSETOFFLOAD, TUNSETVNETHDRSZ = 0x400454CA, 0x400454D0, 0x400454D8
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR = 0x0002, 0x1000, 0x4000
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
IFF_UP = 0x1
IFNAMSIZ = 16
VNET_HEADER = bytes(12)  # virtio_net_hdr_v1 with no offload: all zeros
# Plain ints: the socket module's flags are enum members, whose | and & cost microseconds a frame
_MSG_TRUNC = int(socket.MSG_TRUNC)
_PEEK_LENGTH = int(socket.MSG_PEEK | socket.MSG_TRUNC)
RECENT_SENDERS = 8  # a socket link remembers this many of the addresses that sent to it


class NetBackend:
    def fileno(self) -> int:
        raise NotImplementedError

    def send(self, views: list[memoryview]) -> None:
        raise NotImplementedError

    def receive_into(self, views: list[memoryview]) -> int | None:
        raise NotImplementedError

    def next_length(self) -> int | None:
        return -1

    def broadcast(self, views: list[memoryview]) -> None:
        """A frame for everyone on the link (a TAP's host side sees every frame anyway)."""
        self.send(views)

    def senders(self) -> list[str]:
        """The addresses that recently sent to this link, oldest first (none but on a socket link)."""
        return []

    def learn(self, senders: list[str]) -> None:
        """Take `senders` as having sent to this link, in that order (see LinkMemory)."""

    def close(self) -> None:
        raise NotImplementedError


@dataclass(frozen=True)
class NetSpec:
    kind: str  # "tap" or "socket"
    target: str  # TAP name or socket path
    peer: str | None = None
    mac: str | None = None

    @classmethod
    def parse(cls, text: str) -> NetSpec:
        kind, sep, rest = text.partition(":")
        if not sep or kind not in ("tap", "socket") or not rest:
            raise ConfigError(f"--net {text!r}: expected tap:NAME or socket:PATH[,peer=PATH] (each with [,mac=M])")
        target, *options = rest.split(",")
        fields: dict[str, str] = {}
        for option in options:
            key, eq, value = option.partition("=")
            if not eq or key not in ("mac", "peer") or (key == "peer" and kind != "socket"):
                raise ConfigError(f"--net {text!r}: unknown option {option!r}")
            fields[key] = value
        if kind == "tap" and (len(target) >= IFNAMSIZ or "/" in target):
            raise ConfigError(f"--net {text!r}: a TAP name has at most {IFNAMSIZ - 1} characters and no '/'")
        return cls(kind, target, fields.get("peer"), fields.get("mac"))

    def open(self, *, take_over: bool = False) -> NetBackend:
        """`take_over`: a socket path is taken even from a live holder (see unixsock.bind)."""
        if self.kind == "tap":
            return TapBackend(self.target)
        return SocketBackend(self.target, self.peer, take_over=take_over)


class TapBackend(NetBackend):
    def __init__(self, name: str) -> None:
        self.name = name
        try:
            self.fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ConfigError(f"--net tap:{name}: cannot open {TUN_PATH}: {error.strerror}") from None
        try:
            ifreq = struct.pack(f"{IFNAMSIZ}sH", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            fcntl.ioctl(self.fd, TUNSETIFF, ifreq)
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", len(VNET_HEADER)))
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, 0)  # no checksum or segmentation offloads
            self._bring_up()
        except OSError as error:
            os.close(self.fd)
            if error.errno in (errno.EPERM, errno.EACCES):
                raise ConfigError(f"--net tap:{name}: creating or attaching a TAP needs root (CAP_NET_ADMIN)") from None
            if error.errno == errno.EBUSY:
                raise ConfigError(f"--net tap:{name}: the TAP is in use by another process", in_use=True) from None
            if error.errno == errno.EINVAL and os.path.exists(f"/sys/class/net/{name}"):
                raise ConfigError(f"--net tap:{name}: {name} is a network interface of another kind, not a TAP "
                                  "(name a new TAP, or an existing one)") from None
            raise ConfigError(f"--net tap:{name}: {error.strerror}") from None
        self._header = bytearray(len(VNET_HEADER))

    def _bring_up(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            ifreq = struct.pack(f"{IFNAMSIZ}sH", self.name.encode(), 0)
            flags = struct.unpack_from(f"{IFNAMSIZ}sH", fcntl.ioctl(sock, SIOCGIFFLAGS, ifreq))[1]
            if not flags & IFF_UP:
                fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(f"{IFNAMSIZ}sH", self.name.encode(), flags | IFF_UP))

    def fileno(self) -> int:
        return self.fd

    def send(self, views: list[memoryview]) -> None:
        try:
            os.writev(self.fd, [VNET_HEADER, *views])
        except BlockingIOError:
            pass  # the host side is not draining: drop, as a full wire would

    def receive_into(self, views: list[memoryview]) -> int | None:
        try:
            length = os.readv(self.fd, [self._header, *views])
        except BlockingIOError:
            return None
        return length - len(VNET_HEADER)

    def close(self) -> None:
        os.close(self.fd)


class SocketBackend(NetBackend):
    def __init__(self, path: str, peer: str | None = None, *, take_over: bool = False) -> None:
        self.path, self.peer = path, peer
        self.fixed_peer = peer is not None
        self._senders: dict[str, None] = {}  # the recent senders, oldest first (a bounded ordered set)
        self.sock = unixsock.bind(path, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK, f"--net socket:{path}",
                                  take_over=take_over)
        self._peek = bytearray(1)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, views: list[memoryview]) -> None:
        if self.peer is None:
            return  # nobody has spoken to us yet: a frame to nowhere, like an unplugged cable
        try:
            self.sock.sendmsg(views, [], 0, self.peer)
        except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
            pass  # peer gone or not draining: the frame is lost, as on a wire

    def receive_into(self, views: list[memoryview]) -> int | None:
        try:
            length, _, flags, sender = self.sock.recvmsg_into(views)
        except BlockingIOError:
            return None
        if sender and sender != self.peer and not self.fixed_peer:  # the usual case costs one compare
            self._remember(sender)
        if flags & _MSG_TRUNC:
            return -1
        return length

    def broadcast(self, views: list[memoryview]) -> None:
        if self.fixed_peer:
            self.send(views)
            return
        for sender in self._senders:
            try:
                self.sock.sendmsg(views, [], 0, sender)
            except (BlockingIOError, ConnectionRefusedError, FileNotFoundError):
                pass  # gone or not draining, as in send()

    def senders(self) -> list[str]:
        return [s for s in self._senders if isinstance(s, str)]  # not abstract ones (bytes)

    def learn(self, senders: list[str]) -> None:
        """Only broadcasts go to learned senders; the peer stays unset until one speaks, so what the
        guest sends before then goes nowhere, as it always has (after a takeover: replies that
        the primary may have delivered already, which a client would take for new ones)."""
        if not self.fixed_peer:
            for sender in senders:
                self._add_sender(sender)

    def _remember(self, sender: str) -> None:
        self.peer = sender
        self._add_sender(sender)

    def _add_sender(self, sender: str) -> None:
        """`sender` becomes the newest of the recent senders."""
        self._senders.pop(sender, None)
        self._senders[sender] = None
        if len(self._senders) > RECENT_SENDERS:
            del self._senders[next(iter(self._senders))]

    def next_length(self) -> int | None:
        try:  # with MSG_TRUNC the call returns the datagram's whole length
            return self.sock.recv_into(self._peek, 1, _PEEK_LENGTH)
        except BlockingIOError:
            return None

    def close(self) -> None:
        unixsock.close(self.sock, self.path)


@dataclass
class LinkMemoryState:
    senders: list[list[str]]  # per NIC, in order: who recently sent to its link, oldest first


class LinkMemory:
    """What the NICs' links have learned: who sent to them. The network's state rather than the
    guest's, but it goes where the guest goes (FT syncs, migration, snapshots): a standby taking
    over, or a migration target, opens a fresh socket that nobody has sent to yet, and must still
    announce the guest's MAC to the peers. `backends()` gives each NIC's backend (None: not open)."""

    state_type = LinkMemoryState

    def __init__(self, backends: Callable[[], list[NetBackend | None]]) -> None:
        self._backends = backends
        self._restored: list[list[str]] = [[] for _ in backends()]  # for backends opened later

    def save_state(self) -> LinkMemoryState:
        return LinkMemoryState([backend.senders() if backend is not None else list(restored)
                                for backend, restored in zip(self._backends(), self._restored)])

    def restore_state(self, state: LinkMemoryState) -> None:
        if len(state.senders) != len(self._restored):
            raise StateError(f"link memory for {len(state.senders)} NICs, this machine has {len(self._restored)}")
        self._restored = [list(senders) for senders in state.senders]
        for backend, senders in zip(self._backends(), self._restored):
            if backend is not None:
                backend.learn(senders)

    def opened(self, index: int, backend: NetBackend) -> NetBackend:
        """NIC `index`'s backend, just opened: it learns what the link had learned."""
        backend.learn(self._restored[index])
        return backend
