"""The control socket (`--control PATH`): a Unix stream socket speaking JSON lines, one request,
one reply, in the spirit of QMP.

    {"cmd": "query-status"}                        {"ok": true, "status": "running", "paused_by": []}
    {"cmd": "stop"} / {"cmd": "cont"}              the user's pause of every vCPU / its release
    {"cmd": "snapshot", "file": PATH}              write a snapshot (the guest pauses meanwhile); an
                                                   existing file only with "overwrite": true
    {"cmd": "query-vcpus"}                         each vCPU's RIP and exit count
    {"cmd": "migrate", "uri": "tcp:HOST:PORT"}     live-migrate to `pykvm run --incoming`
    {"cmd": "quit"}                                stop the VM; the VMM exits 0

Errors are replies too ({"ok": false, "error": "..."}); the VMM keeps running whatever a client
sends, and every request gets its reply: a line that is not JSON, nests too deep, runs over 64 KiB,
names an unknown command or field, or holds a value of the wrong type is answered with an error.
Commands run one at a time, except query-status and ft-stats, which never wait: a command that
finds another still running (a migration, a snapshot) waits up to BUSY_WAIT, then is answered
"busy". A snapshot is written only to a new or regular file, by an absolute path (`pykvm ctl`
resolves a relative one), never onto the VMM's own sockets or disks; a failed one leaves nothing.

The user's `stop` is one pause among others (a snapshot's, an FT sync's, a migration's; see
RunControl): a second `stop` changes nothing, and `cont` releases only the user's pause, so the
guest runs when nothing else holds it. `paused_by` names the holders ("ctl stop", "ft sync", ...);
the status is "paused" while there is any.

The socket is private: created 0600 whatever the umask, and a client whose uid (SO_PEERCRED) is
neither ours nor root's is answered with an error and disconnected; nothing it sends is read as a
command.
At most MAX_CLIENTS connections are served at once; the next ones are told so and disconnected
(past as many again, closed unanswered), so that a client holding connections costs neither
unbounded threads nor descriptors, and an accept that fails for want of either is tried again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import struct
import sys
import threading
import time
from typing import Any, Callable

from pykvm.transfer.tls import TlsCredentials
from pykvm import unixsock
from pykvm.errors import ConfigError
from pykvm.machine import Machine
from pykvm.run_control import Pause, RunState

MAX_REQUEST = 64 * 1024
MAX_CLIENTS = 32  # connections served at once; as many more are told so, any beyond are closed unanswered
ACCEPT_RETRY = 0.1  # seconds between accepts while the process is out of file descriptors or memory
_ACCEPT_TRANSIENT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED,
                               errno.EPROTO, errno.EINTR})
MAX_REPLY = 16 << 20
BUSY_WAIT = 10.0  # seconds a command waits for the one running before it
LOCK_FREE = frozenset({"query-status", "ft-stats"})  # read-only: answered even while another command runs
# The fields a request may carry besides "cmd" (a command not listed takes none).
FIELDS: dict[str, frozenset[str]] = {"snapshot": frozenset({"file", "overwrite"}), "migrate": frozenset({"uri"}),
                                     "ft-protect": frozenset({"uri"})}
_PEER_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class CommandError(Exception):
    """A request that cannot be carried out; its message goes back to the client."""


class NoReply(Exception):
    """`request`: the VMM did not answer in time, or answered something that is not a reply."""


class ControlServer:
    def __init__(self, path: str, machine: Machine, *, tls: TlsCredentials | None = None) -> None:
        """`tls`: the credentials `migrate` reaches its target with (None: in the clear)."""
        self.path, self.machine, self.tls = path, machine, tls
        self.sock = unixsock.bind(path, socket.SOCK_STREAM, f"--control {path}")
        os.chmod(path, 0o600)  # before listen(): nobody can connect while the mode is the umask's
        self.sock.listen(4)
        self._command_lock = threading.Lock()
        self._running: str | None = None  # the command holding the lock, for a "busy" reply
        self._user_pause: Pause | None = None  # held from `stop` to `cont`
        self._closed = threading.Event()
        self._clients_lock = threading.Lock()
        self._clients = self._refusing = 0  # connections being served, being told why not
        self._vetoes: dict[str, Callable[[], str | None]] = {}
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "query-status": self._query_status,
            "stop": self._stop,
            "cont": self._cont,
            "snapshot": self._snapshot,
            "query-vcpus": self._query_vcpus,
            "migrate": self._migrate,
            "quit": self._quit,
        }
        threading.Thread(target=self._accept, name="control", daemon=True).start()

    def register(self, name: str, handler: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        """Add a command (the FT layer adds its own)."""
        self.handlers[name] = handler

    def refuse(self, name: str, why: Callable[[], str | None]) -> None:
        """Refuse command `name` whenever `why()` gives a reason, asked once the command's turn
        has come (the FT layer: no migration of a guest a standby protects)."""
        self._vetoes[name] = why

    def close(self) -> None:
        self._closed.set()
        unixsock.close(self.sock, self.path)

    # -- connections -----------------------------------------------------------------------------

    def _accept(self) -> None:
        """Each connection served in a thread of its own, up to MAX_CLIENTS. Out of descriptors or
        memory (a client holding many connections), it waits and accepts again: it ends only with
        the socket, or the control socket would be dead for good once the clients had gone."""
        out_of_resources = False
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError as error:
                if self._closed.is_set() or error.errno not in _ACCEPT_TRANSIENT:
                    return
                if not out_of_resources:
                    print(f"pykvm: control: cannot accept a connection ({error.strerror}); trying again",
                          file=sys.stderr, flush=True)
                out_of_resources = True
                self._closed.wait(ACCEPT_RETRY)
                continue
            out_of_resources = False
            self._start_client(conn)

    def _start_client(self, conn: socket.socket) -> None:
        refusal = _refusal(conn)
        with self._clients_lock:
            if refusal is None and self._clients >= MAX_CLIENTS:
                refusal = f"too many control connections ({MAX_CLIENTS} open): close one, then ask again"
            if refusal is not None and self._refusing >= MAX_CLIENTS:
                conn.close()  # a flood: no thread, no descriptor kept for it
                return
            if refusal is None:
                self._clients += 1
            else:
                self._refusing += 1
        if refusal is None:
            serve, args, name = self._serve, (conn,), "control-client"
        else:
            serve, args, name = _refuse, (conn, refusal), "control-refused"
        try:
            threading.Thread(target=self._counted, args=(serve, args, refusal), name=name, daemon=True).start()
        except RuntimeError:  # no thread to be had: the client sees its connection closed
            self._release(refusal)
            conn.close()

    def _counted(self, serve: Callable, args: tuple, refusal: str | None) -> None:
        try:
            serve(*args)
        finally:
            self._release(refusal)

    def _release(self, refusal: str | None) -> None:
        with self._clients_lock:
            if refusal is None:
                self._clients -= 1
            else:
                self._refusing -= 1

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError), conn.makefile("rb") as reader:
            while True:
                line = reader.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST and not line.endswith(b"\n"):
                    while (rest := reader.readline(MAX_REQUEST)) and not rest.endswith(b"\n"):
                        pass  # the rest of an oversized line is not a request of its own
                conn.sendall(json.dumps(self.handle_line(line)).encode() + b"\n")

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """The reply to one request line; whatever the line holds, a reply."""
        try:
            return self._handle(line)
        except Exception as error:  # a bug must not cost the client its reply nor the VMM this thread
            print(f"pykvm: control: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            return {"ok": False, "error": f"internal error: {type(error).__name__}: {error}"}

    def _handle(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
        try:
            request = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not a JSON object"}
        except RecursionError:
            return {"ok": False, "error": "not a request: JSON nested too deep"}
        if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
            return {"ok": False, "error": 'expected {"cmd": NAME, ...}'}
        name = request["cmd"]
        handler = self.handlers.get(name)
        if handler is None:
            return {"ok": False, "error": f"unknown command {name!r} (known: {', '.join(self.handlers)})"}
        extra = sorted(set(request) - {"cmd"} - FIELDS.get(name, frozenset()))
        if extra:
            return {"ok": False, "error": f"{name} takes no {', '.join(map(repr, extra))}"}
        if name in LOCK_FREE:
            return self._call(name, handler, request)
        if not self._command_lock.acquire(timeout=BUSY_WAIT):
            return {"ok": False, "error": f"busy: {self._running} is still running (ask again when it is done)"}
        try:  # (a veto is asked under the lock: no other command changes its answer meanwhile)
            self._running = name
            return self._call(name, handler, request)
        finally:
            self._running = None
            self._command_lock.release()

    def _call(self, name: str, handler: Callable[[dict[str, Any]], dict[str, Any]],
              request: dict[str, Any]) -> dict[str, Any]:
        veto = self._vetoes.get(name)
        refusal = veto() if veto is not None else None
        if refusal is not None:
            return {"ok": False, "error": f"{name}: {refusal}"}
        try:
            return {"ok": True, **handler(request)}
        except (CommandError, ConfigError, OSError) as error:  # (a migration's error is a CommandError)
            return {"ok": False, "error": str(error)}

    # -- commands ----------------------------------------------------------------------------------

    def _query_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._status()

    def _stop(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_live()
        if self._user_pause is None:
            self._user_pause = self.machine.vm.pause("ctl stop")
        return self._status()

    def _cont(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_live()
        if self._user_pause is not None:
            self.machine.vm.resume(self._user_pause)
            self._user_pause = None
        return self._status()

    def _status(self) -> dict[str, Any]:
        state, holders = self.machine.vm.control.status()
        return {"status": state.value, "paused_by": holders}

    def _snapshot(self, request: dict[str, Any]) -> dict[str, Any]:
        path = _string(request, "file")
        overwrite = request.get("overwrite", False)
        if not isinstance(overwrite, bool):
            raise CommandError("snapshot: 'overwrite' is true or false")
        self._require_live()
        self._check_snapshot_path(path)
        if not overwrite and os.path.lexists(path):  # checked again, atomically, by save
            raise CommandError(f"{path} exists (say \"overwrite\": true to replace it)")
        from pykvm.transfer import snapshot  # here: what only this command needs loads with it

        started = time.perf_counter()
        with self.machine.quiesced("snapshot"):
            size = snapshot.save(self.machine, path, overwrite=overwrite)
        return {"file": path, "bytes": size, "pause_ms": round((time.perf_counter() - started) * 1000, 3)}

    def _check_snapshot_path(self, path: str) -> None:
        """A snapshot goes to a new or regular file in an existing directory, by an absolute path,
        and never onto what the VMM itself uses (its sockets, its disks)."""
        try:
            os.fsencode(path)
        except UnicodeEncodeError:  # JSON can say "\ud800"; no file name holds it
            raise CommandError(f"snapshot {path!r}: not a file name (a lone UTF-16 surrogate)") from None
        if "\0" in path or not os.path.isabs(path):
            raise CommandError(f"snapshot {path!r}: needs an absolute path without NUL bytes "
                               "(`pykvm ctl` makes a relative one absolute)")
        try:
            info = os.stat(path)
        except FileNotFoundError:
            info = None
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise CommandError(f"snapshot {path}: exists and is not a regular file")
        if info is None and not os.path.isdir(os.path.dirname(path)):
            raise CommandError(f"snapshot {path}: directory {os.path.dirname(path)} does not exist")
        own = [self.path, *(disk.path for disk in self.machine.config.disks),
               *(net.target for net in self.machine.config.nets if net.kind == "socket")]
        if info is not None and any(_same_file(path, used) for used in own):
            raise CommandError(f"snapshot {path}: this VMM uses that file (a socket or a disk of its own)")

    def _query_vcpus(self, request: dict[str, Any]) -> dict[str, Any]:
        self._require_live()
        with self.machine.vm.paused("query-vcpus"):  # the registers are final; devices may go on
            vcpus = [{"index": v.index, "rip": v.fd.get_regs().rip, "exits": v.exit_count,
                      "thread": v.thread.native_id if v.thread else None} for v in self.machine.vm.vcpus]
        return {"vcpus": vcpus}

    def _migrate(self, request: dict[str, Any]) -> dict[str, Any]:
        uri = _string(request, "uri")
        self._require_live()
        from pykvm.transfer import migration  # numpy and the wire load for a migration, not for every run

        try:
            return migration.migrate_out(self.machine, uri, tls=self.tls)
        except migration.MigrationError as error:
            raise CommandError(str(error)) from None

    def _quit(self, request: dict[str, Any]) -> dict[str, Any]:
        self.machine.vm.stop(0, "quit through the control socket")
        return {"status": "stopped"}

    def _require_live(self) -> None:
        if self.machine.vm.state is RunState.STOPPED:
            raise CommandError("the VM has stopped")


def _refusal(conn: socket.socket) -> str | None:
    """Why this client may not control the VMM (its uid is neither ours nor root's), or None."""
    _, uid, _ = _PEER_CREDENTIALS.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                         _PEER_CREDENTIALS.size))
    if uid in (0, os.getuid()):
        return None
    return f"uid {uid} may not control this VMM (only uid {os.getuid()} and root may)"


def _refuse(conn: socket.socket, refusal: str) -> None:
    """Answer a refused client, then read and drop what it still sends until it closes (a second
    at most): closing at once would fail its own send, and it would never read why."""
    with conn, contextlib.suppress(OSError):
        conn.sendall(json.dumps({"ok": False, "error": refusal}).encode() + b"\n")
        conn.shutdown(socket.SHUT_WR)
        conn.settimeout(1.0)
        while conn.recv(MAX_REQUEST):
            pass


def _string(request: dict[str, Any], key: str) -> str:
    value = request.get(key)
    if not isinstance(value, str) or not value:
        raise CommandError(f"{request['cmd']} needs a {key!r} string")
    return value


def _same_file(path: str, other: str) -> bool:
    try:
        return os.path.samefile(path, other)
    except OSError:
        return False


def request(path: str, command: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Client side: send one request, return the reply (used by `pykvm ctl`). ConfigError when
    nobody listens at `path`, NoReply when the reply does not come within `timeout` seconds or is
    not a JSON object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise ConfigError(f"{path}: no pykvm is listening there") from None
        except TimeoutError:
            raise NoReply(f"{path}: the VMM did not accept the connection within {timeout:g} s") from None
        except OSError as error:
            raise ConfigError(f"{path}: cannot connect: {error.strerror}") from None
        try:
            sock.sendall(json.dumps(command).encode() + b"\n")
            with sock.makefile("rb") as reader:
                line = reader.readline(MAX_REPLY + 1)
        except TimeoutError:
            raise NoReply(f"{path}: no reply to {command['cmd']!r} within {timeout:g} s (ctl --timeout)") from None
        except OSError as error:
            raise NoReply(f"{path}: the connection failed: {error.strerror}") from None
    if not line:
        raise NoReply(f"{path}: the VMM closed the connection without a reply")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):
        reply = None
    if not isinstance(reply, dict):
        raise NoReply(f"{path}: the reply is not a JSON object (is this a pykvm control socket?)")
    return reply
