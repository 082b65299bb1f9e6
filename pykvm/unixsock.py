"""Unix sockets bound at a path, the way a VMM needs them: a socket file left behind by a killed
process is replaced, one that a live process is bound to is refused (ConfigError, in_use), and
closing removes the file."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import weakref

from pykvm.errors import ConfigError


def bind(path: str, kind: int, what: str, *, take_over: bool = False) -> socket.socket:
    """A socket of `kind` (SOCK_STREAM, SOCK_DGRAM, with flags) bound at `path`; `what` names it
    in errors ("--control /x.sock"). `take_over`: replace the file even if a process is bound to
    it (an FT standby taking over from a primary that hangs but holds it); that process keeps a
    socket nobody can reach by the path any more."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(f"{what}: exists and is not a socket")
        if not take_over and _in_use(path, kind & (socket.SOCK_STREAM | socket.SOCK_DGRAM)):
            raise ConfigError(f"{what}: in use by another process", in_use=True)
        with contextlib.suppress(FileNotFoundError):  # its owner may remove it meanwhile (a migration source)
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        info = os.stat(path)
    except OSError as error:
        sock.close()
        raise ConfigError(f"{what}: cannot bind: {error.strerror or error}") from None  # "path too long" has no errno
    _bound[sock] = _bound_paths[os.path.abspath(path)] = (info.st_dev, info.st_ino)
    return sock


_bound: weakref.WeakKeyDictionary[socket.socket, tuple[int, int]] = weakref.WeakKeyDictionary()
_bound_paths: dict[str, tuple[int, int]] = {}  # every path this process bound, and the file it made


def remove_leftovers() -> None:
    """Remove the socket files this process made that are still there (the same file, not one
    another process has bound since): for an end that interrupted the code that would close them
    (a SIGTERM while a control socket was being set up)."""
    for path, made in list(_bound_paths.items()):
        try:
            info = os.stat(path)
            if (info.st_dev, info.st_ino) == made:
                os.unlink(path)
        except OSError:
            pass
        _bound_paths.pop(path, None)


def _in_use(path: str, kind: int) -> bool:
    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False  # nobody behind it: left over from a process that is gone
    finally:
        probe.close()
    return True


def close(sock: socket.socket, path: str) -> None:
    """Remove the path (if it is still ours), then close: another process may be waiting to bind
    the same path (a migration target), and must not lose its new file to our unlink."""
    try:
        info = os.stat(path)
        if (info.st_dev, info.st_ino) == _bound.get(sock):
            os.unlink(path)
    except OSError:
        pass  # already gone
    sock.close()
