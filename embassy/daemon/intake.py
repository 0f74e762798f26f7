"""The activation spool's intake: every entry the workload leaves is handled once, then gone.

The spool (``DATA/activations``, a size-limited tmpfs of the embassy's own:
``embassy.daemon.spool``) is the one directory the untrusted workload writes to. The SDK
writes ``.<session hex>-<seq>.tmp``, then renames it to ``<session hex>-<seq:012d>.act``
(``workload_sdk.activations``). Each entry is judged by its name and ``lstat`` alone, and
nothing is opened here:

- a regular file with an activation's name is handed to ``handle`` (the metering service
  reads it strictly, charges it to its session, and removes it, valid or not);
- a regular file with the writer's temporary name is left alone for
  :data:`STALE_TEMP_SECONDS` from when the intake first saw it (a writer renames it long
  before), then removed;
- anything else (other names, dotfiles, directories, symlinks, FIFOs, devices, sockets) is
  removed unread at once, and its size reported to ``discard``.

Events (watchdog's inotify observer) queue names in a bounded queue: when it is full the
name is dropped, counted, and a rescan of the directory is due, so nothing is lost. The
worker thread also sweeps the directory every :data:`SWEEP_SECONDS` (stale temporary files,
events inotify itself dropped) and calls ``tick`` every :data:`TICK_SECONDS` (the metering
service states the rejection summaries that are due).

:meth:`ActivationIntake.drain` handles, on the caller's thread and under the worker's lock,
every entry present, until ``drain_timeout`` seconds have passed: closing a session calls
it so the unseal statement can say what was metered, and a flood of junk can delay the
close by that much at most. It returns how many activation files it had to leave.

Nothing here raises for what the workload wrote, and nothing the workload chose is logged:
a failure is logged by its exception's type, an entry by a digest of its name.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from embassy.daemon.metering import MeteringService, name_digest
from embassy.metering.activation import TEMP_NAME, parse_file_name

_LOG = logging.getLogger(__name__)
# watchdog logs every inotify event, with the entry's name, at DEBUG: names the workload
# chose. Its warnings and errors (no names) still get through.
logging.getLogger("watchdog").setLevel(logging.INFO)
QUEUE_SIZE = 4096
TICK_SECONDS = 0.25
SWEEP_SECONDS = 2.0
STALE_TEMP_SECONDS = 30.0
_CHECK_EVERY = 256  # entries between two looks at the drain deadline


def _name(path: str | bytes) -> str:
    return os.path.basename(os.fsdecode(path))


class _Events(FileSystemEventHandler):
    """watchdog's thread: queue the names worth a look (cheap: one lstat at most)."""

    def __init__(self, intake: ActivationIntake) -> None:
        self._intake = intake

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileMovedEvent):
            self._intake.enqueue(_name(event.dest_path))
        elif isinstance(event, FileClosedEvent):
            self._intake.enqueue(_name(event.src_path))
        elif isinstance(event, FileCreatedEvent | DirCreatedEvent):
            name = _name(event.src_path)
            # An activation's name on a regular file is handled once closed or renamed
            # into place (now it would be read half-written); anything else is judged now.
            if parse_file_name(name) is None or not self._intake.is_regular(name):
                self._intake.enqueue(name)


class ActivationIntake:
    def __init__(
        self,
        directory: Path,
        handle: Callable[[Path], None],
        *,
        discard: Callable[[int], None] = lambda size: None,
        tick: Callable[[bool], object] = lambda final: None,
        drain_timeout: float = 60.0,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        self._directory = directory
        self._handle = handle
        self._discard = discard
        self._tick = tick
        self._drain_timeout = drain_timeout
        self._queue: queue.Queue[str] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()  # one entry at a time: the worker's or a drain's
        self._stop = threading.Event()
        self._rescan = threading.Event()
        self._drainers = 0  # drains waiting: the worker yields the lock to them
        self._drainers_lock = threading.Lock()
        self._temps: dict[str, float] = {}  # temporary name -> first seen (monotonic)
        self._stuck: set[str] = set()  # entries that could not be removed (logged once)
        self.dropped = 0  # events dropped on a full queue (each made a rescan due)
        self._observer = Observer()
        self._worker = threading.Thread(target=self._run, name="embassy-intake", daemon=True)
        self._started = False

    @classmethod
    def for_metering(
        cls, directory: Path, metering: MeteringService, drain_timeout: float
    ) -> ActivationIntake:
        return cls(
            directory,
            metering.handle,
            discard=metering.discard,
            tick=lambda final: metering.flush(final=final),
            drain_timeout=drain_timeout,
        )

    def start(self) -> None:
        self._observer.schedule(_Events(self), str(self._directory), recursive=False)
        self._observer.start()
        self._worker.start()
        self._started = True
        # What was left while no daemon watched (a restart) is handled too.
        self.drain()

    # -- the watchdog thread ----------------------------------------------------------------

    def enqueue(self, name: str) -> None:
        try:
            self._queue.put_nowait(name)
        except queue.Full:
            self.dropped += 1
            self._rescan.set()

    def is_regular(self, name: str) -> bool:
        try:
            return stat.S_ISREG(os.lstat(self._directory / name).st_mode)
        except OSError:
            return True  # gone already: nothing to do

    # -- the worker -------------------------------------------------------------------------

    def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_SECONDS
        while not self._stop.is_set():
            try:
                name: str | None = self._queue.get(timeout=TICK_SECONDS)
            except queue.Empty:
                name = None
            while self._drainers:  # a session is closing: let its drain in
                time.sleep(0.001)
            with self._lock:
                if name is not None:
                    self._one(name)
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

    def _one(self, name: str, st: os.stat_result | None = None) -> bool:
        """Judge one entry (lock held); True if it was an activation file handed over."""
        path = self._directory / name
        if st is None:
            try:
                st = os.lstat(path)
            except OSError:
                return False  # gone (handled already, or renamed away)
        regular = stat.S_ISREG(st.st_mode)
        if regular and parse_file_name(name) is not None:
            try:
                self._handle(path)
            except Exception as exc:  # the handler must not raise; the intake goes on
                _LOG.error("activation intake: handling a file failed (%s)", type(exc).__name__)
            return True
        if regular and TEMP_NAME.fullmatch(name):
            first = self._temps.setdefault(name, time.monotonic())
            if time.monotonic() - first < STALE_TEMP_SECONDS:
                return False  # a writer at work
            self._temps.pop(name, None)
        self._remove(path, st)
        return False

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
        finals: list[tuple[bytes, int, str, os.stat_result]] = []
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
                named = parse_file_name(entry.name)
                if named is not None and stat.S_ISREG(st.st_mode):
                    finals.append((*named, entry.name, st))
                    continue
                if stat.S_ISREG(st.st_mode) and TEMP_NAME.fullmatch(entry.name):
                    seen_temps.add(entry.name)
                self._one(entry.name, st)
        # Temporary files gone since (renamed or removed) are forgotten: the map stays
        # bounded by what is in the spool.
        if complete:
            for name in set(self._temps) - seen_temps:
                self._temps.pop(name, None)
        finals.sort()
        for done, (_, _, name, st) in enumerate(finals):
            if self._must_stop(deadline):
                return len(finals) - done
            self._one(name, st)
        return 0

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
        self._observer.stop()
        self._observer.join(timeout=5)
        self._stop.set()
        self._worker.join(timeout=5)
        self._safe_tick(final=True)  # the rejections not yet stated
