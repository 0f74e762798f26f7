"""The activation spool's intake: every entry the workload leaves is handled once, then gone.

The spool (``DATA/activations``, a size-limited tmpfs of the embassy's own:
``embassy.daemon.spool``) is the one directory the untrusted workload writes to. The SDK
writes ``.<session hex>-<seq>.tmp``, then renames it to ``<session hex>-<seq:012d>.act``
(``workload_sdk.activations``). Each entry is judged by its name and ``lstat`` alone, and
nothing is opened here:

- regular files with an activation's name are handed to ``handle`` in groups (the metering
  service checks their names, reads them, charges them to their sessions, states and
  commits the group at once, and removes them, valid or not);
- a regular file with the writer's temporary name is left alone for
  :data:`STALE_TEMP_SECONDS` from when the intake first saw it (a writer renames it long
  before), then removed;
- anything else (other names, dotfiles, directories, symlinks, FIFOs, devices, sockets) is
  removed unread at once, and its size reported to ``discard``.

Events. A thread of ours reads the directory's inotify descriptor itself (``_Inotify``:
``inotify_init1`` / ``inotify_add_watch`` through ctypes, the events parsed from
``read``) and puts names in a bounded queue. Not watchdog: its observer passes every event
through two more threads and an unbounded queue (the ~1.7 ms hand-off measured in
benchmarks/metering_intake.py, and a structure a flood could grow without limit). Here the
kernel's queue (``max_queued_events``) is the only buffer before ours; when ours is full
the reader blocks (back-pressure: the kernel queues meanwhile), and when the kernel's
overflows (``IN_Q_OVERFLOW``) a rescan of the directory is due, so nothing is lost and
nothing grows. The spool itself bounds what the workload can leave (bytes and inodes).

Groups. The worker takes the first name waiting, then every name already queued, up to
:data:`GROUP_FILES` files and :data:`GROUP_BYTES` bytes (so a burst is one statement and
one transaction, and a group's latency stays bounded under load), and hands the group to
``handle``. It also sweeps the directory every :data:`SWEEP_SECONDS` (stale temporary
files, a due rescan) and calls ``tick`` every :data:`TICK_SECONDS` (the metering service
states the rejection summaries that are due).

:meth:`ActivationIntake.drain` handles, on the caller's thread and under the worker's lock,
every entry present, in groups and in sequence order, until ``drain_timeout`` seconds have
passed (checked between groups): closing a session calls it so the unseal statement can say
what was metered, and a flood of junk can delay the close by that much at most. It returns
how many activation files it had to leave.

Nothing here raises for what the workload wrote, and nothing the workload chose is logged:
a failure is logged by its exception's type, an entry by a digest of its name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import queue
import select
import shutil
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from embassy.daemon.metering import MeteringService, name_digest
from embassy.errors import StorageError
from embassy.metering.activation import TEMP_NAME, parse_file_name

_LOG = logging.getLogger(__name__)
QUEUE_SIZE = 4096
GROUP_FILES = 64
GROUP_BYTES = 16 << 20
TICK_SECONDS = 0.25
SWEEP_SECONDS = 2.0
STALE_TEMP_SECONDS = 30.0
_CHECK_EVERY = 256  # entries between two looks at the drain deadline

# <sys/inotify.h>
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000
IN_CLOEXEC = 0o2000000
IN_NONBLOCK = 0o4000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name, NUL-padded
_READ_BYTES = 64 * 1024


class _Inotify:
    """One inotify descriptor watching one directory (no recursion); events as names."""

    def __init__(self, directory: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fd = libc.inotify_init1(IN_CLOEXEC | IN_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise StorageError(f"activation spool: inotify_init1: {os.strerror(err)}")
        self.fd = int(fd)
        mask = IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE
        if libc.inotify_add_watch(self.fd, os.fsencode(directory), mask) < 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            raise StorageError(f"activation spool: inotify_add_watch: {os.strerror(err)}")

    def read(self) -> list[tuple[int, str]]:
        """The events ready now: (mask, name); an overflow is (IN_Q_OVERFLOW, "")."""
        try:
            data = os.read(self.fd, _READ_BYTES)
        except BlockingIOError:
            return []
        out = []
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            start = offset + _EVENT.size
            name = os.fsdecode(data[start : start + length].rstrip(b"\0"))
            out.append((mask, name))
            offset = start + length
        return out

    def close(self) -> None:
        os.close(self.fd)


class ActivationIntake:
    def __init__(
        self,
        directory: Path,
        handle: Callable[[Sequence[Path]], None],
        *,
        discard: Callable[[int], None] = lambda size: None,
        tick: Callable[[bool], object] = lambda final: None,
        drain_timeout: float = 60.0,
        queue_size: int = QUEUE_SIZE,
        group_files: int = GROUP_FILES,
        group_bytes: int = GROUP_BYTES,
    ) -> None:
        self._directory = directory
        self._handle = handle
        self._discard = discard
        self._tick = tick
        self._drain_timeout = drain_timeout
        self._group_files = group_files
        self._group_bytes = group_bytes
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # one group at a time: the worker's or a drain's
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._drainers = 0  # drains waiting: the worker yields the lock to them
        self._drainers_lock = threading.Lock()
        self._temps: dict[str, float] = {}  # temporary name -> first seen (monotonic)
        self._stuck: set[str] = set()  # entries that could not be removed (logged once)
        self.overflows = 0  # times the kernel's event queue overflowed (each a rescan)
        self.waited = 0  # events the reader had to wait to queue (back-pressure)
        self._inotify: _Inotify | None = None
        self._wake_r, self._wake_w = -1, -1
        self._reader = threading.Thread(target=self._read, name="embassy-inotify", daemon=True)
        self._worker = threading.Thread(target=self._run, name="embassy-intake", daemon=True)
        self._started = False

    @classmethod
    def for_metering(
        cls, directory: Path, metering: MeteringService, drain_timeout: float
    ) -> ActivationIntake:
        return cls(
            directory,
            metering.handle_many,
            discard=metering.discard,
            tick=lambda final: metering.flush(final=final),
            drain_timeout=drain_timeout,
        )

    def queue_depth(self) -> int:
        """Files seen and waiting for the worker (approximate: a metrics gauge)."""
        return self._queue.qsize()

    def start(self) -> None:
        self._inotify = _Inotify(self._directory)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._reader.start()
        self._worker.start()
        self._started = True
        # What was left while no daemon watched (a restart) is handled too.
        self.drain()

    # -- the reader thread ------------------------------------------------------------------

    def _read(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stop.is_set():
            try:
                poller.poll()
                events = self._inotify.read()
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                _LOG.error("activation spool: inotify read failed (%s)", exc.strerror)
                self._rescan.set()
                time.sleep(TICK_SECONDS)
                continue
            for mask, name in events:
                if TEMP_NAME.fullmatch(name):
                    continue  # a writer at work: renamed soon, or found stale by a sweep
                if mask & IN_Q_OVERFLOW:
                    self.overflows += 1
                    self._rescan.set()
                    self._put("")  # wake the worker: "" asks for nothing but the rescan
                elif mask & IN_IGNORED:
                    _LOG.error("activation spool: the watch was removed; sweeping only")
                    self._stop.wait(SWEEP_SECONDS)
                elif mask & (IN_MOVED_TO | IN_CLOSE_WRITE):
                    self._put(name)
                elif mask & IN_CREATE and (
                    mask & IN_ISDIR or parse_file_name(name) is None or not self.is_regular(name)
                ):
                    # An activation's name on a regular file is handled once closed or
                    # renamed into place (now it would be read half-written); anything
                    # else is judged now.
                    self._put(name)

    def _put(self, name: str) -> None:
        """Queue a name; when the queue is full, wait (the kernel queues meanwhile)."""
        try:
            self._queue.put_nowait(name)
        except queue.Full:
            self.waited += 1
        else:
            return
        while not self._stop.is_set():
            try:
                self._queue.put(name, timeout=TICK_SECONDS)
            except queue.Full:
                continue
            else:
                return

    def enqueue(self, name: str) -> None:
        """Queue a name as an event would (tests; the reader uses the same path)."""
        self._put(name)

    def is_regular(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._directory / name).st_mode)
        except OSError:
            return True  # gone already: nothing to do

    # -- the worker -------------------------------------------------------------------------

    def _take(self) -> list[str]:
        """The first name (waiting up to a tick), then every name already queued, up to a
        group's worth of files."""
        try:
            names = [self._queue.get(timeout=TICK_SECONDS)]
        except queue.Empty:
            return []
        while len(names) < self._group_files:
            try:
                names.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return names

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_SECONDS
        while not self._stop.is_set():
            names = self._take()
            while self._drainers:  # a session is closing: let its drain in
                time.sleep(0.001)
            with self._lock:
                finals: list[tuple[str, os.stat_result]] = []
                for name in dict.fromkeys(n for n in names if n):  # once each, in order
                    entry = self._judge(name)
                    if entry is not None:
                        finals.append(entry)
                self._groups(finals, None)
                now = time.monotonic()
                if self._rescan.is_set() or now >= next_sweep:
                    self._rescan.clear()
                    self._sweep(None)
                    next_sweep = now + SWEEP_SECONDS
            self._safe_tick(final=False)

    def _safe_tick(self, *, final: bool) -> None:
        try:
            self._tick(final)
        except Exception as exc:
            _LOG.error("activation intake: tick failed (%s)", type(exc).__name__)

    def _judge(
        self, name: str, st: os.stat_result | None = None
    ) -> tuple[str, os.stat_result] | None:
        """Judge one entry (lock held): an activation file to hand over is returned; junk is
        removed; a writer's temporary file is left until stale."""
        path = self._directory / name
        if st is None:
            try:
                st = os.lstat(path)
            except OSError:
                return None  # gone (handled already, or renamed away)
        regular = stat.S_ISREG(st.st_mode)
        if regular and parse_file_name(name) is not None:
            return name, st
        if regular and TEMP_NAME.fullmatch(name):
            first = self._temps.setdefault(name, time.monotonic())
            if time.monotonic() - first < STALE_TEMP_SECONDS:
                return None  # a writer at work
            self._temps.pop(name, None)
        self._remove(path, st)
        return None

    def _groups(self, finals: Sequence[tuple[str, os.stat_result]], deadline: float | None) -> int:
        """Hand ``finals`` over in bounded groups, in sequence order (lock held); stop at
        ``deadline`` or for a waiting drain. Return how many were left."""
        ordered = sorted(finals, key=lambda f: parse_file_name(f[0]) or (b"", 0))
        done = 0
        while done < len(ordered):
            if self._must_stop(deadline):
                return len(ordered) - done
            group: list[Path] = []
            size = 0
            for name, st in ordered[done:]:
                if group and (
                    len(group) >= self._group_files or size + st.st_size > self._group_bytes
                ):
                    break
                group.append(self._directory / name)
                size += st.st_size
            done += len(group)
            try:
                self._handle(group)
            except Exception as exc:  # the handler must not raise; the intake goes on
                _LOG.error("activation intake: handling a file failed (%s)", type(exc).__name__)
        return 0

    def _remove(self, path: Path, st: os.stat_result) -> None:
        """Remove a junk entry without reading or following it, and report its size."""
        try:
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)  # fd-based on Linux: never follows a symlink inside
            else:
                path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            # E.g. a directory the workload made unreadable: it stays, bounded by the spool.
            if path.name not in self._stuck:
                self._stuck.add(path.name)
                _LOG.warning(
                    "activation spool: cannot remove entry %s… (%s)",
                    name_digest(path.name),
                    exc.strerror,
                )
            return
        self._stuck.discard(path.name)
        self._discard(st.st_size)

    def _must_stop(self, deadline: float | None) -> bool:
        """A drain's sweep stops at its deadline; the worker's yields to a waiting drain
        (which sweeps itself), and the worker rescans later."""
        if deadline is None:
            if self._drainers:
                self._rescan.set()
                return True
            return False
        return time.monotonic() > deadline

    def _sweep(self, deadline: float | None) -> int:
        """Judge every entry present (lock held), activation files in sequence order; stop
        at ``deadline`` (None: the worker's). Return how many activation files are left."""
        finals: list[tuple[str, os.stat_result]] = []
        seen_temps = set()
        complete = True
        with os.scandir(self._directory) as entries:
            for i, entry in enumerate(entries):
                if i % _CHECK_EVERY == 0 and self._must_stop(deadline):
                    complete = False
                    break
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode) and TEMP_NAME.fullmatch(entry.name):
                    seen_temps.add(entry.name)
                judged = self._judge(entry.name, st)
                if judged is not None:
                    finals.append(judged)
        # Temporary files gone since (renamed or removed) are forgotten: the map stays
        # bounded by what is in the spool.
        if complete:
            for name in set(self._temps) - seen_temps:
                self._temps.pop(name, None)
        return self._groups(finals, deadline)

    # -- the caller's thread ----------------------------------------------------------------

    def drain(self) -> int:
        """Handle every entry present now, within the drain timeout; return how many
        activation files had to be left (0: all handled)."""
        deadline = time.monotonic() + self._drain_timeout
        with self._drainers_lock:
            self._drainers += 1
        try:
            if not self._lock.acquire(timeout=self._drain_timeout):
                return sum(1 for n in os.listdir(self._directory) if parse_file_name(n))
            try:
                return self._sweep(deadline)
            finally:
                self._lock.release()
        finally:
            with self._drainers_lock:
                self._drainers -= 1

    def stop(self) -> None:
        if not self._started:
            return
        self._stop.set()
        os.write(self._wake_w, b"x")
        self._reader.join(timeout=5)
        self._worker.join(timeout=5)
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._started = False
        self._safe_tick(final=True)  # the rejections not yet stated
