"""Run a function inside another network namespace, on one dedicated thread.

``setns(2)`` with ``CLONE_NEWNET`` moves only the *calling thread*. python-iptables opens
libiptc's raw socket in the calling thread's netns when a table is ``refresh()``-ed, and
keeps one ``Table`` object per table name process-wide, so every firewall operation of the
process runs on the single worker thread of :class:`NetnsWorker`: it enters the target
netns, runs the function, and always returns to its home netns (the one it started in).

Fail closed: if the worker cannot get home (``setns`` back fails, or it lands in a netns
other than home), it is marked broken, the operation raises
:class:`embassy.errors.SealError`, and every later call is refused: a thread stuck in a
workload's netns must never run anything else.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from embassy.errors import SealError

CLONE_NEWNET = 0x40000000
_HOME = "/proc/thread-self/ns/net"

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)
_setns = _libc.setns
_setns.argtypes = [ctypes.c_int, ctypes.c_int]
_setns.restype = ctypes.c_int


def setns(fd: int) -> None:
    """``setns(fd, CLONE_NEWNET)`` for the calling thread; OSError on failure."""
    if _setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


_unshare = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int


def new_netns() -> int:
    """An fd on a new, empty network namespace. It is made by a short-lived thread of its
    own (``unshare`` moves the calling thread), so no thread of this process stays in it;
    the fd keeps it alive until closed."""
    made: list[int] = []
    failed: list[OSError] = []

    def make() -> None:
        if _unshare(CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            failed.append(OSError(errno, os.strerror(errno)))
            return
        try:
            made.append(os.open(_HOME, os.O_RDONLY | os.O_CLOEXEC))
        except OSError as exc:
            failed.append(exc)

    thread = threading.Thread(target=make, name="embassy-new-netns")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def _ns_id(st: os.stat_result) -> tuple[int, int]:
    return (st.st_dev, st.st_ino)


class NetnsWorker:
    """One long-lived thread that runs functions inside network namespaces."""

    def __init__(self, name: str = "embassy-netns") -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._home_fd: int | None = None
        self._home_id: tuple[int, int] | None = None
        self._broken: str | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def broken(self) -> str | None:
        """Why the worker refuses work, or None while it is usable."""
        return self._broken

    def run(self, netns: Path, fn: Callable[[], T]) -> T:
        """Run ``fn()`` inside ``netns`` on the worker thread; return or raise what it does."""
        return self.submit(netns, fn).result()

    def submit(self, netns: Path, fn: Callable[[], T]) -> Future[T]:
        """Queue ``fn()`` to run inside ``netns``; jobs run one at a time, in order."""
        with self._lock:
            if self._closed:
                raise SealError(f"netns worker is closed (netns {netns})")
            if self._broken is not None:
                raise SealError(f"netns worker is unusable: {self._broken} (netns {netns})")
            return self._executor.submit(self._enter_and_run, netns, fn)

    def close(self) -> None:
        """Stop the thread and close the home fd. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._executor.shutdown(wait=True)
        if self._home_fd is not None:
            os.close(self._home_fd)
            self._home_fd = None

    # Everything below runs on the worker thread.

    def _home(self) -> int:
        if self._home_fd is None:
            fd = os.open(_HOME, os.O_RDONLY | os.O_CLOEXEC)
            self._home_fd = fd
            self._home_id = _ns_id(os.fstat(fd))
        return self._home_fd

    def _enter_and_run(self, netns: Path, fn: Callable[[], T]) -> T:
        if self._broken is not None:
            raise SealError(f"netns worker is unusable: {self._broken} (netns {netns})")
        home = self._home()
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SealError(f"netns {netns}: cannot open: {exc.strerror}") from exc
        try:
            try:
                setns(fd)
            except OSError as exc:
                raise SealError(f"netns {netns}: setns failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
        try:
            return fn()
        finally:
            self._go_home(home, netns)

    def _go_home(self, home: int, netns: Path) -> None:
        try:
            setns(home)
            here = _ns_id(os.stat(_HOME))
        except OSError as exc:
            self._broken = f"could not return home from netns {netns}: {exc.strerror}"
            raise SealError(self._broken) from exc
        if here != self._home_id:
            self._broken = f"returned from netns {netns} to a netns other than home"
            raise SealError(self._broken)
