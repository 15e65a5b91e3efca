"""The local API's socket file: where it is, how the daemon creates it and how a
client reaches it.

The daemon (`listen`):
- the directory must be a real directory (not a symlink) owned by the agent and
  writable by nobody else, or anyone could put their own socket in its place;
  it is created (0755) when missing, like systemd's RuntimeDirectory=;
- `NAME.lock` beside the socket is flock'ed for the daemon's lifetime: a second
  daemon is refused, and a socket file found while holding the lock is stale (a
  crash left it) and is replaced;
- the socket is bound under a temporary name, given its mode and group, set
  listening and only then renamed onto the configured name: no client ever sees
  it with other permissions, and the replacement of a stale one is atomic; a
  path holding anything but a socket is never replaced.
- on stop the socket is removed only when the name still holds our socket.

A path too long for `sun_path` (108 bytes) is reached through an O_PATH
descriptor of its directory, as `/proc/self/fd/N/NAME`.

Owns no protocol: `agent.api_server` serves it, `agent.api_client` talks over it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat
from pathlib import Path

from agent.api_protocol import ApiError
from agent.config import ApiConfig

log = logging.getLogger(__name__)

SUN_PATH_MAX = 107  # bytes of a path in sockaddr_un, without the terminating NUL
BACKLOG = 16


class _Dir:
    """An O_PATH descriptor of the socket's directory: every operation is relative to it."""

    def __init__(self, directory: Path, *, nofollow: bool = True) -> None:
        self.path = directory
        flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
        self.fd = os.open(directory, flags)

    def address(self, name: str) -> str:
        full = str(self.path / name)
        return full if len(os.fsencode(full)) <= SUN_PATH_MAX else f"/proc/self/fd/{self.fd}/{name}"

    def close(self) -> None:
        os.close(self.fd)


def connect(path: Path, timeout: float) -> socket.socket | None:
    """A connection to the daemon serving `path`, or None when none does (no socket
    file, a stale one, no directory). ApiError when one may run but cannot be
    reached (permission denied, no answer)."""
    directory = None
    address = str(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        if len(os.fsencode(address)) > SUN_PATH_MAX:
            directory = _Dir(path.parent, nofollow=False)
            address = directory.address(path.name)
        sock.connect(address)
    except PermissionError:
        sock.close()
        raise ApiError(f"permission denied connecting to the running agent at {path}: its mode and group "
                       "decide who may use it (docs/api.md)") from None
    except TimeoutError:
        sock.close()
        raise ApiError(f"the agent at {path} does not accept connections (no answer in {timeout:g} s)") from None
    except OSError as e:
        sock.close()
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, errno.ENOTSOCK):
            return None  # no daemon: a socket left by a crash refuses, a missing one is not there
        raise ApiError(f"cannot connect to the agent at {path}: {e.strerror}") from None
    finally:
        if directory is not None:
            directory.close()
    return sock


class Listener:
    """The daemon's listening socket at `config.socket`, made as the module docstring says."""

    def __init__(self, config: ApiConfig) -> None:
        self.path = config.socket
        self.name = config.socket.name
        self._dir = _open_own_dir(config.socket.parent)
        self._lock_fd: int | None = None
        self._ino: tuple[int, int] | None = None
        try:
            self._lock()
            gid = _gid(config.group)
            self.sock = self._bind(config.mode, gid)
        except BaseException:
            self.close()
            raise

    def _lock(self) -> None:
        name = f"{self.name}.lock"
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600,
                         dir_fd=self._dir.fd)
        except OSError as e:
            raise ApiError(f"cannot create the API lock {self.path.parent / name}: {e.strerror}") from None
        self._lock_fd = fd
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ApiError(f"{self.path.parent / name} is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ApiError(f"another ota-agent daemon serves {self.path} (it holds {name})") from None

    def _bind(self, mode: int, gid: int | None) -> socket.socket:
        d = self._dir
        try:
            st = os.stat(self.name, dir_fd=d.fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise ApiError(f"{self.path} exists and is not a socket; refusing to replace it")
            log.info("replacing the stale API socket %s (left by an agent that did not stop)", self.path)
        temp = f".{self.name}.{os.getpid()}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp, dir_fd=d.fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(d.address(temp))
            try:
                os.chmod(temp, mode, dir_fd=d.fd)
                if gid is not None:
                    os.chown(temp, -1, gid, dir_fd=d.fd, follow_symlinks=False)
            except PermissionError as e:
                raise ApiError(f"cannot give the API socket group {gid}: {e.strerror} (the agent needs "
                               "CAP_CHOWN or membership in that group)") from None
            sock.listen(BACKLOG)
            os.rename(temp, self.name, src_dir_fd=d.fd, dst_dir_fd=d.fd)
            st = os.stat(self.name, dir_fd=d.fd, follow_symlinks=False)
            self._ino = (st.st_dev, st.st_ino)
        except BaseException as e:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=d.fd)
            if isinstance(e, OSError):
                raise ApiError(f"cannot create the API socket {self.path}: {e.strerror}") from None
            raise
        sock.setblocking(False)
        return sock

    def close(self) -> None:
        """Stop listening; remove the socket file when it is still ours; release the lock."""
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()
        if self._ino is not None:
            with contextlib.suppress(OSError):
                st = os.stat(self.name, dir_fd=self._dir.fd, follow_symlinks=False)
                if (st.st_dev, st.st_ino) == self._ino:
                    os.unlink(self.name, dir_fd=self._dir.fd)
            self._ino = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._dir.fd >= 0:
            self._dir.close()
            self._dir.fd = -1


def _open_own_dir(directory: Path) -> _Dir:
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    except OSError as e:
        raise ApiError(f"cannot create the API socket's directory {directory}: {e.strerror}") from None
    try:
        d = _Dir(directory)
    except OSError as e:
        what = "is a symbolic link or not a directory" if e.errno in (errno.ENOTDIR, errno.ELOOP) else e.strerror
        raise ApiError(f"API socket directory {directory}: {what}") from None
    st = os.fstat(d.fd)
    problem = None
    if st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not the agent (uid {os.geteuid()})"
    elif st.st_mode & 0o022:
        problem = f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        d.close()
        raise ApiError(f"API socket directory {directory} {problem}: anyone able to write there could put "
                       "their own socket in the agent's place; use a directory only the agent can change")
    return d


def _gid(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ApiError(f"[api] group {group!r} does not exist") from None
