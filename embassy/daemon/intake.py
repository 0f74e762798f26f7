"""Watch the activation directory and hand each finished file to one handler thread.

The directory is shared with the untrusted workload, which writes ``*.act`` files (temp
name, then rename: see ``workload_sdk.activations``). watchdog's inotify observer reports
renames and closed writes; a single worker thread handles the files one at a time, in the
order they were finished, so per-session sequence numbers arrive in order. ``drain()``
handles, on the caller's thread and under the same lock, every file present right now:
closing a session calls it so the unseal statement can say what was metered.

The handler must not raise; if it does anyway, the worker logs it and goes on: nothing a
workload writes may stop the intake.
"""

from __future__ import annotations

import logging
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

_LOG = logging.getLogger(__name__)
SUFFIX = ".act"
_STOP = Path("/nonexistent/stop")


def _wanted(path: str | bytes) -> Path | None:
    text = path.decode(errors="replace") if isinstance(path, bytes) else path
    candidate = Path(text)
    if candidate.suffix != SUFFIX or candidate.name.startswith("."):
        return None  # a temp file still being written, or not an activation at all
    return candidate


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except FileNotFoundError:
        return True  # gone already: nothing to do


class _Events(FileSystemEventHandler):
    def __init__(self, enqueue: Callable[[Path], None]) -> None:
        self._enqueue = enqueue

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileMovedEvent):
            path = _wanted(event.dest_path)
        elif isinstance(event, FileClosedEvent):
            path = _wanted(event.src_path)
        elif isinstance(event, FileCreatedEvent):
            # A regular file is handled once closed or renamed into place (handling it at
            # creation would read it half-written); anything else (a symlink, FIFO, device
            # or socket) is never written-and-closed, so it is handled (refused) now.
            path = _wanted(event.src_path)
            if path is not None and _is_regular(path):
                return
        else:
            return
        if path is not None:
            self._enqueue(path)


class ActivationIntake:
    def __init__(self, directory: Path, handle: Callable[[Path], None]) -> None:
        self._directory = directory
        self._handle = handle
        self._queue: queue.Queue[Path] = queue.Queue()
        self._lock = threading.Lock()
        self._observer = Observer()
        self._worker = threading.Thread(target=self._run, name="embassy-intake", daemon=True)
        self._started = False

    def start(self) -> None:
        self._observer.schedule(_Events(self._queue.put), str(self._directory), recursive=False)
        self._observer.start()
        self._worker.start()
        self._started = True
        # Files finished while no daemon watched (a restart) are handled too.
        self.drain()

    def _handle_one(self, path: Path) -> None:
        try:
            self._handle(path)
        except Exception:
            _LOG.exception("activation intake: handling %s failed", path.name)

    def _run(self) -> None:
        while True:
            path = self._queue.get()
            if path == _STOP:
                return
            with self._lock:
                if path.exists() or path.is_symlink():
                    self._handle_one(path)

    def pending(self) -> list[Path]:
        # A directory cannot be an activation nor be unlinked like one; it is left alone
        # (lstat: a symlink to a directory is handled, that is refused and removed).
        return sorted(
            p
            for p in self._directory.iterdir()
            if _wanted(str(p)) is not None and not stat.S_ISDIR(p.lstat().st_mode)
        )

    def drain(self) -> int:
        """Handle every finished file present now; return how many."""
        with self._lock:
            paths = self.pending()
            for path in paths:
                self._handle_one(path)
            return len(paths)

    def stop(self) -> None:
        if not self._started:
            return
        self._observer.stop()
        self._observer.join(timeout=5)
        self._queue.put(_STOP)
        self._worker.join(timeout=5)
