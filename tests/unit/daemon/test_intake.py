"""The intake judges every entry of the spool by name and type, and leaves nothing behind.

A real ActivationIntake (its inotify reader and worker threads) on a plain directory; the
spool's own tmpfs is tested in test_spool.py (root only).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import embassy.daemon.intake as intake_module
import embassy.daemon.metering as metering_module
from embassy.daemon import metering_group
from embassy.daemon.intake import ActivationIntake
from embassy.daemon.runtime import Embassy
from tests.unit.conftest import EmbassyFactory
from workload_sdk.activations import ActivationWriter, file_name

SESSION = bytes(range(16))


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


class Recorder:
    """A handle that notes the names it got and removes them, as the metering service does."""

    def __init__(self, delay: float = 0.0) -> None:
        self.handled: list[str] = []
        self.threads: list[str] = []  # which thread handled each
        self.discarded: list[int] = []
        self.groups: list[int] = []  # the size of each group handed over
        self.ticks = 0
        self.delay = delay
        self.lock = threading.Lock()

    def handle(self, paths: Sequence[Path]) -> None:
        for path in paths:
            time.sleep(self.delay)
            with self.lock:
                self.handled.append(path.name)
                self.threads.append(threading.current_thread().name)
            path.unlink(missing_ok=True)
        with self.lock:
            self.groups.append(len(paths))

    def discard(self, size: int) -> None:
        with self.lock:
            self.discarded.append(size)

    def tick(self, final: bool) -> None:
        self.ticks += 1


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    directory = tmp_path / "activations"
    directory.mkdir()
    return directory


@pytest.fixture
def make_intake(spool: Path) -> Iterator[Callable[..., tuple[ActivationIntake, Recorder]]]:
    started: list[ActivationIntake] = []

    def make(**kwargs: Any) -> tuple[ActivationIntake, Recorder]:
        recorder = Recorder(kwargs.pop("delay", 0.0))
        intake = ActivationIntake(
            spool,
            recorder.handle,
            discard=recorder.discard,
            tick=recorder.tick,
            **kwargs,
        )
        intake.start()
        started.append(intake)
        return intake, recorder

    yield make
    for intake in started:
        intake.stop()


def test_junk_is_removed_unread_and_activations_are_handed_over(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]], spool: Path, tmp_path: Path
) -> None:
    _, recorder = make_intake()
    outside = tmp_path / "secret"
    outside.write_text("do not touch")
    # Junk is removed as soon as it is created; made elsewhere and moved in whole, its
    # size when removed is known (the intake can be faster than a write in place).
    staging = tmp_path / "staging"
    staging.mkdir()
    for junk, data in (
        ("notes.txt", b"x" * 10),
        (".hidden", b"y" * 20),
        ("Z" * 200, b"{junk"),
        ("a\nb.act", b"z"),
    ):
        (staging / junk).write_bytes(data)
        os.rename(staging / junk, spool / junk)
    (staging / "sub").mkdir()
    (staging / "sub" / "deep.act").write_bytes(b"q" * 100)
    os.rename(staging / "sub", spool / "sub")
    os.symlink(outside, spool / file_name(SESSION, 0))
    os.mkfifo(spool / file_name(SESSION, 1))  # opening it would block: it never is
    name = file_name(SESSION, 2)
    (spool / name).write_bytes(b"an activation's name: the handler judges it")
    wait_until(lambda: not list(spool.iterdir()))
    assert recorder.handled == [name]
    assert outside.read_text() == "do not touch"
    assert len(recorder.discarded) == 7
    assert {10, 20, 5, 1} <= set(recorder.discarded)


def test_a_writers_temporary_file_is_left_alone_until_it_is_stale(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]],
    spool: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(intake_module, "STALE_TEMP_SECONDS", 1.5)
    monkeypatch.setattr(intake_module, "SWEEP_SECONDS", 0.1)
    _, recorder = make_intake()
    temp = spool / f".{SESSION.hex()}-7.tmp"
    temp.write_bytes(b"half written")
    time.sleep(0.3)
    assert temp.exists()  # a writer at work
    wait_until(lambda: not temp.exists(), timeout=5)
    assert recorder.discarded == [len(b"half written")]


def test_the_sdk_writer_is_never_broken_and_every_file_is_metered(
    make_embassy: EmbassyFactory, tpm: Any, spool: Path
) -> None:
    embassy: Embassy = make_embassy(tpm)
    intake = ActivationIntake.for_metering(spool, embassy.metering, drain_timeout=10)
    intake.start()
    try:
        session = os.urandom(16)
        embassy.metering.begin(session)
        writer = ActivationWriter(spool, session)
        rng = np.random.default_rng(0)
        for _ in range(50):
            writer.write("layer.6", rng.normal(size=(4, 8)).astype(np.float32))
        summary = embassy.metering.finish(session, intake.drain)
    finally:
        intake.stop()
    assert summary is not None
    assert (summary["files"], summary["rejected"], summary["files_left"]) == (50, 0, 0)
    assert not list(spool.iterdir())


def test_a_full_queue_holds_the_reader_back_and_every_file_is_handled(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]], spool: Path
) -> None:
    intake, recorder = make_intake(queue_size=4, delay=0.002)
    names = [file_name(SESSION, seq) for seq in range(300)]
    for seq, name in enumerate(names):
        temp = spool / f".{SESSION.hex()}-{seq}.tmp"  # as the SDK's writer names it
        temp.write_bytes(b"x")
        os.rename(temp, spool / name)
    wait_until(lambda: len(recorder.handled) == len(names), timeout=60)
    assert intake.waited > 0  # the reader waited for room: back-pressure, nothing dropped
    assert sorted(recorder.handled) == names  # each once, none lost
    assert max(recorder.groups) > 1  # what was queued together went together


def test_groups_are_bounded_in_files_and_bytes(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]], spool: Path
) -> None:
    intake, recorder = make_intake(group_files=8, group_bytes=1000)
    intake.stop()  # the drain alone: everything present at once
    for seq in range(20):
        (spool / file_name(SESSION, seq)).write_bytes(b"x" * 10)
    assert intake.drain() == 0
    assert recorder.groups == [8, 8, 4]
    assert recorder.handled == [file_name(SESSION, seq) for seq in range(20)]
    for seq in range(20, 26):
        (spool / file_name(SESSION, seq)).write_bytes(b"x" * 400)
    assert intake.drain() == 0
    assert recorder.groups[3:] == [2, 2, 2]  # 1000 bytes a group


def test_drain_handles_in_sequence_order_and_honours_its_timeout(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]], spool: Path
) -> None:
    intake, recorder = make_intake(drain_timeout=0.5, delay=0.05, group_files=1)
    intake.stop()  # the worker out of the way: the drain alone handles
    names = [file_name(SESSION, seq) for seq in (3, 1, 2, 0)] + [file_name(SESSION, 10**12)]
    for name in names:
        (spool / name).write_bytes(b"x")
    started = time.monotonic()
    assert intake.drain() == 0
    assert recorder.handled == sorted(names, key=lambda n: int(n[33:-4]))
    for seq in range(100):
        (spool / file_name(SESSION, seq)).write_bytes(b"x")
    left = intake.drain()
    elapsed = time.monotonic() - started
    assert 80 <= left < 100  # 0.05 s a file, 0.5 s to drain
    assert elapsed < 1.5


def test_the_workers_sweep_yields_to_a_closing_sessions_drain(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]], spool: Path
) -> None:
    """A drain does not wait for a whole sweep of the worker's (a flood makes it long):
    the worker lets go between two files, and the drain carries on in sequence order."""
    intake, recorder = make_intake(queue_size=1, delay=0.02, drain_timeout=30, group_files=1)
    real, entered, release = recorder.handle, threading.Event(), threading.Event()

    def first_waits(paths: Sequence[Path]) -> None:
        if not entered.is_set():
            entered.set()
            release.wait(10)
        real(paths)

    intake._handle = first_waits

    def put(seq: int) -> None:
        temp = spool / f".{SESSION.hex()}-{seq}.tmp"
        temp.write_bytes(b"x")
        os.rename(temp, spool / file_name(SESSION, seq))

    put(0)
    entered.wait(10)  # the worker holds its lock on file 0 ...
    for seq in range(1, 150):
        put(seq)  # ... while the queue overflows: its next step is a sweep of all 149
    release.set()
    wait_until(lambda: len(recorder.handled) >= 5)  # the worker is in that sweep
    assert intake.drain() == 0
    assert not list(spool.iterdir())
    by_drain = recorder.threads.count(threading.current_thread().name)
    assert by_drain > 100, recorder.threads.count("embassy-intake")


def test_a_handler_that_raises_does_not_stop_the_intake(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]],
    spool: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    intake, recorder = make_intake()
    real = recorder.handle
    secret = "Y" * 40

    def handle(paths: Sequence[Path]) -> None:
        for path in paths:
            if path.name.endswith("0.act"):
                path.unlink()
                raise ValueError(f"a parser quoting the workload: {secret}")
        real(paths)

    intake._handle = handle
    (spool / file_name(SESSION, 0)).write_bytes(b"x")
    (spool / file_name(SESSION, 1)).write_bytes(b"x")
    wait_until(lambda: recorder.handled == [file_name(SESSION, 1)])
    assert "handling a file failed (ValueError)" in caplog.text
    assert secret not in caplog.text


def test_a_flood_of_junk_is_cleared_within_the_drain_timeout(
    make_intake: Callable[..., tuple[ActivationIntake, Recorder]], spool: Path
) -> None:
    intake, recorder = make_intake(drain_timeout=5)
    for i in range(5000):
        (spool / f"junk-{i}").write_bytes(b"j")
        if i % 2 == 0:
            (spool / file_name(SESSION, i)).write_bytes(b"a")
    started = time.monotonic()
    left = intake.drain()
    assert left == 0
    assert time.monotonic() - started < 5
    wait_until(lambda: not list(spool.iterdir()))
    assert len(recorder.handled) == 2500


def test_closing_a_session_drains_within_the_configured_timeout(
    make_embassy: EmbassyFactory, tpm: Any, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``metering.drain_timeout_seconds`` bounds a close: what is left is counted in the
    summary (``files_left``), not waited for."""
    embassy: Embassy = make_embassy(tpm, extra={"metering": {"drain_timeout_seconds": 1}})
    assert embassy.config.metering.drain_timeout_seconds == 1
    real = metering_group.prepare

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.01)  # scoring, one file at a time: 0.64 s a group of 64
        return real(*args, **kwargs)

    monkeypatch.setattr(metering_module, "prepare", slow)
    intake = ActivationIntake.for_metering(
        spool, embassy.metering, drain_timeout=embassy.config.metering.drain_timeout_seconds
    )  # not started: the close's drain alone handles
    session = os.urandom(16)
    embassy.metering.begin(session)
    writer = ActivationWriter(spool, session)
    for _ in range(600):  # 0.01 s each: about 6 s of work
        writer.write("layer.6", np.ones((2, 4), dtype=np.float32))
    started = time.monotonic()
    summary = embassy.metering.finish(session, intake.drain)
    elapsed = time.monotonic() - started
    assert summary is not None
    assert summary["files_left"] > 0
    assert summary["files"] + summary["files_left"] == 600
    assert 1.0 <= elapsed < 4.0  # the timeout, plus at most one group of 64 (a busy CI)
