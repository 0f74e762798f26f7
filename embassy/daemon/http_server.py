"""The daemon's socket: who may connect, how many at once, and who waits for whom.

The socket is the one way into the embassy and a sealed workload sits on the other side of
it, so the loop around it is ours rather than socketserver's (ADR 0008):

- the kernel must never refuse a client the daemon could have served: the listen backlog
  is configured, and one thread (the caller of :meth:`SocketServer.serve_forever`) does
  nothing but accept, so the backlog drains promptly;
- no client holds a thread it does not use: new connections and keep-alive connections
  between requests wait in that thread's selector, and only a connection with bytes to
  read is queued to one of a fixed number of workers;
- past ``max_connections`` a connection is answered (503, JSON) and closed, not dropped;
- each connection carries the peer's pid, uid and gid (``SO_PEERCRED``), read once at
  accept, for the daemon to authorize with.

The HTTP protocol itself is in :mod:`embassy.daemon.http`, which subclasses
:class:`SocketServer`. Nothing here reads or logs what a client sends.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import queue
import re
import selectors
import socket
import stat
import struct
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embassy.errors import ConfigError, StorageError

_LOG = logging.getLogger("embassy.daemon.http")

# A refused connection (over max_connections) is kept this long, and this many of them at
# most, so that the client's request can be drained and the 503 read instead of a reset.
_REFUSED_LINGER_SECONDS = 1.0
_REFUSED_LINGER_MAX = 64
_REFUSED_DRAIN_BYTES = 64 * 1024
_SHUTDOWN_GRACE_SECONDS = 10.0
_ACCEPT_PAUSE_SECONDS = 0.1
_MAX_GID = (1 << 32) - 2


@dataclass(frozen=True, slots=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it at connect.

    ``started`` is the process's start time (clock ticks since boot, /proc/PID/stat) read at
    accept, or None: with the pid it names one process, so a check made later can tell the
    caller from a process that reused its pid after it exited (:func:`same_process`).
    """

    pid: int
    uid: int
    gid: int
    started: int | None = None


class Connection:
    """One accepted connection, passed between the acceptor and the workers."""

    __slots__ = ("busy", "fresh", "peer", "sock", "state")

    def __init__(self, sock: socket.socket, peer: Peer | None) -> None:
        self.sock = sock
        self.peer = peer
        self.state: Any = None  # the protocol's own per-connection state
        self.fresh = True  # no request served on it yet
        self.busy = False  # a request on it is inside the handler


class _Loop:
    """The acceptor's state: what waits in its selector, and until when."""

    __slots__ = ("paused_until", "refused", "selector", "waiting")

    def __init__(self, selector: selectors.BaseSelector) -> None:
        self.selector = selector
        self.waiting: dict[Connection, float] = {}
        self.refused: dict[_Refused, float] = {}
        self.paused_until: float | None = None

    def timeout(self, poll_interval: float) -> float:
        now = time.monotonic()
        deadlines = [*self.waiting.values(), *self.refused.values()]
        if self.paused_until is not None:
            deadlines.append(self.paused_until)
        return max(min([poll_interval, *(d - now for d in deadlines)]), 0.0)


class _Refused:
    __slots__ = ("drained", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.drained = 0


_LISTENER = object()
_WAKE = object()


def resolve_group(value: str) -> int:
    """``socket_group`` as a gid: a numeric string is one, anything else a group name."""
    if re.fullmatch(r"[0-9]{1,10}", value):
        gid = int(value)
        if gid > _MAX_GID:
            raise ConfigError(f"config: socket_group: gid {gid} is out of range")
        return gid
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ConfigError(f"config: socket_group: no group named {value!r}") from None


def peer_of(sock: socket.socket) -> Peer | None:
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    size = struct.calcsize("3i")
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, option, size))
    except (OSError, struct.error):
        return None
    return Peer(pid, uid, gid, start_time(pid))


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (after the parenthesised name, which may hold anything)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = text[text.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def same_process(peer: Peer) -> bool:
    """Whether ``peer.pid`` is still the process that connected (not a reused pid)."""
    return peer.pid > 0 and peer.started is not None and start_time(peer.pid) == peer.started


def log_request(method: str, route: str, status: int, seconds: float) -> None:
    """The one per-request log line: bounded labels only, never the client's bytes."""
    _LOG.info("%s %s -> %d in %.1f ms", method, route, status, seconds * 1000)


def log_traceback(what: str, exc: BaseException) -> None:
    """Log where ``exc`` happened, but not its message: that may carry a client's bytes."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    _LOG.error("%s: %s\n%s", what, type(exc).__name__, frames.rstrip())


def remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse if another daemon still answers."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StorageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2)
    try:
        probe.connect(str(path))
    except OSError as exc:
        # Only "nobody listens" means dead: a full backlog (EAGAIN) is a live, busy daemon.
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StorageError(
                f"cannot tell whether a daemon serves on {path} ({exc.strerror}); "
                "refusing to replace it"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise StorageError(f"another daemon is already serving on {path}")


def _check_still_ours(path: Path, inode: int) -> None:
    st = os.lstat(path)
    if st.st_ino != inode or not stat.S_ISSOCK(st.st_mode):
        raise StorageError(f"{path} was replaced while the daemon was creating it")


def bind_socket(path: Path, backlog: int, gid: int | None) -> tuple[socket.socket, int]:
    """Listen on ``path``: 0600, or 0660 with group ``gid``; never wider, not even briefly.

    Returns the listener and the socket file's inode (to unlink only our own file).
    """
    remove_stale_socket(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    created = False
    try:
        old = os.umask(0o177)  # born owner-only: there is no moment before the chmod
        try:
            sock.bind(str(path))
        finally:
            os.umask(old)
        created = True
        inode = os.lstat(path).st_ino
        if gid is not None:
            os.chown(path, -1, gid, follow_symlinks=False)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        _check_still_ours(path, inode)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException as exc:
        sock.close()
        if created:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, OSError):
            raise StorageError(f"cannot listen on {path}: {exc.strerror}") from None
        raise
    return sock, inode


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Best-effort write on a non-blocking socket: a short reply into an empty buffer."""
    with contextlib.suppress(OSError):
        sock.send(data)
        sock.shutdown(socket.SHUT_WR)


class SocketServer:
    """Accept on a Unix socket and hand readable connections to a pool of workers.

    Subclasses implement :meth:`handle_connection` (serve requests on a connection until
    it should close, or go idle) and :meth:`refusal` (the bytes of a JSON error reply).
    """

    def __init__(
        self,
        path: Path,
        *,
        timeout_seconds: float,
        backlog: int,
        workers: int,
        max_connections: int,
        socket_group: str | None = None,
        idle_timeout_seconds: float | None = None,
    ) -> None:
        if not (workers >= 1 and max_connections >= workers and backlog >= 1):
            raise ConfigError("config: http: need workers >= 1, max_connections >= workers")
        if timeout_seconds <= 0:
            raise ConfigError("config: http.timeout_seconds: must be positive")
        gid = None if socket_group is None else resolve_group(socket_group)
        self.socket_path = path
        self.timeout_seconds = timeout_seconds
        self.idle_timeout_seconds = (
            min(timeout_seconds, 10.0) if idle_timeout_seconds is None else idle_timeout_seconds
        )
        self.max_connections = max_connections
        self._worker_count = workers
        self._listener, self._inode = bind_socket(path, backlog, gid)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._queue: queue.SimpleQueue[Connection | None] = queue.SimpleQueue()
        self._returned: deque[Connection] = deque()
        self._lock = threading.Lock()
        self._held: set[Connection] = set()
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self._running = threading.Event()
        self._stopped = threading.Event()
        self._closed = False
        self._quiet_until = 0.0
        # When the accept loop last turned (monotonic): the watchdog's sign of life.
        self._turned_at: float | None = None

    # -- what a protocol provides --------------------------------------------------------

    def handle_connection(self, conn: Connection) -> bool:
        """Serve ``conn``; True to keep it open and wait for its next request."""
        raise NotImplementedError

    def refusal(self, status: int, code: str, message: str) -> bytes:
        """A complete HTTP reply carrying a JSON error, after which the server closes."""
        raise NotImplementedError

    # -- life cycle ------------------------------------------------------------------------

    @property
    def held_connections(self) -> int:
        with self._lock:
            return len(self._held)

    def loop_age(self) -> float | None:
        """Seconds since the accept loop last turned; None before it first ran or after it
        stopped. It turns at least every ``poll_interval`` while it is not stuck."""
        turned = self._turned_at
        return None if turned is None else time.monotonic() - turned

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Accept and dispatch until :meth:`shutdown`; runs on the calling thread."""
        if self._closed:
            raise RuntimeError("the server is closed")
        self._start_workers()
        self._stopped.clear()
        self._running.set()
        loop = _Loop(selectors.DefaultSelector())
        try:
            loop.selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
            loop.selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
            while not self._stop.is_set():
                self._turned_at = time.monotonic()
                for key, _ in loop.selector.select(loop.timeout(poll_interval)):
                    self._dispatch(loop, key.data)
                self._adopt_returned(loop)
                self._expire(loop, time.monotonic())
        finally:
            loop.selector.close()
            for conn in loop.waiting:
                self._close(conn)
            for item in loop.refused:
                item.sock.close()
            self._turned_at = None
            self._running.clear()
            self._stopped.set()

    def _dispatch(self, loop: _Loop, data: object) -> None:
        if data is _LISTENER:
            if not self._accept(loop):  # e.g. out of descriptors: pause accepting
                loop.selector.unregister(self._listener)
                loop.paused_until = time.monotonic() + _ACCEPT_PAUSE_SECONDS
        elif data is _WAKE:
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass
        elif isinstance(data, _Refused):
            self._drain_refused(loop, data)
        elif isinstance(data, Connection):  # bytes (or EOF) to read: a worker's turn
            loop.selector.unregister(data.sock)
            del loop.waiting[data]
            self._queue.put(data)

    def shutdown(self) -> None:
        """Stop :meth:`serve_forever` and wait for it to return (call it from another thread)."""
        self._stop.set()
        self._wake()
        if self._running.is_set():
            self._stopped.wait()

    def server_close(self) -> None:
        """Close the socket (removing its file) and every connection; stop the workers.

        A request already inside the handler is given a grace period to finish.
        """
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake()
        self._listener.close()
        with contextlib.suppress(OSError):
            if os.lstat(self.socket_path).st_ino == self._inode:
                self.socket_path.unlink()
        with self._lock:
            held = list(self._held)
        for conn in held:
            if not conn.busy:  # wake a worker blocked reading from an idle client
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)
        for _ in self._workers:
            self._queue.put(None)
        deadline = time.monotonic() + max(_SHUTDOWN_GRACE_SECONDS, self.timeout_seconds)
        for thread in self._workers:
            thread.join(max(deadline - time.monotonic(), 0.0))
            if thread.is_alive():
                _LOG.warning("http: a worker is still busy at shutdown")
        while self._returned:
            self._close(self._returned.popleft())
        with self._lock:
            held = list(self._held)
        for conn in held:
            if not conn.busy:
                self._close(conn)
        self._wake_r.close()
        self._wake_w.close()

    # -- acceptor side -----------------------------------------------------------------

    def _accept(self, loop: _Loop) -> bool:
        """Accept everything pending; False when accept fails (e.g. out of descriptors)."""
        while True:
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:
                _LOG.warning("http: accept failed: %s", errno.errorcode.get(exc.errno or 0, "?"))
                return False
            sock.setblocking(False)
            conn = Connection(sock, peer_of(sock))
            with self._lock:
                full = len(self._held) >= self.max_connections
                if not full:
                    self._held.add(conn)
            now = time.monotonic()
            if full:
                self._refuse(loop, sock, now)
                continue
            loop.selector.register(sock, selectors.EVENT_READ, conn)
            loop.waiting[conn] = now + self.timeout_seconds

    def _refuse(self, loop: _Loop, sock: socket.socket, now: float) -> None:
        if now >= self._quiet_until:  # one warning a second, however many are refused
            self._quiet_until = now + 1.0
            _LOG.warning("http: %d connections held; refusing more (503)", self.max_connections)
        _send_now(sock, self.refusal(503, "busy", "too many connections; retry later"))
        if len(loop.refused) >= _REFUSED_LINGER_MAX:
            sock.close()
            return
        item = _Refused(sock)
        loop.selector.register(sock, selectors.EVENT_READ, item)
        loop.refused[item] = now + _REFUSED_LINGER_SECONDS

    @staticmethod
    def _drain_refused(loop: _Loop, item: _Refused) -> None:
        try:
            data = item.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        item.drained += len(data)
        if not data or item.drained > _REFUSED_DRAIN_BYTES:
            loop.selector.unregister(item.sock)
            del loop.refused[item]
            item.sock.close()

    def _adopt_returned(self, loop: _Loop) -> None:
        while True:
            try:
                conn = self._returned.popleft()
            except IndexError:
                return
            try:
                conn.sock.setblocking(False)
                loop.selector.register(conn.sock, selectors.EVENT_READ, conn)
            except (OSError, ValueError):
                self._close(conn)
                continue
            loop.waiting[conn] = time.monotonic() + self.idle_timeout_seconds

    def _expire(self, loop: _Loop, now: float) -> None:
        if loop.paused_until is not None and now >= loop.paused_until:
            loop.paused_until = None
            loop.selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        for conn, deadline in list(loop.waiting.items()):
            if deadline > now:
                continue
            loop.selector.unregister(conn.sock)
            del loop.waiting[conn]
            if conn.fresh:  # connected but never sent a request: say why it is closed
                _send_now(conn.sock, self.refusal(408, "request-timeout", "no request in time"))
                log_request("other", "unmatched", 408, self.timeout_seconds)
            self._close(conn)
        for item, deadline in list(loop.refused.items()):
            if deadline <= now:
                loop.selector.unregister(item.sock)
                del loop.refused[item]
                item.sock.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # a full pipe already holds a wake-up
            self._wake_w.send(b"\0")

    # -- worker side -------------------------------------------------------------------

    def _start_workers(self) -> None:
        if self._workers:
            return
        for n in range(self._worker_count):
            thread = threading.Thread(target=self._work, name=f"http-worker-{n}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def _work(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            if self._stop.is_set():
                self._close(conn)
                continue
            try:
                conn.sock.settimeout(self.timeout_seconds)
                keep = self.handle_connection(conn)
            except Exception as exc:  # a worker outlives anything one connection does
                log_traceback("http: connection failed", exc)
                keep = False
            conn.busy = False
            if keep and not self._stop.is_set():
                self._returned.append(conn)
                self._wake()
            else:
                self._close(conn)

    def _close(self, conn: Connection) -> None:
        with self._lock:
            self._held.discard(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()
