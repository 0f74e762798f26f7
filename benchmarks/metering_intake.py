"""What the metering intake costs end to end: activation file written -> meter committed.

Run from the repository root::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m benchmarks.metering_intake [--quick]
        [--dir DIR] [--act-dir DIR] [--verbose]

No root, no TPM, no Docker: the embassy side runs in this process with the real pieces. An
``Embassy`` on a ``FakeTpm`` (tests/fakes.py: software quotes and PCRs, so every TPM
command costs microseconds, not the ~0.2-0.3 ms each of a swtpm or the milliseconds of a
hardware TPM), its real statement log (fsync'd) and SQLite registry; a real
``ActivationIntake`` (its own inotify reader on the activation directory, a worker thread
handing over groups of files) calling ``embassy.metering.handle_many`` (names checked,
files read, checked and pooled by two reader processes, their rows scored in this one, one
statement and one registry commit per group). The files are written by the SDK's
``ActivationWriter`` (mmap, then rename into place) in a process of its own, as the
workload is: in this process it would share the embassy's GIL, which it never does for
real. One authority (a key made for the run) teaches the registry 1,000 signatures of one
tensor through ``write`` instructions (20 capabilities, 50 each, about a third negative,
d=384, random normal vectors), fed to ``handle`` directly as
tests/unit/daemon/test_metering.py does. Each measured phase then opens its own session with
an ``update`` instruction for all 20 capabilities, so every file is read, checked, pooled
(formula v2's windows), scored against the authority's v2 model (fitted from the 1,000
signatures) and metered: per group of files, one ``meter-batch`` statement (signed,
fsync'd, extended into the log PCR) between two fsync'd SQLite transactions.

1. **Throughput**: N files of (128, 384) float32 (192 KiB: a 128-token MiniLM hidden state)
   and of (2048, 384) (3 MiB), written as fast as the writer goes, timed from the first
   write to the last meter committed (``handle`` is wrapped to note when it returns; the
   clock is CLOCK_MONOTONIC, the same in both processes). Writer and intake run at once on
   the same CPUs, so the figure is the pipeline's, bounded by the writer. Then **backlog**:
   N files written while the intake's worker is held (the inotify reader queues their
   names), then released: timed from the release to the last commit, the intake's own
   throughput. **Baseline, same run**: numpy reading copies of the same kind of files
   (written by the same writer to another directory on the same file system):
   ``f.read()``, ``np.frombuffer``, and formula v2 (``pool_windows``, as the daemon's
   readers compute the windows, then ``score_v2``) with the registry's own model, on one
   thread. It runs before and after the intake; the faster of
   the two is the baseline.
2. **Latency**, file closed -> meter committed: files written one at a time, each waited
   for; measured from the writer's rename into place (its last step; the writer process
   notes the time just before ``os.rename``) to ``handle`` returning. "stalls" counts
   files that waited at least 250 ms before ``handle`` was called (in a burst: gaps of at
   least 250 ms between two commits).
3. **Where the time goes**: one file at a time again, with the calls ``handle`` makes timed
   in place (wrappers on the module functions and objects it calls, removed afterwards).
   What a reader process does is timed in this process on copies of the same files (the
   same functions; the wrappers cannot reach into the workers).
4. **A flood of junk**: a session is open while N small junk files are dropped (a quarter
   named as the SDK names activation files, with junk inside; the rest other names), as
   fast as this process can create them; then the session is closed. Timed: the creation,
   the close (the drain of what the worker has not handled yet) and both together; counted:
   the log entries it cost (rejections are coalesced: a handful, not N statements).

The activation directory is on tmpfs (under ``/dev/shm``) unless ``--act-dir`` says
otherwise. The daemon keeps it under its data directory (``DATA/activations``), but neither
side syncs it (the writer does not msync, the files live only until handled), so it is
mostly page cache either way; ``--act-dir /tmp`` measures it on disk. The data directory
(log and SQLite, so every fsync) is in a temporary directory under ``--dir`` (default: the
system temp dir, on disk). Both are removed at the end. The statement log keeps its default
``checkpoint_every`` (64): a checkpoint quote every 64 statements is part of the cost.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import embassy.daemon.activation_reader as reader_module
import embassy.daemon.metering_group as group_module
import embassy.metering.activation as activation_module
from benchmarks.stats import percentile
from embassy.config import parse_config
from embassy.daemon.intake import ActivationIntake
from embassy.daemon.runtime import Embassy, TpmHandle
from embassy.measure import Measurement
from embassy.metering.actions import seal_actions
from embassy.metering.activation import parse_file_name
from embassy.metering.formula_v2 import CentroidModel, pool_windows, score_v2
from embassy.metering.instruction import Op, Polarity, make_instruction
from embassy.wire.codec import b64encode
from embassy.wire.dsse import keyid
from tests.fakes import FakeTpm
from workload_sdk.activations import ActivationWriter, file_name, header_len_for

DIM = 384
CAPABILITIES = [f"cap{i:02d}" for i in range(20)]
PER_CAPABILITY = (("positive", 33), ("negative", 17))  # 50 per capability, 1,000 in all
TENSOR = "encoder.layer.5"
AUTHORITY = "bench"
SMALL = (128, DIM)
LARGE = (2048, DIM)
DISTINCT_ARRAYS = 8  # the files cycle through this many arrays of each shape
MEASUREMENT = Measurement(code=bytes(32), config=bytes([1]) * 32, policy=bytes([2]) * 32)
WAIT_S = 120.0
ARRAY_SEED = 384
# A gap this long between a file's rename and its handling (or between two commits in a
# burst) is a stall, not work: see "stalls" in benchmarks/README.md.
STALL_US = 250_000


@dataclass(frozen=True)
class Counts:
    """(warm-up, measured) files per phase."""

    throughput_small: tuple[int, int]
    throughput_large: tuple[int, int]
    latency_small: tuple[int, int]
    latency_large: tuple[int, int]
    split_small: tuple[int, int]
    split_large: tuple[int, int]
    flood: int


FULL = Counts((10, 2000), (5, 200), (10, 500), (5, 100), (5, 200), (3, 50), 20_000)
QUICK = Counts((5, 200), (3, 30), (5, 50), (3, 10), (3, 30), (2, 10), 5_000)


# -- the embassy and its intake ------------------------------------------------------------


class Committed:
    """``embassy.metering.handle_many``, noting when each group starts and returns (once per
    file of the group)."""

    def __init__(self, handle: Callable[[Sequence[Path]], None]) -> None:
        self._handle = handle
        self._cond = threading.Condition()
        self.started_ns: list[int] = []
        self.done_ns: list[int] = []
        self.groups: list[int] = []

    def __call__(self, paths: Sequence[Path]) -> None:
        started = time.monotonic_ns()
        try:
            self._handle(paths)
        finally:
            done = time.monotonic_ns()
            with self._cond:
                self.started_ns.extend([started] * len(paths))
                self.done_ns.extend([done] * len(paths))
                self.groups.append(len(paths))
                self._cond.notify_all()

    def wait_for(self, count: int) -> int:
        """Block until ``count`` files have been handled; the time the last one was."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.done_ns) >= count, timeout=WAIT_S):
                raise RuntimeError(f"only {len(self.done_ns)} of {count} files handled")
            return self.done_ns[count - 1]


class Bench:
    def __init__(self, data_parent: Path | None, act_parent: Path | None, seed: int) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix="embassy-bench-intake-", dir=data_parent))
        self.act_root = Path(tempfile.mkdtemp(prefix="embassy-bench-act-", dir=act_parent))
        self.activations = self.act_root / "activations"
        self.copies = self.act_root / "copies"
        self.teach_dir = self.act_root / "teach"
        try:
            self._start()
            self.writer = WriterProcess(self.activations, seed)
        except BaseException:
            shutil.rmtree(self.act_root, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def _start(self) -> None:
        for d in (self.activations, self.copies, self.teach_dir):
            d.mkdir(mode=0o700)
        self.key = Ed25519PrivateKey.generate()
        tpm = FakeTpm(b"bench-metering-intake")
        data_dir = self.tmp / "data"
        data_dir.mkdir(mode=0o700)
        (data_dir / "master.sealed").write_bytes(tpm.seal(os.urandom(32), (4, 11, 12)))
        public = self.key.public_key().public_bytes_raw()
        config = parse_config(
            {
                "data_dir": str(data_dir),
                "socket": str(self.tmp / "embassy.sock"),
                "authorities": [
                    {"name": AUTHORITY, "ed25519": b64encode(public), "capabilities": CAPABILITIES}
                ],
            }
        )
        self.embassy = Embassy(config, TpmHandle(tpm), measurement=MEASUREMENT)
        self.keyid = keyid(self.embassy.keys.signing.public_key())
        self.committed = Committed(self.embassy.metering.handle_many)
        metering = self.embassy.metering
        self.intake = ActivationIntake(
            self.activations,
            self.committed,
            discard=metering.discard,
            tick=lambda final: metering.flush(final=final),
        )

    def close(self) -> None:
        try:
            self.writer.close()
            self.intake.stop()
            self.embassy.close()
        finally:
            shutil.rmtree(self.act_root, ignore_errors=True)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def begin(self, op: Op, capabilities: list[str], polarity: Polarity | None = None) -> bytes:
        """A session opened with one instruction of ``op``, as a sealed payload carries it."""
        instruction = make_instruction(
            self.key,
            op=op,
            authority=AUTHORITY,
            capabilities=capabilities,
            embassy_keyid=self.keyid,
            expires_unix=2**40,
            polarity=polarity,
        )
        session, action_key, payload_id = os.urandom(16), os.urandom(32), os.urandom(16)
        self.embassy.metering.begin(
            session,
            payload_id=payload_id,
            action_key=action_key,
            actions=seal_actions(action_key, payload_id, [instruction], unmetered_ok=False),
        )
        return session

    def finish(self, session: bytes) -> dict[str, Any]:
        summary = self.embassy.metering.finish(session, self.intake.drain)
        assert summary is not None
        return summary

    def teach(self, rng: np.random.Generator) -> float:
        """1,000 signatures through write instructions; seconds taken."""
        t0 = time.perf_counter()
        for capability in CAPABILITIES:
            for polarity, count in PER_CAPABILITY:
                session = self.begin(Op.WRITE, [capability], Polarity(polarity))
                writer = ActivationWriter(self.teach_dir, session)
                paths = [
                    writer.write(TENSOR, rng.standard_normal((4, DIM)).astype(np.float32))
                    for _ in range(count)
                ]
                self.embassy.metering.handle_many(paths)  # one group: one refit of the model
                summary = self.finish(session)
                assert summary["signatures_written"] == count, summary
        seconds = time.perf_counter() - t0
        sigs = self.embassy.registry.signature_set(TENSOR, DIM)
        assert sigs is not None
        assert sigs.size == sum(n for _, n in PER_CAPABILITY) * len(CAPABILITIES)
        return seconds

    def update_session(self) -> bytes:
        """A session metering all capabilities; the writer process writes for it from now."""
        session = self.begin(Op.UPDATE, CAPABILITIES)
        self.writer.session(session)
        return session

    def check(self, session: bytes, files: int) -> None:
        summary = self.finish(session)
        got = (summary["files"], summary["meter_updates"], summary["rejected"])
        if got != (files, files, 0):
            raise RuntimeError(f"expected {files} files metered, none rejected; got {summary}")


# -- the workload's side: a writer in its own process ---------------------------------------


def _writer_main(conn: Connection, directory: str, seed: int) -> None:
    """The writer process: writes files on request, says when each was renamed into place.

    In a deployment the writer is the workload, another process: running it here would
    make it share the embassy's GIL, which neither side does for real.
    """
    renamed: list[int] = []
    rename = os.rename

    def timed_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        # The writer's last step: the file is closed and complete; its name appears now.
        renamed.append(time.monotonic_ns())
        rename(src, dst, **kwargs)

    os.rename = timed_rename  # this process does nothing but write activation files
    arrays = activation_arrays(seed)
    writer: ActivationWriter | None = None
    while True:
        command, *args = conn.recv()
        if command == "stop":
            return
        if command == "session":
            writer = ActivationWriter(Path(directory), args[0])
            conn.send(None)
            continue
        assert command == "write"
        assert writer is not None
        shape, start, n = args
        renamed.clear()
        t0 = time.monotonic_ns()
        for i in range(start, start + n):
            writer.write(TENSOR, arrays[shape][i % DISTINCT_ARRAYS])
        conn.send((t0, time.monotonic_ns(), list(renamed)))


class WriterProcess:
    """The parent's handle on :func:`_writer_main`."""

    def __init__(self, directory: Path, seed: int) -> None:
        context = multiprocessing.get_context("spawn")  # no threads inherited
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=_writer_main, args=(child, str(directory), seed), daemon=True
        )
        self._process.start()
        child.close()

    def session(self, session: bytes) -> None:
        self._conn.send(("session", session))
        self._conn.recv()

    def write(self, shape: tuple[int, int], start: int, n: int) -> tuple[int, int, list[int]]:
        """Files ``start`` .. ``start + n - 1``: (loop start, loop end, rename times)."""
        self._conn.send(("write", shape, start, n))
        if not self._conn.poll(WAIT_S):
            raise RuntimeError("the writer process does not answer")
        t0, t1, renamed = self._conn.recv()
        return int(t0), int(t1), list(renamed)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._conn.send(("stop",))
        self._process.join(timeout=5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()


# -- the phases ----------------------------------------------------------------------------


def activation_arrays(seed: int) -> dict[tuple[int, int], list[npt.NDArray[np.float32]]]:
    """The arrays the files hold, per shape: the same in the writer process and here."""
    rng = np.random.default_rng(seed)
    return {
        shape: [rng.standard_normal(shape).astype(np.float32) for _ in range(DISTINCT_ARRAYS)]
        for shape in (SMALL, LARGE)
    }


def throughput(
    bench: Bench, shape: tuple[int, int], counts: tuple[int, int]
) -> tuple[float, float, int]:
    """(seconds from the first write to the last commit, seconds the write loop took,
    stalls: gaps of at least STALL_US between two commits)."""
    warmup, n = counts
    session = bench.update_session()
    base = len(bench.committed.done_ns)
    bench.writer.write(shape, 0, warmup)
    bench.committed.wait_for(base + warmup)
    t0, written, _ = bench.writer.write(shape, warmup, n)
    last = bench.committed.wait_for(base + warmup + n)
    bench.check(session, warmup + n)
    done = [t0, *bench.committed.done_ns[base + warmup : base + warmup + n]]
    stalls = sum(b - a >= STALL_US * 1000 for a, b in itertools.pairwise(done))
    return (last - t0) / 1e9, (written - t0) / 1e9, stalls


def backlog(bench: Bench, shape: tuple[int, int], n: int) -> tuple[float, float]:
    """(seconds from releasing a held intake with ``n`` files waiting to the last commit,
    mean files per group)."""
    session = bench.update_session()
    base = len(bench.committed.done_ns)
    groups = len(bench.committed.groups)
    with bench.intake._lock:  # the worker waits here; the reader queues the names
        bench.writer.write(shape, 0, n)
        time.sleep(0.05)  # the last events read
        t0 = time.monotonic_ns()
    last = bench.committed.wait_for(base + n)
    bench.check(session, n)
    made = bench.committed.groups[groups:]
    return (last - t0) / 1e9, n / max(1, len(made))


def p_fields(path: Path) -> tuple[bytes, int]:
    parsed = parse_file_name(path.name)
    assert parsed is not None
    return parsed


def write_copies(bench: Bench, arrays: list[npt.NDArray[np.float32]], n: int) -> list[Path]:
    """``n`` files like the intake's, by the same writer, in a directory nobody watches."""
    writer = ActivationWriter(bench.copies, os.urandom(16))
    return [writer.write(TENSOR, arrays[i % len(arrays)]) for i in range(n)]


def baseline(paths: list[Path], shape: tuple[int, int], model: CentroidModel) -> float:
    """Seconds numpy takes to read every file and score it (formula v2): the floor."""
    offset = header_len_for(TENSOR)
    count = shape[0] * shape[1]
    sink = 0
    t0 = time.perf_counter_ns()
    for path in paths:
        with path.open("rb") as f:
            raw = f.read()
        data = np.frombuffer(raw, dtype=np.float32, count=count, offset=offset).reshape(shape)
        sink += sum(score_v2(model, pool_windows(data)).values())
    seconds = (time.perf_counter_ns() - t0) / 1e9
    assert sink >= 0
    return seconds


@dataclass
class Latency:
    total_us: list[float]  # file closed -> meter committed
    handoff_us: list[float]  # file closed -> handle called (inotify, reader, queue)
    handle_us: list[float]  # handle called -> handle returned


def latency(bench: Bench, shape: tuple[int, int], counts: tuple[int, int]) -> Latency:
    """One file at a time, each waited for before the next is written."""
    warmup, n = counts
    session = bench.update_session()
    base = len(bench.committed.done_ns)
    out = Latency([], [], [])
    for i in range(warmup + n):
        _, _, (renamed,) = bench.writer.write(shape, i, 1)
        done = bench.committed.wait_for(base + i + 1)
        if i >= warmup:
            started = bench.committed.started_ns[base + i]
            out.total_us.append((done - renamed) / 1e3)
            out.handoff_us.append((started - renamed) / 1e3)
            out.handle_us.append((done - started) / 1e3)
    bench.check(session, warmup + n)
    return out


class InPlace:
    """Total nanoseconds spent in each wrapped call, while the wrappers are in place."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def _wrap(self, stack: contextlib.ExitStack, obj: object, attr: str, label: str) -> None:
        inner: Callable[..., Any] = getattr(obj, attr)
        self.ns[label] = 0
        self.calls[label] = 0
        clock = time.perf_counter_ns

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = clock()
            try:
                return inner(*args, **kwargs)
            finally:
                self.ns[label] += clock() - t0
                self.calls[label] += 1

        had_own = attr in vars(obj)
        setattr(obj, attr, timed)

        def restore() -> None:
            if had_own:
                setattr(obj, attr, inner)
            else:
                delattr(obj, attr)

        stack.callback(restore)

    @contextlib.contextmanager
    def wrapped(self, embassy: Embassy) -> Iterator[None]:
        log, registry, tpm = embassy.log, embassy.registry, embassy.tpm
        with contextlib.ExitStack() as stack:
            for obj, attr, label in (
                (embassy.metering, "_prepare", "prepare"),
                (reader_module, "decode", "decode"),
                (registry, "centroid_model", "signature_set"),
                (group_module, "score_v2", "score"),
                (registry, "stage_group", "stage_update"),
                (log, "append_statement", "statement"),
                (type(log._signer), "sign", "sign"),
                (log._entries, "append_many", "log_append"),
                (tpm, "clock", "tpm_clock"),
                (tpm, "extend", "tpm_extend"),
                (log, "_checkpoint_locked", "checkpoint"),
                (registry, "commit_group", "commit"),
            ):
                self._wrap(stack, obj, attr, label)
            yield

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """What a reader process does with one file, timed here (the same functions)."""
        with contextlib.ExitStack() as stack:
            for obj, attr, label in (
                (group_module, "read_activation_file", "read_file"),
                (activation_module, "parse_activation", "parse"),
                (activation_module, "_check_checksum", "checksum"),
                (activation_module, "_check_finite", "finite"),
                (group_module, "pool_windows", "pool"),
                (reader_module, "encode", "encode"),
            ):
                self._wrap(stack, obj, attr, label)
            yield


@dataclass
class Flood:
    files: int
    create_s: float  # creating the junk files
    close_s: float  # closing the session: the drain of what is left
    entries: int  # log entries the flood cost
    rejected: int  # counted against the session
    unattributed: int  # counted against no session


def flood(bench: Bench, n: int) -> Flood:
    session = bench.begin(Op.UPDATE, CAPABILITIES)
    before = len(bench.embassy.log.entries)
    t0 = time.perf_counter()
    for i in range(n):
        name = file_name(session, 10**6 + i) if i % 4 == 0 else f"junk-{i}"
        (bench.activations / name).write_bytes(b"j" * 64)
    t1 = time.perf_counter()
    summary = bench.finish(session)
    t2 = time.perf_counter()
    if summary["files_left"] or list(bench.activations.iterdir()):
        raise RuntimeError(f"the flood was not cleared: {summary}")
    # The session's seal and unseal statements are not the intake's: only the metering's
    # own statements (and the checkpoints they brought) are counted.
    entries = len(bench.embassy.log.entries) - before
    return Flood(n, t1 - t0, t2 - t1, entries, summary["rejected"], summary["unattributed"])


def split(bench: Bench, shape: tuple[int, int], counts: tuple[int, int]) -> dict[str, float]:
    """Mean microseconds per file of each part of one file's way, self time."""
    warmup, n = counts
    # Warm-up outside the wrappers, then the measured files one at a time.
    latency(bench, shape, (warmup, 0))
    timer = InPlace()
    with timer.wrapped(bench.embassy):
        lat = latency(bench, shape, (0, n))
    for label in ("prepare", "decode", "score", "stage_update", "statement", "commit"):
        if timer.calls[label] != n:
            raise RuntimeError(f"{label} called {timer.calls[label]} times for {n} files")
    us = {label: ns / n / 1e3 for label, ns in timer.ns.items()}
    # A reader process's work, timed in this process on copies of the same files.
    inner = InPlace()
    copies = write_copies(bench, activation_arrays(ARRAY_SEED)[shape], n)
    jobs = [group_module.Job(str(p), *p_fields(p), 64 << 20, False) for p in copies]
    with inner.reading():
        for job in jobs:
            reader_module.encode(group_module.read_job(job))
    for path in copies:
        path.unlink()
    worker = {label: ns / n / 1e3 for label, ns in inner.ns.items()}
    handle = statistics.fmean(lat.handle_us)
    parts = {
        "handoff": statistics.fmean(lat.handoff_us),
        "readers": us["prepare"] - us["decode"] - us["signature_set"] - us["score"],
        "read": worker["read_file"] - worker["parse"],
        "checksum": worker["checksum"],
        "finite": worker["finite"],
        "parse": worker["parse"] - worker["checksum"] - worker["finite"],
        "pool": worker["pool"],
        "encode": worker["encode"],
        "decode": us["decode"],
        "signature_set": us["signature_set"],
        "score": us["score"],
        "stage_update": us["stage_update"],
        "sign": us["sign"],
        "log_append": us["log_append"],
        "tpm": us["tpm_clock"] + us["tpm_extend"],
        "checkpoint": us["checkpoint"],
        "statement": us["statement"]
        - us["sign"]
        - us["log_append"]
        - us["tpm_clock"]
        - us["tpm_extend"]
        - us["checkpoint"],
        "commit": us["commit"],
    }
    inside = sum(us[k] for k in ("prepare", "stage_update", "statement", "commit"))
    parts["other"] = handle - inside
    parts["total"] = statistics.fmean(lat.total_us)
    return parts


# -- reporting -----------------------------------------------------------------------------


def _fmt_us(us: float) -> str:
    return f"{us / 1000:,.2f} ms" if us >= 1000 else f"{us:,.0f} µs"


def _mb_s(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:,.0f} MB/s"


SPLIT_ROWS: list[tuple[str | None, str]] = [
    ("handoff", "intake hand-off: rename -> inotify -> reader -> queue -> worker"),
    ("readers", "reader processes: job out, rows back (waited for)"),
    (None, "  in a reader process (timed here on copies; not on the path above)"),
    ("read", "    open, fstat, read into a bytearray"),
    ("checksum", "    SHA-256 checksum over the whole file"),
    ("finite", "    NaN/inf check"),
    ("parse", "    header checks, frombuffer"),
    ("pool", "    windows (v2: mean + windows, float64)"),
    ("encode", "    the rows' frame"),
    (None, "decode + score"),
    ("decode", "  the rows' frame checked (finite, bounded)"),
    ("signature_set", "  registry.centroid_model (cached)"),
    ("score", "  score_v2 against the model of 1,000 signatures"),
    (None, "stage + statement + commit"),
    ("stage_update", "  registry.stage_group (SQLite, fsync)"),
    ("sign", "  statement: sign (Ed25519 over the envelope)"),
    ("log_append", "  statement: log line write + fsync"),
    ("tpm", "  statement: TPM clock + PCR extend (FakeTpm)"),
    ("checkpoint", "  statement: checkpoint quote every 64, amortised"),
    ("statement", "  statement: encode, hash, lock"),
    ("commit", "  registry.commit_group (SQLite, fsync)"),
    ("other", "handle: lock, bookkeeping, unlink"),
]
GROUPS = {
    "  in a reader process (timed here on copies; not on the path above)": (
        "read",
        "checksum",
        "finite",
        "parse",
        "pool",
        "encode",
    ),
    "decode + score": ("decode", "signature_set", "score"),
    "stage + statement + commit": (
        "stage_update",
        "sign",
        "log_append",
        "tpm",
        "checkpoint",
        "statement",
        "commit",
    ),
}


def print_split(columns: dict[str, dict[str, float]]) -> None:
    header = f"  {'part (mean per file)':<66}"
    for name in columns:
        header += f" {name:>11} {'share':>6}"
    print(header)
    for key, label in SPLIT_ROWS:
        line = f"  {label:<66}"
        for parts in columns.values():
            value = sum(parts[k] for k in GROUPS[label]) if key is None else parts[key]
            line += f" {_fmt_us(value):>11} {value / parts['total']:>6.1%}"
        print(line)
    line = f"  {'= file closed -> meter committed':<66}"
    for parts in columns.values():
        line += f" {_fmt_us(parts['total']):>11} {'':>6}"
    print(line)


def _act_parent(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else None


def _fs_type(path: Path) -> str:
    """The file system type of the mount ``path`` is on (from /proc/self/mounts)."""
    best, kind = "", "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and str(path).startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer files")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the data directory")
    parser.add_argument(
        "--act-dir", type=Path, default=None, help="parent of the activation directory"
    )
    parser.add_argument("--verbose", action="store_true", help="show the embassy's warnings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.verbose else logging.ERROR)
    counts = QUICK if args.quick else FULL
    load = os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    if load > cpus / 2:
        print(f"warning: load average {load:.2f} on {cpus} CPUs: figures will be noisy")
    rng = np.random.default_rng(2026)
    started = time.perf_counter()
    bench = Bench(args.dir, _act_parent(args.act_dir), ARRAY_SEED)
    try:
        bench.intake.start()
        print(
            f"activation dir: {bench.activations} ({_fs_type(bench.activations)}); "
            f"data dir: {bench.tmp / 'data'} ({_fs_type(bench.tmp)})"
        )
        teach_s = bench.teach(rng)
        sigs = bench.embassy.registry.signature_set(TENSOR, DIM)
        assert sigs is not None
        print(
            f"registry taught {sigs.size:,} signatures ({len(CAPABILITIES)} capabilities, "
            f"d={DIM}) through write instructions in {teach_s:.1f} s"
        )
        arrays = activation_arrays(ARRAY_SEED)

        # 1. Throughput, against the numpy baseline on copies of the files.
        print("\n1. throughput: files written as fast as the writer goes -> last meter committed")
        print(
            f"  {'shape':<12} {'files':>6} {'file':>9}  {'intake':>10}  {'files/s':>8}"
            f"  {'writer alone':>12}  {'numpy baseline':>14}  {'intake/baseline':>15}"
            f"  {'stalls':>6}"
        )
        model = bench.embassy.registry.centroid_model(AUTHORITY, TENSOR, DIM)
        assert model is not None
        ratios = {}
        backlogs = []
        for shape, phase in ((SMALL, counts.throughput_small), (LARGE, counts.throughput_large)):
            n = phase[1]
            nbytes = n * arrays[shape][0].nbytes
            copies = write_copies(bench, arrays[shape], n)
            base_s = [baseline(copies, shape, model)]
            took, wrote, stalls = throughput(bench, shape, phase)
            held, per_group = backlog(bench, shape, n)
            base_s.append(baseline(copies, shape, model))
            for path in copies:
                path.unlink()
            best = min(base_s)
            ratios[shape] = best / took
            backlogs.append((shape, n, nbytes, held, per_group, best))
            print(
                f"  {shape!s:<12} {n:>6} {arrays[shape][0].nbytes / 1024:>5,.0f} KiB"
                f"  {_mb_s(nbytes, took):>10}  {n / took:>8,.0f}  {_mb_s(nbytes, wrote):>12}"
                f"  {_mb_s(nbytes, best):>14}  {ratios[shape]:>14.3f}x  {stalls:>6}"
            )
        print("  backlog: the files present at once, the intake held then released")
        print(
            f"  {'shape':<12} {'files':>6}  {'intake':>10}  {'files/s':>8}  {'files/group':>11}"
            f"  {'numpy baseline':>14}  {'intake/baseline':>15}"
        )
        for shape, n, nbytes, held, per_group, best in backlogs:
            print(
                f"  {shape!s:<12} {n:>6}  {_mb_s(nbytes, held):>10}  {n / held:>8,.0f}"
                f"  {per_group:>11.1f}  {_mb_s(nbytes, best):>14}  {best / held:>14.3f}x"
            )

        # 2. Latency, one file at a time.
        print("\n2. latency: file closed (renamed into place by the writer) -> meter committed")
        print(
            f"  {'shape':<12} {'files':>6}  {'p50':>9}  {'p99':>9}  {'mean':>9}  {'max':>9}"
            f"  {'hand-off p50':>12}  {'handle p50':>10}  {'stalls':>6}"
        )
        for shape, phase in ((SMALL, counts.latency_small), (LARGE, counts.latency_large)):
            lat = latency(bench, shape, phase)
            print(
                f"  {shape!s:<12} {phase[1]:>6}  {_fmt_us(percentile(lat.total_us, 50)):>9}"
                f"  {_fmt_us(percentile(lat.total_us, 99)):>9}"
                f"  {_fmt_us(statistics.fmean(lat.total_us)):>9}"
                f"  {_fmt_us(max(lat.total_us)):>9}"
                f"  {_fmt_us(percentile(lat.handoff_us, 50)):>12}"
                f"  {_fmt_us(percentile(lat.handle_us, 50)):>10}"
                f"  {sum(us >= STALL_US for us in lat.handoff_us):>6}"
            )

        # 3. Where the time goes.
        print("\n3. where one file's time goes (one at a time, calls timed in place)")
        columns = {
            str(SMALL): split(bench, SMALL, counts.split_small),
            str(LARGE): split(bench, LARGE, counts.split_large),
        }
        print_split(columns)
        for name, parts in columns.items():
            handle = parts["total"] - parts["handoff"]
            shape = SMALL if name == str(SMALL) else LARGE
            print(
                f"  {name}: handle alone {_mb_s(arrays[shape][0].nbytes, handle / 1e6)} "
                f"({1e6 / handle:,.0f} files/s on one worker thread)"
            )

        # 4. A flood of junk while a session is open.
        print("\n4. a flood of junk files while a session is open, then the session closed")
        result = flood(bench, counts.flood)
        rate = result.files / (result.create_s + result.close_s)
        print(
            f"  {result.files:,} files: created in {result.create_s:.2f} s, session closed "
            f"{result.close_s:.2f} s later ({rate:,.0f} files/s cleared); "
            f"{result.rejected:,} rejected against the session, "
            f"{result.unattributed:,} against none; {result.entries} log entries"
        )
    finally:
        bench.close()
    print(
        f"\n({'quick' if args.quick else 'full'} run in {time.perf_counter() - started:.0f} s, "
        f"{cpus} CPUs, load average {load:.2f} at start, numpy {np.__version__}, "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}; "
        "MB = 10^6 bytes of activation data)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
