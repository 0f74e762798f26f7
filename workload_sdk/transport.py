"""HTTP/1.1 over the embassy's Unix socket, waiting out a busy embassy instead of failing.

With a timeout set, ``connect()`` on an AF_UNIX socket whose listen backlog is full does not
wait: Linux answers EAGAIN at once. A client that took that as "unreachable" would fail
exactly when the embassy is busiest, so here a connect is retried, with a short backoff,
on EAGAIN and on ECONNREFUSED while the socket file exists (a daemon restarting), until the
caller's timeout; only then is the last error raised.

Standard library only: a workload imports this (and ``embassy.client`` shares it, so the
CLI and the SDK wait the same way).
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import stat
import time

_FIRST_BACKOFF = 0.002
_MAX_BACKOFF = 0.05


def _socket_present(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _worth_waiting(exc: OSError, path: str) -> bool:
    if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
        return True  # the backlog is full: the embassy is alive and will accept
    return exc.errno == errno.ECONNREFUSED and _socket_present(path)


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A connected AF_UNIX stream socket with ``timeout`` set for its I/O.

    Retries a full backlog (and a socket file nobody listens on yet) until ``timeout``
    seconds have passed; raises the last ``OSError`` then, or any other error at once.
    """
    deadline = time.monotonic() + timeout
    backoff = _FIRST_BACKOFF
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
        except OSError as exc:
            sock.close()
            remaining = deadline - time.monotonic()
            if not _worth_waiting(exc, path) or remaining <= 0:
                raise
            time.sleep(min(backoff, remaining))
            backoff = min(backoff * 2, _MAX_BACKOFF)
            continue
        except BaseException:
            sock.close()
            raise
        sock.settimeout(timeout)
        return sock


class UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over :func:`connect_unix`."""

    def __init__(self, socket_path: str, timeout: float, host: str = "embassy") -> None:
        super().__init__(host, timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        assert isinstance(self.timeout, int | float)
        self.sock = connect_unix(self.socket_path, self.timeout)
