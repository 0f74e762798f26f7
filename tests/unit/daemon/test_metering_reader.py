"""The reader processes (embassy.daemon.activation_reader): the daemon's own verdicts, rows
bit for bit, and a worker that dies, hangs or lies costs one file, never the metering."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from embassy.daemon import activation_reader
from embassy.daemon.activation_reader import ReaderPool, decode, encode
from embassy.daemon.metering_group import FOREIGN, Job, Rows, read_job
from workload_sdk.activations import ActivationWriter

ROOT = Path(__file__).resolve().parents[3]
VECTORS = ROOT / "tests" / "vectors" / "activations"
EXPECTED = json.loads((VECTORS / "expected.json").read_bytes())
SESSION = bytes.fromhex("5e55104e" * 4)


@pytest.fixture(scope="module")
def pool() -> Iterator[ReaderPool]:
    readers = ReaderPool(2, timeout=5.0)
    readers.start()
    yield readers
    readers.close()


def _same(a: Rows | str, b: Rows | str) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    return (a.tensor, a.sha256, a.nbytes) == (b.tensor, b.sha256, b.nbytes) and (
        a.windows.dtype == b.windows.dtype and np.array_equal(a.windows, b.windows)
    )


def test_every_vector_gets_the_verdict_and_rows_of_the_daemons_own_reading(
    pool: ReaderPool, tmp_path: Path
) -> None:
    jobs = []
    for name, expected in sorted(EXPECTED.items()):
        path = tmp_path / f"{name}.act"
        shutil.copyfile(VECTORS / f"{name}.act", path)
        good = expected["expect"] == "ok"
        session = bytes.fromhex(expected["session"]) if good else SESSION
        jobs.append(Job(str(path), session, expected["seq"] if good else 7, 4096, False))
    got = dict(pool.read(jobs))
    assert sorted(got) == list(range(len(jobs)))
    for i, (name, expected) in enumerate(sorted(EXPECTED.items())):
        here = read_job(jobs[i])
        assert _same(got[i], here), name
        if expected["expect"] == "ok":
            assert isinstance(got[i], Rows), name
        else:
            assert got[i] == expected["expect"], name


def test_header_and_name_disagreeing_and_a_zero_mean_are_refused_there_too(
    pool: ReaderPool, tmp_path: Path
) -> None:
    writer = ActivationWriter(tmp_path, SESSION)
    ok = writer.write("t", np.ones((3, 4), dtype=np.float32))
    zero = writer.write("t", np.zeros((3, 4), dtype=np.float32))
    jobs = [
        Job(str(ok), SESSION, 5, 1 << 20, False),  # the file says seq 0
        Job(str(zero), SESSION, 1, 1 << 20, True),  # a write needs a nonzero mean
        Job(str(zero), SESSION, 1, 1 << 20, False),
        Job(str(tmp_path / "gone.act"), SESSION, 2, 1 << 20, False),
    ]
    got = dict(pool.read(jobs))
    assert got[0] == got[1] == "activation-corrupt"
    assert isinstance(got[2], Rows)
    assert got[3] == ""  # vanished before it was read: not counted
    assert all(_same(got[i], read_job(j)) for i, j in enumerate(jobs))


def _job(tmp_path: Path) -> Job:
    path = ActivationWriter(tmp_path, SESSION).write("t", np.ones((16, 4), dtype=np.float32))
    return Job(str(path), SESSION, 0, 1 << 20, False)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def _dead(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (OSError, IndexError):
        return True


def test_a_worker_killed_on_a_file_costs_that_file_and_is_replaced(tmp_path: Path) -> None:
    readers = ReaderPool(1, timeout=10.0)
    try:
        readers.start()
        (pid,) = readers.pids()
        job = _job(tmp_path)
        os.kill(pid, signal.SIGSTOP)  # so that it is on the file when it dies
        threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
        assert list(readers.read([job])) == [(0, FOREIGN)]
        assert readers.restarts == 1
        assert readers.pids() == []  # replaced at the next file
        ((_, again),) = list(readers.read([job]))
        assert isinstance(again, Rows)
        # Killed between two files: the next file does not notice (a new worker reads it).
        (pid,) = readers.pids()
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: _dead(pid))
        ((_, after),) = list(readers.read([job]))
        assert isinstance(after, Rows)
        assert readers.restarts == 2
        assert readers.pids() != [pid]
    finally:
        readers.close()


def test_a_worker_that_hangs_is_killed_at_the_timeout(tmp_path: Path) -> None:
    readers = ReaderPool(1, timeout=0.5)
    try:
        readers.start()
        (pid,) = readers.pids()
        job = _job(tmp_path)
        os.kill(pid, signal.SIGSTOP)
        assert list(readers.read([job])) == [(0, FOREIGN)]
        assert readers.restarts == 1
        assert _dead(pid)
        ((_, ok),) = list(readers.read([job]))
        assert isinstance(ok, Rows)
    finally:
        readers.close()


def test_a_batch_left_half_read_does_not_answer_the_next_one(tmp_path: Path) -> None:
    readers = ReaderPool(1, timeout=10.0)
    try:
        writer = ActivationWriter(tmp_path, SESSION)
        paths = [writer.write(f"t{i}", np.full((4, 4), i + 1, np.float32)) for i in range(4)]
        jobs = [Job(str(p), SESSION, i, 1 << 20, False) for i, p in enumerate(paths)]
        batch = readers.read(jobs)
        first = next(batch)
        assert first[0] == 0
        batch.close()  # the caller gave up: files 1 and 2 were queued to the worker
        assert readers.restarts == 1
        got = dict(readers.read(jobs[2:][::-1]))  # file 3 as job 0, file 2 as job 1
        assert [r.tensor for r in (got[0], got[1]) if isinstance(r, Rows)] == ["t3", "t2"]
    finally:
        readers.close()


def test_close_stops_the_workers() -> None:
    readers = ReaderPool(2)
    readers.start()
    pids = readers.pids()
    assert len(pids) == 2
    readers.close()
    for pid in pids:
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def test_what_a_worker_sends_is_checked_never_unpickled() -> None:
    rows = Rows("model.layers.3/mlp:out", bytes(range(32)), 48, np.ones((2, 4), np.float32))
    back = decode(encode(rows))
    assert isinstance(back, Rows)
    assert _same(back, rows)
    assert decode(encode("activation-truncated")) == "activation-truncated"
    assert decode(encode("")) == ""
    frame = encode(rows)
    text = len("model.layers.3/mlp:out")
    head = activation_reader._RESULT.size
    bad = {
        "unknown code": encode("no-such-code"),
        "a name outside the alphabet": frame[:head]
        + b"model layers.3/mlp:out"
        + frame[head + text :],
        "rows cut short": frame[:-4],
        "a NaN row": encode(Rows("t", bytes(32), 8, np.array([[np.nan, 1.0]], np.float32))),
        "short": frame[:10],
    }
    for why, raw in bad.items():
        with pytest.raises(ValueError):
            decode(raw)
        assert why
