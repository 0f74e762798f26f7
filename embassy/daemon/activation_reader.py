"""Activation files read and parsed in worker processes, never in the daemon's own.

The files are written by the untrusted workload; the daemon runs as root. Reading one is
the strict parse of ``embassy.metering.activation``, the SHA-256 checksum over every byte,
the NaN/inf check and formula v2's windows (``metering_group.read_rows``): hundreds of
microseconds of Python and numpy per small file, and Python threads sharing one GIL barely
overlap. So :class:`ReaderPool` hands each file's *name* to one of a few worker processes
(two: two cores); each does all of that and sends back only what metering needs: the
tensor name, the checksum, the data's size and the windows (float32 rows), or the verdict
(an ``ActivationError`` code, exactly the one the daemon's own reading gives). Scoring
stays in the daemon (the models change with every signature commit, and m rows against a
model is one small matrix product).

What this buys besides both cores:

- The daemon no longer parses workload-written bytes in its own address space. What a
  worker sends back is a fixed binary frame, never a pickle (unpickling what a subverted
  worker sent would run its code in the daemon), and it is checked (:func:`decode`): a
  known code, a tensor name of the format's alphabet, finite rows of a bounded size. A
  worker that lies can say no more than the workload can by writing a valid file: the
  session and sequence are the daemon's, decided from the name before the worker is asked.
- A worker that dies (a crash on a hostile file, a kill) or answers nonsense is replaced,
  and the file it was on is refused (``activation-foreign``: the embassy could not read it,
  as for a file that cannot be opened); one that takes longer than :data:`FILE_TIMEOUT` is
  killed, the same way. A hostile file costs one file and a restart, never the metering.
- Workers are separate interpreters (``subprocess``, never a fork of the multi-threaded
  daemon, and not ``multiprocessing``, which re-imports the parent's main module in the
  child and speaks pickle): ``python -P`` in ``/``, an environment of the import path, one
  BLAS thread and malloc settings only, stdin/stdout/stderr to /dev/null (a traceback could
  quote the file); one socket to the daemon. They stop when the daemon closes the pool, or
  at end of file on that socket (the daemon gone).

Not done here: dropping the workers to a uid of their own that can only read the spool.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from embassy.daemon.metering_group import FOREIGN, Job, Rows, read_job
from embassy.errors import ActivationError
from workload_sdk.activations import MAX_NAME_LEN, NAME, SESSION_LEN

_LOG = logging.getLogger(__name__)
PROCESSES = 2
FILE_TIMEOUT = 30.0  # seconds one file may take (a 64 MiB file takes well under one)
DEPTH = 2  # files queued per worker: the one it reads and the next
MAX_ROWS_BYTES = 1 << 30  # a frame's rows: more than any file the limits allow

# Frames, each behind a u32 length. A job: session, seq, max_bytes, nonzero, then the path.
_JOB = struct.Struct("<16sQQB")
# A result: kind (0 rows, 1 refusal), text length (tensor name or code), sha256, data size,
# rows, dim; then the text, then rows x dim float32 (native order: both ends are this host).
_RESULT = struct.Struct("<BH32sQII")
_LEN = struct.Struct("<I")


def _codes() -> frozenset[str]:
    found: set[str] = {""}
    todo: list[type[ActivationError]] = [ActivationError]
    while todo:
        cls = todo.pop()
        found.add(cls.code)
        todo.extend(cls.__subclasses__())
    return frozenset(found)


_CODES = _codes()  # what a worker may answer: "" (gone) and ActivationError codes


# -- frames (both sides) ------------------------------------------------------------------


def encode_job(job: Job) -> bytes:
    path = os.fsencode(job.path)
    return _JOB.pack(job.session, job.seq, job.max_bytes, int(job.nonzero)) + path


def decode_job(frame: bytes) -> Job:
    session, seq, max_bytes, nonzero = _JOB.unpack_from(frame)
    return Job(os.fsdecode(frame[_JOB.size :]), session, seq, max_bytes, bool(nonzero))


def encode(outcome: Rows | str) -> bytes:
    if isinstance(outcome, str):
        text = outcome.encode("ascii")
        return _RESULT.pack(1, len(text), bytes(32), 0, 0, 0) + text
    windows = np.ascontiguousarray(outcome.windows, dtype=np.float32)
    text = outcome.tensor.encode("ascii")
    rows, dim = windows.shape
    head = _RESULT.pack(0, len(text), outcome.sha256, outcome.nbytes, rows, dim)
    return head + text + windows.tobytes()


def decode(frame: bytes) -> Rows | str:
    """A worker's answer, checked; ValueError for anything a worker does not send."""
    if len(frame) < _RESULT.size:
        raise ValueError("short result")
    kind, text_len, sha256, nbytes, rows, dim = _RESULT.unpack_from(frame)
    text = frame[_RESULT.size : _RESULT.size + text_len]
    if len(text) != text_len:
        raise ValueError("short result")
    body = memoryview(frame)[_RESULT.size + text_len :]
    if kind == 1:
        code = text.decode("ascii", errors="replace")
        if code not in _CODES or len(body):
            raise ValueError("unknown code")
        return code
    if kind != 0 or not 1 <= text_len <= MAX_NAME_LEN or NAME.fullmatch(text) is None:
        raise ValueError("bad tensor name")
    if rows < 1 or dim < 1 or len(body) != rows * dim * 4 or len(body) > MAX_ROWS_BYTES:
        raise ValueError("bad rows")
    # A read-only view of the frame (no copy): scoring and the registry only read rows.
    windows = np.frombuffer(body, dtype=np.float32).reshape(rows, dim)
    if not np.isfinite(windows).all():
        raise ValueError("non-finite rows")
    return Rows(text.decode("ascii"), sha256, nbytes, windows)


def _recv_frame(sock: socket.socket) -> bytes | None:
    """One frame, or None at end of file."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (length,) = _LEN.unpack(head)
    if length > MAX_ROWS_BYTES + 4096:
        raise ValueError("frame too long")
    return _recv_exact(sock, length)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            return None
        got += k
    return bytes(buf)


def _send_frame(sock: socket.socket, frame: bytes) -> None:
    sock.sendall(_LEN.pack(len(frame)) + frame)


# -- the worker ---------------------------------------------------------------------------


def serve(fd: int) -> None:
    """A worker's loop: read the jobs on socket ``fd`` until end of file."""
    sock = socket.socket(fileno=fd)
    while True:
        frame = _recv_frame(sock)
        if frame is None:
            return
        job = decode_job(frame)
        if len(job.session) != SESSION_LEN:  # pragma: no cover (the daemon's own frame)
            return
        _send_frame(sock, encode(read_job(job)))


# -- the daemon's side --------------------------------------------------------------------


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    queued: deque[tuple[int, float]] = field(default_factory=deque)  # (job, deadline)

    def stop(self, *, kill: bool) -> None:
        if not kill:
            self.sock.close()  # end of file: the worker returns
            try:
                self.process.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                kill = True
        if kill:
            self.process.kill()
            self.process.wait(timeout=5.0)
            self.sock.close()


def _kill_all(workers: list[_Worker | None]) -> None:
    for slot, worker in enumerate(workers):
        if worker is not None:
            worker.stop(kill=True)
            workers[slot] = None


# glibc's malloc in a fresh process returns every buffer of a file's size (its bytes, the
# windows' float64 sums) to the kernel when freed and faults it in again for the next file:
# a worker read a 3 MiB file in ~7 ms instead of ~4.7 (and a 192 KiB one in ~600 us instead
# of ~450). Fixed thresholds keep such buffers in the heap (benchmarks/metering_intake.py).
_MALLOC = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=134217728"


def _environment() -> dict[str, str]:
    """The worker's whole environment: the daemon's import path, one BLAS thread, malloc."""
    path = os.pathsep.join(p for p in sys.path if p and os.path.isabs(p))
    return {
        "PYTHONPATH": path,
        "OPENBLAS_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "GLIBC_TUNABLES": _MALLOC,
    }


class ReaderPool:
    """A few worker processes reading activation files (see the module docstring)."""

    def __init__(self, processes: int = PROCESSES, *, timeout: float = FILE_TIMEOUT) -> None:
        if processes < 1:
            raise ValueError("reader pool: at least one process")
        self._timeout = timeout
        self._workers: list[_Worker | None] = [None] * processes
        self._lock = threading.Lock()  # one batch at a time
        self.restarts = 0  # workers replaced (died, hung or answered nonsense)
        # A pool dropped without close() (a test's abandoned daemon) still ends its workers.
        weakref.finalize(self, _kill_all, self._workers)

    def _start(self, slot: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-P",  # no script or working directory on the import path
                    "-c",
                    f"from embassy.daemon.activation_reader import serve; serve({theirs.fileno()})",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                # A traceback could quote what the workload wrote: the daemon logs that a
                # worker failed, never why in its words.
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env=_environment(),
                close_fds=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        # A worker that stops reading, or sends half a frame and hangs, fails a send or a
        # receive after the file timeout instead of blocking the daemon.
        ours.settimeout(self._timeout)
        worker = _Worker(process, ours)
        self._workers[slot] = worker
        return worker

    def start(self) -> None:
        """Start the workers now (else at the first file)."""
        with self._lock:
            for slot, worker in enumerate(self._workers):
                if worker is None:
                    self._start(slot)

    def pids(self) -> list[int]:
        """The workers' process ids (tests)."""
        return [w.process.pid for w in self._workers if w is not None]

    def read(self, jobs: Sequence[Job]) -> Iterator[tuple[int, Rows | str]]:
        """(index, rows or refusal code) of every job, in the order they complete."""
        with self._lock:
            try:
                yield from self._read(jobs)
            finally:
                # Left before the end (the caller raised): a worker still on one of these
                # files would answer the next batch with it. Replaced, never reused.
                for slot, worker in enumerate(self._workers):
                    if worker is not None and worker.queued:
                        worker.queued.clear()
                        self._replace(slot, "left with files of an abandoned batch")

    def _read(self, jobs: Sequence[Job]) -> Iterator[tuple[int, Rows | str]]:
        pending = deque(range(len(jobs)))
        left = len(jobs)
        while left:
            try:
                self._fill(jobs, pending)
            except OSError as exc:  # no process could be started (a pid or memory limit)
                _LOG.error("activation reader not started (%s)", exc.strerror)
                if not any(w is not None and w.queued for w in self._workers):
                    while pending:  # nothing to wait for: refused, as unreadable files are
                        left -= 1
                        yield pending.popleft(), FOREIGN
                    continue
            busy = [w for w in self._workers if w is not None and w.queued]
            if not busy:
                continue  # every worker was found dead on sending: new ones start
            first = min(w.queued[0][1] for w in busy)
            ready, _, _ = select.select(
                [w.sock for w in busy], [], [], max(0.0, first - time.monotonic())
            )
            for slot in range(len(self._workers)):
                done = self._collect(slot, ready, pending)
                if done is not None:
                    left -= 1
                    yield done

    def _fill(self, jobs: Sequence[Job], pending: deque[int]) -> None:
        """Queue files to every worker, up to DEPTH each (starting the missing ones)."""
        for slot in range(len(self._workers)):
            worker = self._workers[slot] or self._start(slot)
            while pending and len(worker.queued) < DEPTH:
                index = pending.popleft()
                try:
                    _send_frame(worker.sock, encode_job(jobs[index]))
                except OSError:
                    pending.appendleft(index)
                    if not worker.queued:  # nothing to wait for: replace it now
                        self._replace(slot, "gone before a file")
                    break  # else its end of file shows when its answer is awaited
                # The second file starts when the first is done: its deadline is reset then.
                deadline = time.monotonic() + self._timeout * (1 + len(worker.queued))
                worker.queued.append((index, deadline))

    def _collect(
        self, slot: int, ready: Sequence[socket.socket], pending: deque[int]
    ) -> tuple[int, Rows | str] | None:
        """The outcome of the file ``slot``'s worker is on, if it answered, died or timed
        out; None while it works."""
        worker = self._workers[slot]
        if worker is None or not worker.queued:
            return None
        index, deadline = worker.queued[0]
        if worker.sock in ready:
            try:
                frame = _recv_frame(worker.sock)
                outcome = None if frame is None else decode(frame)
            except (OSError, ValueError):
                outcome = None
            if outcome is None:
                self._lost(slot, "died or answered nonsense on a file", pending)
                return index, FOREIGN
            worker.queued.popleft()
            if worker.queued:  # the next file starts now
                nxt, _ = worker.queued.popleft()
                worker.queued.appendleft((nxt, time.monotonic() + self._timeout))
            return index, outcome
        if time.monotonic() >= deadline:
            self._lost(slot, "timed out on a file", pending)
            return index, FOREIGN
        return None

    def _lost(self, slot: int, why: str, pending: deque[int]) -> None:
        """The worker in ``slot`` failed on its first queued file: that file is refused
        (by the caller); the others it had queued go back; a new worker starts."""
        worker = self._workers[slot]
        assert worker is not None
        worker.queued.popleft()
        pending.extendleft(reversed([i for i, _ in worker.queued]))
        worker.queued.clear()
        self._replace(slot, why)

    def _replace(self, slot: int, why: str) -> None:
        worker = self._workers[slot]
        assert worker is not None
        worker.stop(kill=True)
        self._workers[slot] = None
        self.restarts += 1
        _LOG.error("activation reader %s; a new one starts", why)

    def close(self) -> None:
        with self._lock:
            for slot, worker in enumerate(self._workers):
                if worker is not None:
                    worker.stop(kill=False)
                    self._workers[slot] = None
