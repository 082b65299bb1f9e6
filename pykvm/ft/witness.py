"""The witness: a third party that decides, when primary and standby lose each other, which one
of them may run the guest on its own (fencing against split brain).

A cut link looks, from each side, exactly like the other side's death. So neither may decide
alone: each asks the witness to advance the **epoch** from the value both agreed on at the
handshake to the next one. The witness does this as an atomic compare-and-swap (VMware FT's
test-and-set on shared storage), so of two sides asking for the same step exactly one wins; the
loser fences itself. A side that cannot reach the witness decides nothing: it releases no output
and keeps asking. Safety is never traded for availability.

Two backends:
- `file:PATH` — an epoch record in a file on a file system both sides see, with working POSIX
  locks: lock, compare, write, fsync. No daemon; the file is created if absent.
- `etcd:HOST:PORT[/PREFIX]` — an etcd cluster (v3 API through its JSON gateway): a transaction
  compares the record's value and writes the next one; the winner also keeps a `holder` key
  alive under a lease, so who runs the guest is visible, and forgotten when that side vanishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import xxhash

from pykvm.errors import ConfigError

RECORD_SIZE = 512  # one pwrite of one sector: a record is never half old, half new
LOCK_PATIENCE = 1.0  # seconds to wait for the record's lock before reporting the witness unreachable
ETCD_TIMEOUT = 2.0
HOLDER_TTL = 5  # seconds (etcd leases have whole seconds)


class WitnessUnavailable(Exception):
    """The witness cannot be asked now (unreachable, unwritable, locked too long): decide nothing."""


class WitnessDamaged(WitnessUnavailable):
    """The witness answered with a record that is not ours or is corrupt: decide nothing."""


@dataclass(frozen=True)
class Epoch:
    """One epoch record: its number and who won it (epoch 0: no pair has ever used this witness)."""

    number: int
    owner: str = ""
    raw: bytes = field(default=b"", compare=False, repr=False)  # as stored, for the compare-and-swap

    def encode(self) -> bytes:
        body = json.dumps({"epoch": self.number, "owner": self.owner}, sort_keys=True)
        return json.dumps({"pykvm-witness": 1, "record": body, "xxh3": xxhash.xxh3_64_hexdigest(body.encode())}).encode()

    @classmethod
    def decode(cls, raw: bytes, where: str) -> Epoch:
        text = raw.rstrip(b"\0").strip()
        if not text:
            return cls(0, "", raw)
        try:
            outer = json.loads(text)
            body = outer["record"]
            if outer.get("pykvm-witness") != 1 or xxhash.xxh3_64_hexdigest(body.encode()) != outer["xxh3"]:
                raise ValueError("checksum or format mismatch")
            inner = json.loads(body)
            number, owner = inner["epoch"], inner["owner"]
            if not isinstance(number, int) or number < 0 or not isinstance(owner, str):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError) as error:
            raise WitnessDamaged(f"the epoch record at {where} is damaged ({error})") from None
        return cls(number, owner, raw)


class Witness(Protocol):
    uri: str

    def read(self) -> Epoch:
        """The current epoch record. Raises WitnessUnavailable."""

    def claim(self, seen: Epoch, owner: str) -> Epoch | None:
        """Atomically: if the record is still `seen`, make `owner` the winner of the next epoch
        and return that record; if someone else moved it first, return None (we lost).
        Raises WitnessUnavailable (nothing decided)."""

    def close(self) -> None: ...


def open_witness(uri: str) -> Witness:
    """`file:PATH` or `etcd:HOST:PORT[/PREFIX]`; a malformed URI is a ConfigError."""
    scheme, _, rest = uri.partition(":")
    if scheme == "file" and rest:
        return FileWitness(uri, rest)
    if scheme == "etcd" and rest:
        address, _, prefix = rest.partition("/")
        host, _, port = address.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return EtcdWitness(uri, host.strip("[]"), int(port), "/" + prefix.strip("/") if prefix else "/pykvm")
    raise ConfigError(f"--ft-witness {uri!r}: expected file:PATH or etcd:HOST:PORT[/PREFIX]")


def side_name(role: str) -> str:
    """Who claims: the role, the process and the host, for the record and the logs."""
    return f"{role} pid {os.getpid()} on {socket.gethostname()}"


class FileWitness:
    def __init__(self, uri: str, path: str) -> None:
        self.uri, self.path = uri, os.path.abspath(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise WitnessUnavailable(f"cannot open the witness file {self.path}: {error.strerror}") from None
        try:
            deadline = time.monotonic() + LOCK_PATIENCE
            while True:  # POSIX locks die with their holder; a holder that hangs must not hang us
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as error:
                    if error.errno not in (errno.EACCES, errno.EAGAIN) or time.monotonic() > deadline:
                        raise WitnessUnavailable(f"cannot lock the witness file {self.path}: "
                                                 f"{error.strerror}") from None
                    time.sleep(0.005)  # a lock attempt, not synchronisation: lockf has no timeout
            yield fd
        finally:
            os.close(fd)  # releases the lock

    def _read(self, fd: int) -> Epoch:
        try:
            raw = os.pread(fd, RECORD_SIZE + 1, 0)
        except OSError as error:
            raise WitnessUnavailable(f"cannot read the witness file {self.path}: {error.strerror}") from None
        if len(raw) > RECORD_SIZE:
            raise WitnessDamaged(f"the epoch record at {self.path} is damaged (longer than a record)")
        return Epoch.decode(raw, self.path)

    def read(self) -> Epoch:
        with self._locked() as fd:
            return self._read(fd)

    def claim(self, seen: Epoch, owner: str) -> Epoch | None:
        with self._locked() as fd:
            if self._read(fd) != seen:
                return None
            won = Epoch(seen.number + 1, owner)
            record = won.encode().ljust(RECORD_SIZE, b"\0")
            try:
                os.pwrite(fd, record, 0)
                os.fsync(fd)  # the decision holds once it is on disk, not before
            except OSError as error:
                raise WitnessUnavailable(f"cannot write the witness file {self.path}: {error.strerror}") from None
            return Epoch(won.number, owner, record)

    def close(self) -> None:
        pass


class EtcdWitness:
    def __init__(self, uri: str, host: str, port: int, prefix: str) -> None:
        try:
            import etcd3gw  # only etcd users pay for its import (requests)
        except ImportError:
            raise ConfigError("an etcd witness needs the etcd3gw package (pip install etcd3gw)") from None
        self.uri = uri
        self.key, self.holder_key = f"{prefix}/epoch", f"{prefix}/holder"
        self._client = etcd3gw.Etcd3Client(host=host, port=port, timeout=ETCD_TIMEOUT, api_path="/v3/")
        self._lease = None
        self._stop = threading.Event()

    @contextlib.contextmanager
    def _asking(self, what: str) -> Iterator[None]:
        import requests
        from etcd3gw import exceptions

        try:
            yield
        except (requests.RequestException, exceptions.Etcd3Exception, OSError, ValueError) as error:
            why = str(error) or type(error).__name__  # etcd3gw's errors often carry no message
            raise WitnessUnavailable(f"etcd at {self.uri} did not answer ({what}): {why}") from None

    def read(self) -> Epoch:
        with self._asking("read"):
            values = self._client.get(self.key)
        return Epoch.decode(values[0] if values else b"", self.uri)

    def claim(self, seen: Epoch, owner: str) -> Epoch | None:
        won = Epoch(seen.number + 1, owner)
        record = won.encode()
        with self._asking("claim"):
            if seen.number == 0 and not seen.raw:
                ok = self._client.create(self.key, record)
            else:
                ok = self._client.replace(self.key, seen.raw, record)
        if not ok:
            return None
        self._hold(owner)
        return Epoch(won.number, owner, record)

    def _hold(self, owner: str) -> None:
        """Show who runs the guest under a lease kept alive by a thread (best effort: the epoch
        alone decides; the holder key only tells an operator, and vanishes with its side)."""
        try:
            with self._asking("lease"):
                self._lease = self._client.lease(ttl=HOLDER_TTL)
                self._client.put(self.holder_key, owner, lease=self._lease)
        except WitnessUnavailable:
            return
        threading.Thread(target=self._keep_alive, name="witness-lease", daemon=True).start()

    def _keep_alive(self) -> None:
        while not self._stop.wait(HOLDER_TTL / 3):
            with contextlib.suppress(WitnessUnavailable), self._asking("keep-alive"):
                self._lease.refresh()

    def close(self) -> None:
        self._stop.set()
