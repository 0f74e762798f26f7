"""Group commit of the statement log (ADR 0016): batches as the daemon makes them, what the
verifier replays, and start-up recovery of a batch a crash interrupted."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.attest.marshal import parse_public
from embassy.config import parse_config
from embassy.daemon.keys import derive_keys
from embassy.daemon.statement_log import Appended, StatementLog
from embassy.errors import StorageError, TamperError, TpmError
from embassy.log.entry import EntryType, LogEntry, batch_digest
from embassy.log.segment import Segment, extend, replay
from embassy.verify.segment import SegmentKeys, verify_segment
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import LIFECYCLE_V1, parse_statement
from tests.fakes import FakeTpm

MASTER = bytes(range(32))


def open_log(data_dir: Path, tpm: FakeTpm, **kwargs: Any) -> StatementLog:
    config = parse_config({"data_dir": str(data_dir), "socket": str(data_dir / "s.sock")})
    return StatementLog(
        data_dir=data_dir,
        tpm=tpm,
        keys=derive_keys(MASTER),
        pcrs=config.pcrs,
        checkpoint_every=kwargs.pop("checkpoint_every", 1000),
        **kwargs,
    )


def keys_for(tpm: FakeTpm) -> SegmentKeys:
    return SegmentKeys(
        signing=derive_keys(MASTER).signing.public_key(),
        ak=parse_public(tpm.ak_public()),
        embassy_pcr=13,
        log_pcr=14,
    )


class GatedTpm:
    """Wraps a FakeTpm's extend and clock: counts them, and holds the next extend until
    released, so that writers pile up behind a commit in progress."""

    def __init__(self, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch) -> None:
        self.extends: list[tuple[int, bytes]] = []
        self.clocks = 0
        self.hold = threading.Event()
        self.held = threading.Event()
        self.gate = threading.Event()
        real_extend, real_clock = tpm.extend, tpm.clock

        def extend_(pcr: int, digest: bytes) -> None:
            if self.hold.is_set():
                self.hold.clear()
                self.held.set()
                assert self.gate.wait(10)
            real_extend(pcr, digest)
            self.extends.append((pcr, digest))

        def clock_() -> Any:
            self.clocks += 1
            return real_clock()

        monkeypatch.setattr(tpm, "extend", extend_)
        monkeypatch.setattr(tpm, "clock", clock_)


def start_writers(
    log: StatementLog, names: list[str], body: Callable[[str], dict[str, Any]] | None = None
) -> tuple[list[threading.Thread], dict[str, Appended | BaseException]]:
    results: dict[str, Appended | BaseException] = {}

    def write(name: str) -> None:
        try:
            results[name] = log.append_statement(
                LIFECYCLE_V1, [], body(name) if body else {"event": name}
            )
        except BaseException as exc:
            results[name] = exc

    threads = [threading.Thread(target=write, args=(n,)) for n in names]
    for t in threads:
        t.start()
    return threads, results


def wait_queued(log: StatementLog, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(log._queue) < count:
        assert time.monotonic() < deadline, "writers did not queue"
        time.sleep(0.001)


@pytest.fixture
def batched(
    tmp_path: Path, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[StatementLog, GatedTpm]]:
    """A log whose first statement's extend is held while five more writers queue; they
    are then committed as one batch [1, 5]."""
    gated = GatedTpm(tpm, monkeypatch)
    log = open_log(tmp_path, tpm)
    log.recover()
    gated.hold.set()
    first, _ = start_writers(log, ["w0"])
    assert gated.held.wait(10)
    yield log, gated
    gated.gate.set()
    for t in first:
        t.join(10)
    with contextlib.suppress(OSError):  # a test that restarts the log closed it already
        log.close()


def run_batch(
    log: StatementLog, gated: GatedTpm, names: list[str], **kwargs: Any
) -> dict[str, Appended | BaseException]:
    """``names`` queue while the build lock is held (the leader takes the queue only once
    it holds it), so they form one batch, built while w0 is still being extended."""
    with log._lock:
        threads, results = start_writers(log, names, **kwargs)
        wait_queued(log, len(names))
    gated.gate.set()
    for t in threads:
        t.join(10)
    return results


def test_queued_writers_share_one_clock_read_one_fsync_and_one_extend(
    batched: tuple[StatementLog, GatedTpm], tpm: FakeTpm
) -> None:
    log, gated = batched
    results = run_batch(log, gated, [f"w{i}" for i in range(1, 6)])
    entries = list(log.entries)
    assert [e.seq for e in entries] == [0, 1, 2, 3, 4, 5]
    assert entries[0].batch is None
    assert b"batch" not in entries[0].raw
    assert [e.batch for e in entries[1:]] == [(1, 5)] * 5
    # one extend for the five, of the batch digest; one clock read each commit
    assert gated.extends == [
        (14, entries[0].digest),
        (14, batch_digest(1, 5, [e.digest for e in entries[1:]])),
    ]
    assert gated.clocks == 1 + 1 + 1  # recover, the first commit, the batch
    assert tpm.read_pcrs([13, 14]) == replay(entries, {}, [13, 14])
    # each writer got its own statement, at its position, all with the batch's one clock
    clocks = set()
    for name, got in results.items():
        assert isinstance(got, Appended)
        assert entries[got.entry.seq] == got.entry
        assert got.entry.data == got.envelope
        statement = parse_statement(parse_envelope(got.envelope).payload)
        assert statement.body["event"] == name
        assert statement.header.seq == got.entry.seq
        clocks.add(statement.header.clock)
    assert len(clocks) == 1
    # the file is exactly what the log holds, line for line
    assert (log._entries.path.read_bytes()) == b"".join(e.raw + b"\n" for e in entries)


def test_a_batched_log_verifies_and_checkpoints_fall_between_batches(
    batched: tuple[StatementLog, GatedTpm], tpm: FakeTpm
) -> None:
    log, gated = batched
    run_batch(log, gated, ["a", "b", "c"])
    anchor = log.checkpoint()
    log.append_statement(LIFECYCLE_V1, [], {"event": "alone"})
    keys = keys_for(tpm)
    whole = log.log_segment(0)
    verified = verify_segment(whole, keys, allow_software_tpm=True)
    assert [s.entry.seq for s in verified.statements] == [0, 1, 2, 3, 4]
    assert "pcr-replay" in verified.checks
    tail = log.log_segment(anchor.seq + 1)
    assert tail.anchor == anchor
    assert [e.seq for e in tail.entries] == [4]
    verify_segment(tail, keys, allow_software_tpm=True)


def test_a_failed_extend_fails_the_whole_batch_with_one_exception_and_recovery_extends_it(
    batched: tuple[StatementLog, GatedTpm],
    tmp_path: Path,
    tpm: FakeTpm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log, gated = batched
    boom = TpmError("extend: the TPM is gone")
    real = tpm.extend

    def fail_batches(pcr: int, digest: bytes) -> None:
        raise boom

    # w0 is inside the held extend already; the batch queued behind it will fail
    monkeypatch.setattr(tpm, "extend", fail_batches)
    results = run_batch(log, gated, ["x", "y", "z"])
    assert all(results[n] is boom for n in "xyz"), results
    with pytest.raises(TpmError, match=r"batch \[1,3\] is stored but its extend failed"):
        log.append_statement(LIFECYCLE_V1, [], {"event": "after"})
    entries = list(log.entries)
    assert [e.batch for e in entries[1:]] == [(1, 3)] * 3
    monkeypatch.setattr(tpm, "extend", real)
    log.close()
    restarted = open_log(tmp_path, tpm)
    restarted.recover()
    boot = list(restarted.entries)
    assert boot == entries
    assert tpm.read_pcrs([13, 14]) == replay(boot, {}, [13, 14])
    restarted.append_statement(LIFECYCLE_V1, [], {"event": "after restart"})
    verify_segment(restarted.log_segment(0), keys_for(tpm), allow_software_tpm=True)
    restarted.close()


def test_a_failed_write_fails_every_writer_of_the_batch_and_stores_nothing(
    batched: tuple[StatementLog, GatedTpm], monkeypatch: pytest.MonkeyPatch
) -> None:
    log, gated = batched
    store = log._entries
    real = store.append_many
    full = StorageError("log.jsonl: append failed (No space left on device); nothing was stored")

    def append_many(items: Any) -> None:
        if len(items) > 1:
            raise full
        real(items)

    monkeypatch.setattr(store, "append_many", append_many)
    results = run_batch(log, gated, ["p", "q"])
    assert results == {"p": full, "q": full}
    assert [e.seq for e in log.entries] == [0]
    monkeypatch.setattr(store, "append_many", real)
    assert log.append_statement(LIFECYCLE_V1, [], {"event": "room again"}).entry.seq == 1


def test_a_statement_that_cannot_be_encoded_fails_alone(
    batched: tuple[StatementLog, GatedTpm], tpm: FakeTpm
) -> None:
    log, gated = batched
    results = run_batch(
        log,
        gated,
        ["ok1", "bad", "ok2"],
        body=lambda n: {"event": n, "x": 1.5 if n == "bad" else 1},
    )
    assert isinstance(results["bad"], TypeError)
    assert isinstance(results["ok1"], Appended)
    assert isinstance(results["ok2"], Appended)
    entries = list(log.entries)
    assert [e.batch for e in entries] == [None, (1, 2), (1, 2)]
    verify_segment(log.log_segment(0), keys_for(tpm), allow_software_tpm=True)


def test_one_writer_writes_todays_entries_and_extends(tmp_path: Path, tpm: FakeTpm) -> None:
    log = open_log(tmp_path, tpm)
    log.recover()
    for i in range(3):
        log.append_statement(LIFECYCLE_V1, [], {"event": "alone", "i": i})
    pcr = bytes(32)
    for entry in log.entries:
        assert entry.batch is None
        assert b'"batch"' not in entry.raw
        pcr = extend(pcr, entry.digest)
    assert tpm.read_pcrs([14])[14] == pcr
    log.close()


def test_sixteen_writers_lose_nothing_and_the_log_replays(
    tmp_path: Path, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = tpm.extend

    def slow_extend(pcr: int, digest: bytes) -> None:
        time.sleep(0.002)  # a TPM's extend is not free: writers queue behind it
        real(pcr, digest)

    monkeypatch.setattr(tpm, "extend", slow_extend)
    log = open_log(tmp_path, tpm, checkpoint_every=7, max_batch=4)
    log.recover()
    threads, results = start_writers(log, [f"w{i}" for i in range(16)])
    more, more_results = start_writers(log, [f"v{i}" for i in range(16)])
    for t in [*threads, *more]:
        t.join(20)
    results.update(more_results)
    entries = list(log.entries)
    assert len(entries) == 32
    assert {r.entry.seq for r in results.values() if isinstance(r, Appended)} == set(range(32))
    sizes = [e.batch[1] - e.batch[0] + 1 for e in entries if e.batch and e.seq == e.batch[0]]
    assert sizes, "writers queued behind a slow extend were committed in batches"
    assert max(sizes) <= 4
    assert tpm.read_pcrs([13, 14]) == replay(entries, {}, [13, 14])
    verify_segment(log.log_segment(0), keys_for(tpm), allow_software_tpm=True)
    log.close()


# -- recovery of a batch a crash interrupted -----------------------------------------------


def crashed_batch(
    batched: tuple[StatementLog, GatedTpm], tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> list[LogEntry]:
    """Commit w0, then a batch [1,3] that is written and fsync'd but whose extend the
    "crash" stops; return the file's entries."""
    log, gated = batched
    real = tpm.extend

    def killed(pcr: int, digest: bytes) -> None:
        raise KeyboardInterrupt  # stands for the process dying between fsync and extend

    monkeypatch.setattr(tpm, "extend", killed)  # w0, held inside the old one, is unaffected
    results = run_batch(log, gated, ["a", "b", "c"])
    assert all(isinstance(r, KeyboardInterrupt) for r in results.values())
    monkeypatch.setattr(tpm, "extend", real)
    return list(log.entries)


def test_recovery_extends_a_whole_batch_that_was_written_but_not_extended(
    batched: tuple[StatementLog, GatedTpm],
    tmp_path: Path,
    tpm: FakeTpm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entries = crashed_batch(batched, tpm, monkeypatch)
    assert tpm.read_pcrs([14]) == replay(entries[:1], {}, [14])
    restarted = open_log(tmp_path, tpm)
    restarted.recover()
    assert list(restarted.entries) == entries
    assert tpm.read_pcrs([13, 14]) == replay(entries, {}, [13, 14])
    restarted.close()


def test_recovery_cuts_a_batch_whose_write_was_interrupted(
    batched: tuple[StatementLog, GatedTpm],
    tmp_path: Path,
    tpm: FakeTpm,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entries = crashed_batch(batched, tpm, monkeypatch)
    path = tmp_path / "log.jsonl"
    # the crash caught the batch's write after two of its three lines and part of the third
    path.write_bytes(b"".join(e.raw + b"\n" for e in entries[:3]) + entries[3].raw[:40])
    restarted = open_log(tmp_path, tpm)
    restarted.recover()
    assert list(restarted.entries) == entries[:1]
    assert path.read_bytes() == entries[0].raw + b"\n"
    assert tpm.read_pcrs([13, 14]) == replay(entries[:1], {}, [13, 14])
    got = restarted.append_statement(LIFECYCLE_V1, [], {"event": "next"})
    assert got.entry.seq == 1
    assert got.entry.prev == entries[0].digest
    verify_segment(restarted.log_segment(0), keys_for(tpm), allow_software_tpm=True)
    restarted.close()


def test_recovery_refuses_a_batch_cut_short_after_it_was_extended(
    batched: tuple[StatementLog, GatedTpm], tmp_path: Path, tpm: FakeTpm
) -> None:
    """Lines of an acknowledged batch removed from the file: tampering, not a crash."""
    log, gated = batched
    run_batch(log, gated, ["a", "b", "c"])
    entries = list(log.entries)
    log.close()
    path = tmp_path / "log.jsonl"
    path.write_bytes(b"".join(e.raw + b"\n" for e in entries[:3]))
    before = path.read_bytes()
    restarted = open_log(tmp_path, tpm)
    with pytest.raises(TamperError, match="the log does not match the TPM"):
        restarted.recover()
    assert path.read_bytes() == before, "nothing was cut"
    restarted.close()


def test_recovery_refuses_a_foreign_line_posing_as_an_unfinished_batch(
    tmp_path: Path, tpm: FakeTpm
) -> None:
    from embassy.log.entry import encode_entry

    log = open_log(tmp_path, tpm)
    log.recover()
    head = log.append_statement(LIFECYCLE_V1, [], {"event": "a"}).entry
    log.close()
    forged = encode_entry(
        seq=1, prev=head.digest, reset_count=tpm.reset_count, pcr=14,
        type=EntryType.STATEMENT, data=b'{"v":1}', batch=(1, 3),
    )  # fmt: skip
    path = tmp_path / "log.jsonl"
    path.write_bytes(path.read_bytes() + forged.raw + b"\n")
    restarted = open_log(tmp_path, tpm)
    with pytest.raises(TamperError, match="unfinished batch entry seq 1 is not one this embassy"):
        restarted.recover()
    restarted.close()


def test_verify_segment_refuses_a_head_quote_inside_a_batch(
    batched: tuple[StatementLog, GatedTpm], tpm: FakeTpm
) -> None:
    log, gated = batched
    run_batch(log, gated, ["a", "b", "c"])
    whole = log.log_segment(0)
    # a quote closing the segment after entry 2 (inside batch [1,3]), honestly made now:
    from embassy.log.entry import Checkpoint, checkpoint_qualifying_data

    mid = whole.entries[2]
    quote = tpm.quote([4, 11, 12, 13, 14], checkpoint_qualifying_data(mid.seq, mid.digest))
    cut = Segment(None, whole.entries[:3], Checkpoint(mid.seq, mid.digest, quote))
    from embassy.errors import LogIntegrityError

    with pytest.raises(LogIntegrityError, match=r"batch \[1,3\] is cut off after entry seq 2"):
        verify_segment(cut, keys_for(tpm), allow_software_tpm=True)


def test_a_batch_built_on_one_that_failed_fails_with_its_exception(
    tmp_path: Path, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pipelining: batch B is built on batch A's last entry while A is being written. A's
    write fails (nothing stored), so B's entries chain to nothing: B fails with A's
    exception, and the next statement goes where A would have been."""
    log = open_log(tmp_path, tpm)
    log.recover()
    store = log._entries
    real = store.append_many
    writing, release = threading.Event(), threading.Event()
    full = StorageError("log.jsonl: append failed (No space left on device); nothing was stored")

    def append_many(items: Any) -> None:
        if not release.is_set():
            writing.set()
            assert release.wait(10)
            raise full
        real(items)

    monkeypatch.setattr(store, "append_many", append_many)
    first, first_results = start_writers(log, ["a"])
    assert writing.wait(10)
    with log._lock:  # let b and c queue into one batch
        threads, results = start_writers(log, ["b", "c"])
        wait_queued(log, 2)
    deadline = time.monotonic() + 10
    while log._tip is None or log._tip[0] != 3:  # b, c built on a (seq 0)
        assert time.monotonic() < deadline, "the next batch was not built"
        time.sleep(0.001)
    release.set()
    for t in [*first, *threads]:
        t.join(10)
    assert first_results == {"a": full}
    assert results == {"b": full, "c": full}
    assert list(log.entries) == []
    got = log.append_statement(LIFECYCLE_V1, [], {"event": "next"})
    assert got.entry.seq == 0
    verify_segment(log.log_segment(0), keys_for(tpm), allow_software_tpm=True)
    log.close()


def test_events_checkpoints_and_segments_meanwhile_find_the_log_quiet(
    tmp_path: Path, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Start events, checkpoints and segments taken while 16 writers keep the pipeline
    full: each sees the file and the PCRs agree, and the whole log verifies after."""
    real = tpm.extend

    def slow_extend(pcr: int, digest: bytes) -> None:
        time.sleep(0.001)
        real(pcr, digest)

    monkeypatch.setattr(tpm, "extend", slow_extend)
    log = open_log(tmp_path, tpm, checkpoint_every=5)
    log.recover()
    keys = keys_for(tpm)
    stop = threading.Event()
    seen: list[int] = []

    def auditor() -> None:
        while not stop.is_set():
            log.append_event(EntryType.EMBASSY_START, {"n": len(seen)})
            segment = log.log_segment(0)
            seen.append(len(verify_segment(segment, keys, allow_software_tpm=True).statements))

    side = threading.Thread(target=auditor)
    side.start()
    threads, results = start_writers(log, [f"w{i}" for i in range(16)])
    more, more_results = start_writers(log, [f"v{i}" for i in range(16)])
    for t in [*threads, *more]:
        t.join(20)
    stop.set()
    side.join(20)
    assert all(isinstance(r, Appended) for r in [*results.values(), *more_results.values()])
    assert seen
    entries = list(log.entries)
    assert tpm.read_pcrs([13, 14]) == replay(entries, {}, [13, 14])
    final = verify_segment(log.log_segment(0), keys, allow_software_tpm=True)
    assert len(final.statements) == 32
    log.close()
