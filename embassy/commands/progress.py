"""Progress on stderr for the steps of a command that can take more than a second.

A person at a terminal sees what a long step is doing (and bytes and percent when they are
known); a script, a pipe or a log sees nothing, because stderr is not a terminal there. stdout
is never touched: it carries the command's result (its prose, or its one ``--json``
document).

``embassy --progress {auto,always,never}`` chooses: ``auto`` (the default) shows progress only
when stderr is a terminal, and then only for a step still running after :data:`DELAY`
seconds, so quick commands print nothing new; ``always`` shows every step from its start (for
tests and for logs that want it), one line per redraw when stderr is not a terminal;
``never`` is silent.

Redraws are rate-limited to one per :data:`INTERVAL` seconds. A step whose work is one
blocking call (verifying a log, a request the daemon answers) has no bytes to count, so a
ticker thread redraws its elapsed time while it runs; a step that counts bytes redraws from
:meth:`Step.advance`, and the ticker keeps the line alive between reads.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, BinaryIO, cast

DELAY = 0.5  # seconds a step runs, in `auto` mode, before it is drawn at all
INTERVAL = 0.2  # seconds between two redraws of one step
CHOICES = ("auto", "always", "never")
_CLEAR = "\r\x1b[K"  # carriage return, then erase to the end of the line


def human_bytes(n: int) -> str:
    """``n`` bytes for a person: ``512 B``, ``1.5 KiB``, ``27.0 MiB``."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class Step:
    """One step a person may wait on. Counting is cheap (:meth:`advance` only adds, and
    draws at most once an interval), so it can sit in a read loop."""

    def __init__(self, reporter: Progress | None, label: str, total: int | None) -> None:
        self._reporter = reporter
        self.label = label
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._start = 0.0 if reporter is None else reporter.clock()
        self._last_draw: float | None = None
        self.drawn = False

    def advance(self, n: int) -> None:
        """``n`` more bytes (or items) of the step are done."""
        self.done += n
        if self._reporter is not None:
            self._maybe_draw()

    def _line(self, now: float) -> str:
        elapsed = now - self._start
        if self.total:
            percent = min(100, self.done * 100 // self.total)
            what = f"{percent}% ({human_bytes(self.done)} of {human_bytes(self.total)})"
        elif self.done:
            what = human_bytes(self.done)
        else:
            what = "…"
        return f"{self.label}: {what}, {elapsed:.0f} s"

    def _maybe_draw(self) -> None:
        reporter = self._reporter
        assert reporter is not None
        now = reporter.clock()
        with self._lock:
            if now - self._start < reporter.delay:
                return
            if self._last_draw is not None and now - self._last_draw < reporter.interval:
                return
            self._last_draw = now
            self.drawn = True
            reporter.draw(self._line(now), final=False)

    def _finish(self, failed: bool) -> None:
        reporter = self._reporter
        if reporter is None:
            return
        now = reporter.clock()
        with self._lock:
            if not self.drawn and (failed or now - self._start < reporter.delay):
                return  # a quick step (or one whose error says enough) leaves no trace
            elapsed = now - self._start
            size = f"{human_bytes(self.done)}, " if self.done else ""
            state = "failed" if failed else "done"
            reporter.draw(f"{self.label}: {state} ({size}{elapsed:.1f} s)", final=True)


class Progress:
    """Draws steps on ``stream``; with ``stream=None`` every step is silent and free."""

    def __init__(
        self,
        stream: IO[str] | None,
        *,
        delay: float = DELAY,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        ticker: bool = True,
    ) -> None:
        self.stream = stream
        self.delay = delay
        self.interval = interval
        self.clock = clock
        self._ticker = ticker
        self._tty = stream is not None and stream.isatty()

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def draw(self, line: str, *, final: bool) -> None:
        assert self.stream is not None
        if self._tty:
            self.stream.write(_CLEAR + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    @contextmanager
    def step(self, label: str, total: int | None = None) -> Iterator[Step]:
        """A step, drawn while it runs (if this reporter draws) and closed when it ends."""
        step = Step(self if self.enabled else None, label, total)
        if not self.enabled:
            yield step
            return
        stop = threading.Event()
        thread = None
        if self._ticker:
            thread = threading.Thread(
                target=self._tick, args=(step, stop), name="embassy-progress", daemon=True
            )
            thread.start()
        failed = True
        try:
            if self.delay == 0:
                step._maybe_draw()  # `always`: the step shows from its start
            yield step
            failed = False
        finally:
            stop.set()
            if thread is not None:
                thread.join()
            step._finish(failed)

    def _tick(self, step: Step, stop: threading.Event) -> None:
        while not stop.wait(self.interval):
            step._maybe_draw()


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    """The main parser's ``--progress`` flag."""
    parser.add_argument(
        "--progress",
        choices=CHOICES,
        default="auto",
        help="progress of long steps on stderr: auto (when stderr is a terminal), always, never",
    )


def progress_for(args: argparse.Namespace) -> Progress:
    """The reporter a command's flags ask for (stderr, or silence)."""
    mode = getattr(args, "progress", "auto")
    if mode == "never" or (mode == "auto" and not sys.stderr.isatty()):
        return Progress(None)
    return Progress(sys.stderr, delay=0.0 if mode == "always" else DELAY)


class CountingReader:
    """A binary file that counts what is read from it into a :class:`Step` (for library
    calls that read a stream: the count is what they consumed, not a guess)."""

    def __init__(self, raw: BinaryIO, step: Step) -> None:
        self._raw = raw
        self._step = step

    def read(self, size: int = -1, /) -> bytes:
        data = self._raw.read(size)
        self._step.advance(len(data))
        return data

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def counting(raw: BinaryIO, step: Step) -> BinaryIO:
    """``raw``, counting what is read into ``step`` (enough of a file for the readers here:
    read, seek, tell)."""
    return cast(BinaryIO, CountingReader(raw, step))


def read_file(progress: Progress, path: str, label: str) -> bytes:
    """A file's bytes (``-``: stdin's), counted into a step named ``label``."""
    from embassy.commands.inputs import read_input

    if path == "-" or not progress.enabled:
        return read_input(path)
    import os

    from embassy.errors import ConfigError

    try:
        with open(path, "rb") as src:
            size = os.fstat(src.fileno()).st_size
            parts: list[bytes] = []
            with progress.step(label, size) as step:
                while chunk := src.read(1 << 20):
                    parts.append(chunk)
                    step.advance(len(chunk))
            return b"".join(parts)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
