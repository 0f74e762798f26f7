"""A full disk does not brick the daemon; quotes are not the workload's to spend.

Appends to the statement log are atomic at the line level: a failed or short write (ENOSPC)
is cut back to the last good record and raised as a StorageError; nothing acknowledged is
lost, nothing unacknowledged is extended, the daemon goes on and restarts cleanly. A log
segment whose head has not moved reuses its checkpoint (no quote); evidence quotes come from
a token bucket.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import embassy.daemon.logstore as logstore
from embassy.attest.types import Quote
from embassy.daemon.atomic import write_atomic
from embassy.daemon.runtime import Embassy
from embassy.daemon.statement_log import EVIDENCE_QUOTE_BURST, QuoteBudget
from embassy.errors import RateLimitedError, StorageError, TpmError
from embassy.log.entry import parse_entry
from embassy.log.segment import parse_segment
from embassy.verify.identity import verify_identity_document
from embassy.verify.segment import verify_segment
from embassy.wire.codec import canonical_json
from embassy.wire.statement import LIFECYCLE_V1
from tests.fakes import FakeTpm
from tests.unit.conftest import EmbassyFactory, policy_for


def _append(embassy: Embassy, n: int = 0) -> int:
    return embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n}).entry.seq


def _lines(embassy: Embassy) -> list[bytes]:
    data = (embassy.config.data_dir / "log.jsonl").read_bytes()
    assert data.endswith(b"\n")
    return data.splitlines()


def _failing_write(
    monkeypatch: pytest.MonkeyPatch, *, written: int, error: int = errno.ENOSPC
) -> None:
    """The next writes put ``written`` bytes on disk, then fail as a full disk does."""
    real = os.write

    def write_all(fd: int, data: bytes) -> None:
        real(fd, data[:written])
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(logstore, "write_all", write_all)


@pytest.mark.parametrize("written", [0, 1, 57])
def test_a_short_write_is_cut_back_and_nothing_is_extended(
    make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch, written: int
) -> None:
    embassy = make_embassy(tpm, checkpoint_every=1000)
    before, extends, head = _lines(embassy), tpm.extends, embassy.log.head
    with monkeypatch.context() as patch:
        _failing_write(patch, written=written)
        with pytest.raises(StorageError, match=r"log\.jsonl: append failed .*nothing was stored"):
            _append(embassy)
    assert _lines(embassy) == before  # the partial line is gone
    assert (tpm.extends, embassy.log.head) == (extends, head)
    # There is room again: the log goes on from where it was, and restarts cleanly.
    seq = _append(embassy)
    assert head is not None
    assert seq == head.seq + 1
    make_embassy.crash(embassy)
    restarted = make_embassy(tpm, checkpoint_every=1000)
    assert [parse_entry(line).seq for line in _lines(restarted)] == list(range(seq + 3))


def test_a_failed_fsync_is_cut_back(
    make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    embassy = make_embassy(tpm, checkpoint_every=1000)
    before = _lines(embassy)

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(logstore.os, "fsync", fsync)
        with pytest.raises(StorageError):
            _append(embassy)
    assert _lines(embassy) == before


def test_a_failed_cut_back_refuses_appends_until_restart(
    make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    embassy = make_embassy(tpm, checkpoint_every=1000)
    head = embassy.log.head
    with monkeypatch.context() as patch:
        _failing_write(patch, written=10)

        def ftruncate(fd: int, size: int) -> None:
            raise OSError(errno.EIO, "Input/output error")

        patch.setattr(logstore.os, "ftruncate", ftruncate)
        with pytest.raises(StorageError, match="could not be cut back"):
            _append(embassy)
    with pytest.raises(StorageError, match="refused until restart"):
        _append(embassy)
    # The partial line is still there: the restart drops it (never acknowledged).
    assert not (embassy.config.data_dir / "log.jsonl").read_bytes().endswith(b"\n")
    make_embassy.crash(embassy)
    restarted = make_embassy(tpm, checkpoint_every=1000)
    assert head is not None
    assert _append(restarted) == head.seq + 3  # + the start event and identity statement


def test_a_failed_extend_refuses_appends_and_a_restart_repairs_it(
    make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    embassy = make_embassy(tpm, checkpoint_every=1000)

    def extend(pcr: int, digest: bytes) -> None:
        raise TpmError("extend: the TPM is gone")

    with monkeypatch.context() as patch:
        patch.setattr(tpm, "extend", extend)
        with pytest.raises(TpmError, match="gone"):
            seq = _append(embassy)
    with pytest.raises(TpmError, match="stored but its extend failed"):
        _append(embassy)
    make_embassy.crash(embassy)
    restarted = make_embassy(tpm, checkpoint_every=1000)  # recover() extends the last entry
    seq = _append(restarted)
    assert parse_entry(_lines(restarted)[-1]).seq == seq


def test_a_failed_periodic_checkpoint_does_not_fail_the_entry(
    make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    embassy = make_embassy(tpm, checkpoint_every=1)

    def quote(*args: Any) -> Quote:
        raise TpmError("quote: busy")

    with monkeypatch.context() as patch:
        patch.setattr(tpm, "quote", quote)
        seq = _append(embassy)  # acknowledged although its checkpoint failed
    assert parse_entry(_lines(embassy)[-1]).seq == seq
    checkpoints = len(embassy.log._checkpoints.records)
    _append(embassy)  # the checkpoint is retried with the next entry
    assert len(embassy.log._checkpoints.records) == checkpoints + 1


def test_write_atomic_never_replaces_a_file_with_a_partial_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import embassy.daemon.atomic as atomic

    path = tmp_path / "master.sealed"
    path.write_bytes(b"good")
    real = os.write
    monkeypatch.setattr(atomic.os, "write", lambda fd, data: real(fd, bytes(data)[:1]) * 0)
    with pytest.raises(StorageError, match=r"master\.sealed: cannot be written: No space"):
        write_atomic(path, b"a new blob")
    assert path.read_bytes() == b"good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["master.sealed"]


# -- a real full disk -------------------------------------------------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "full"
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "embassy-test", str(where)],
        check=True,
        timeout=10,
    )
    try:
        yield where
    finally:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(where), 2)  # MNT_DETACH


def test_enospc_on_a_real_tmpfs_keeps_the_daemon_and_the_log(
    make_embassy: EmbassyFactory, tpm: FakeTpm, small_tmpfs: Path
) -> None:
    embassy = make_embassy(tpm, name="full", checkpoint_every=4)
    filler = small_tmpfs / "filler"
    stat = os.statvfs(small_tmpfs)
    filler.write_bytes(bytes(stat.f_bavail * stat.f_frsize - 8192))
    acknowledged: list[int] = []

    def fill() -> None:
        for n in range(100):
            acknowledged.append(_append(embassy, n))

    with pytest.raises(StorageError, match="No space left on device"):
        fill()
    assert acknowledged  # some fitted, then the disk was full
    seqs = [parse_entry(line).seq for line in _lines(embassy)]
    assert seqs[-len(acknowledged) :] == acknowledged  # every acknowledged entry, no partial
    assert embassy.health()["log_head"] == acknowledged[-1]  # still answering
    filler.unlink()
    seq = _append(embassy)
    assert seq == acknowledged[-1] + 1
    make_embassy.crash(embassy)
    restarted = make_embassy(tpm, name="full", checkpoint_every=4)
    assert restarted.log.head is not None
    assert restarted.log.head.seq == seq + 2


# -- quotes -----------------------------------------------------------------------------------


class CountingTpm(FakeTpm):
    def __init__(self) -> None:
        super().__init__(b"seed")
        self.quotes = 0

    def quote(self, pcrs: Any, qualifying_data: bytes) -> Quote:
        self.quotes += 1
        return super().quote(pcrs, qualifying_data)


def test_a_log_segment_reuses_the_checkpoint_while_the_head_has_not_moved(
    make_embassy: EmbassyFactory,
) -> None:
    tpm = CountingTpm()
    embassy = make_embassy(tpm, checkpoint_every=1000)
    ident = verify_identity_document(canonical_json(embassy.identity_document()), policy_for(tpm))
    first = embassy.log_segment(0)
    quotes = tpm.quotes
    for _ in range(50):
        assert embassy.log_segment(0) == first
    assert tpm.quotes == quotes  # no quote while the head stays
    seq = _append(embassy)
    moved = embassy.log_segment(0)
    assert tpm.quotes == quotes + 1
    assert embassy.log_segment(0) == moved
    assert tpm.quotes == quotes + 1
    for doc in (first, moved):
        verified = verify_segment(
            parse_segment(doc["segment"]), ident.segment_keys, allow_software_tpm=True
        )
        assert verified.statements
    assert moved["segment"]["head"]["seq"] == seq


def test_evidence_quotes_come_from_a_token_bucket(make_embassy: EmbassyFactory) -> None:
    tpm = CountingTpm()
    embassy = make_embassy(tpm)
    now = [100.0]
    embassy.log.evidence_quotes = QuoteBudget(20, EVIDENCE_QUOTE_BURST, clock=lambda: now[0])
    quotes = tpm.quotes
    for i in range(EVIDENCE_QUOTE_BURST):
        embassy.evidence(i.to_bytes(16, "big"))
    assert tpm.quotes == quotes + EVIDENCE_QUOTE_BURST
    with pytest.raises(RateLimitedError, match="more than 20 TPM quotes a second"):
        embassy.evidence(bytes(16))
    assert tpm.quotes == quotes + EVIDENCE_QUOTE_BURST  # refused before the TPM is asked
    now[0] += 0.06  # one token back (and a little)
    embassy.evidence(bytes(16))
    with pytest.raises(RateLimitedError):
        embassy.evidence(bytes(16))
    now[0] += 60  # refills to the burst, not beyond
    for i in range(EVIDENCE_QUOTE_BURST):
        embassy.evidence(i.to_bytes(16, "big"))
    with pytest.raises(RateLimitedError):
        embassy.evidence(bytes(16))


def test_the_default_evidence_budget_holds_under_a_hammering(
    make_embassy: EmbassyFactory,
) -> None:
    tpm = CountingTpm()
    embassy = make_embassy(tpm)
    quotes, refused = tpm.quotes, 0
    for i in range(200):
        try:
            embassy.evidence(i.to_bytes(16, "big"))
        except RateLimitedError:
            refused += 1
    # 200 back-to-back requests in far less than a second: the burst and a few refills.
    assert EVIDENCE_QUOTE_BURST <= tpm.quotes - quotes < 100
    assert refused == 200 - (tpm.quotes - quotes)
