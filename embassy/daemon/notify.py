"""systemd's notification protocol (sd_notify(3)), written out: no systemd Python package.

A ``Type=notify`` unit learns from us when the embassy is ready (``READY=1``: the socket
serves and the workload is launched, so units ordered after it find both), that it is
alive (``WATCHDOG=1``, at half of ``$WATCHDOG_USEC``), and that it is stopping
(``STOPPING=1``). A datagram to ``$NOTIFY_SOCKET``: a path, or ``@name`` for Linux's
abstract namespace.

The watchdog pings only while a health check passes (the socket's accept loop has turned
recently). A daemon that is stuck there stops pinging, and systemd restarts it after
``WatchdogSec``: a restart fails closed (the seal is reconciled from the log at start), a
hung embassy that keeps a workload sealed forever does not.

Notification is best-effort, as in sd_notify: a failed send is logged, never raised. With no
``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping, MutableMapping

_LOG = logging.getLogger(__name__)

# The variables systemd sets for the main process only; removed from our environment once
# read, so that children we start (swtpm, docker's helpers) cannot speak for the daemon.
_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_SEND_TIMEOUT_SECONDS = 1.0
MAX_STATUS_CHARS = 200

HealthCheck = Callable[[], str | None]


def socket_address(text: str) -> str | bytes:
    """``$NOTIFY_SOCKET`` as an AF_UNIX address: ``@name`` is ``\\0name`` (abstract)."""
    if text.startswith("@"):
        return b"\0" + os.fsencode(text[1:])
    if not text.startswith("/"):
        raise ValueError("NOTIFY_SOCKET must be an absolute path or an @abstract name")
    return text


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), None when no watchdog is ours."""
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None  # the watchdog is another process's
    if not (usec.isascii() and usec.isdigit() and 0 < int(usec) < 1 << 63):
        return None
    return int(usec) / 2_000_000


def _status_line(text: str) -> str:
    """A STATUS= value on one line: the protocol is newline-separated assignments."""
    flat = " ".join(text.split())
    return flat[:MAX_STATUS_CHARS]


class Notifier:
    """Sends notifications to systemd; a no-op when not started by a notify unit."""

    def __init__(self, notify_socket: str | None, watchdog_seconds: float | None) -> None:
        self._address: str | bytes | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed = False
        self._stopping = False
        self.watchdog_seconds = watchdog_seconds
        if notify_socket:
            try:
                self._address = socket_address(notify_socket)
            except ValueError as exc:
                _LOG.warning("sd_notify: %s; not notifying", exc)
                return
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(_SEND_TIMEOUT_SECONDS)

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str]) -> Notifier:
        """Read (and remove) the variables systemd set for this process."""
        notify_socket = environ.get("NOTIFY_SOCKET")
        interval = watchdog_interval(environ, os.getpid())
        for name in _VARIABLES:
            environ.pop(name, None)
        return cls(notify_socket, interval if notify_socket else None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *assignments: str) -> bool:
        """One datagram of ``NAME=value`` lines; whether it was sent."""
        if self._sock is None or self._address is None:
            return False
        message = "\n".join(assignments).encode("utf-8")
        with self._lock:
            try:
                self._sock.sendto(message, self._address)
            except OSError as exc:
                if not self._failed:  # once: a missing listener would flood the log
                    _LOG.warning("sd_notify: cannot send (%s)", exc.strerror or exc)
                self._failed = True
                return False
        self._failed = False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", f"STATUS={_status_line(status)}")

    def status(self, status: str) -> bool:
        return self.send(f"STATUS={_status_line(status)}")

    def stopping(self, status: str = "stopping") -> bool:
        """STOPPING=1 the first time (the watchdog stops with it); later, STATUS only."""
        self._stop_watchdog()
        line = f"STATUS={_status_line(status)}"
        with self._lock:
            first, self._stopping = not self._stopping, True
        return self.send("STOPPING=1", line) if first else self.send(line)

    # -- the watchdog --------------------------------------------------------------------

    def start_watchdog(self, healthy: HealthCheck) -> bool:
        """Ping every :attr:`watchdog_seconds` while ``healthy()`` says None (no problem)."""
        if not self.enabled or self.watchdog_seconds is None or self._thread is not None:
            return False
        self._thread = threading.Thread(
            target=self._watch, args=(healthy, self.watchdog_seconds), name="sd-watchdog"
        )
        self._thread.daemon = True
        self._thread.start()
        return True

    def _watch(self, healthy: HealthCheck, interval: float) -> None:
        problem: str | None = None
        while True:
            try:
                now = healthy()
            except Exception as exc:  # a failing check is a failed check, not a dead thread
                now = f"health check failed: {type(exc).__name__}"
            if now is None:
                self.send("WATCHDOG=1")
            elif now != problem:
                # Said once per problem; the missing pings let systemd restart us.
                _LOG.error("watchdog: not pinging: %s", now)
                self.status(f"unhealthy: {now}")
            problem = now
            if self._stop.wait(interval):
                return

    def _stop_watchdog(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def close(self) -> None:
        self._stop_watchdog()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
