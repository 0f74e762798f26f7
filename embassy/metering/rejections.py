"""Rejected activation files, coalesced: counts per code and bytes, never one per file.

Each junk file used to cost one signed statement: an amplification (a file is cheap to
make, a statement is a signature, an fsync and a TPM extend) and a channel (the number and
timing of statements were the workload's to choose, and each named its file). The ledger
keeps one bucket per session, plus one (``None``) for files no open session can be charged
with, and hands out a summary of a bucket's new rejections:

- at most once per ``interval`` seconds, and at most ``cap`` times per bucket;
- once more when the bucket ends (the session closed or was aborted, or the daemon stops),
  whatever the cap, with everything not yet summarised: ``final``, even when nothing is
  left (then with no counts), so a bucket that was summarised at all ends with a final
  summary and an auditor knows no later one is missing.

So a session's statements about rejections are bounded by ``cap + 1`` however many files
it writes, and their timing is the ledger's clock, not the workload's. A bucket's totals
are exact at all times: they go into the session's unseal statement.

Pure (no I/O); not thread-safe: the caller holds its own lock.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

INTERVAL_SECONDS = 1.0
CAP_PER_BUCKET = 60


@dataclass(frozen=True, slots=True)
class RejectionSummary:
    """What one ``activation-rejected`` statement says (a bucket's rejections since the
    previous summary)."""

    session: bytes | None
    counts: Mapping[str, int]
    bytes: int
    number: int  # 1, 2, ... within its bucket
    final: bool

    @property
    def files(self) -> int:
        return sum(self.counts.values())

    def body(self) -> dict[str, Any]:
        return {
            "session": None if self.session is None else self.session.hex(),
            "counts": dict(sorted(self.counts.items())),
            "files": self.files,
            "bytes": self.bytes,
            "summary": self.number,
            "final": self.final,
        }


@dataclass
class _Bucket:
    pending: Counter[str] = field(default_factory=Counter)
    pending_bytes: int = 0
    total: Counter[str] = field(default_factory=Counter)
    total_bytes: int = 0
    summaries: int = 0
    last: float | None = None  # when the last summary was handed out
    ended: bool = False


class RejectionLedger:
    def __init__(
        self,
        *,
        interval: float = INTERVAL_SECONDS,
        cap: int = CAP_PER_BUCKET,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._cap = cap
        self._clock = clock
        self._buckets: dict[bytes | None, _Bucket] = {}

    def record(self, session: bytes | None, code: str, size: int) -> None:
        """One rejected file of ``size`` bytes, charged to ``session`` (None: no session)."""
        bucket = self._buckets.setdefault(session, _Bucket())
        bucket.pending[code] += 1
        bucket.pending_bytes += size
        bucket.total[code] += 1
        bucket.total_bytes += size

    def totals(self, session: bytes | None) -> tuple[dict[str, int], int]:
        """Exact counts per code, and bytes, of everything charged to ``session``."""
        bucket = self._buckets.get(session)
        if bucket is None:
            return {}, 0
        return dict(sorted(bucket.total.items())), bucket.total_bytes

    def end(self, session: bytes | None) -> None:
        """The bucket's session is over: its last summary is due at once, then it goes."""
        bucket = self._buckets.get(session)
        if bucket is not None:
            bucket.ended = True

    def due(self, *, final: bool = False) -> list[RejectionSummary]:
        """The summaries to emit now (``final``: every bucket's, as at a daemon stop)."""
        now = self._clock()
        out = []
        for session, bucket in list(self._buckets.items()):
            last_one = final or bucket.ended
            closing = last_one and bucket.summaries > 0  # the closing mark, even if empty
            if (bucket.pending or closing) and (last_one or self._may_summarise(bucket, now)):
                bucket.summaries += 1
                bucket.last = now
                out.append(
                    RejectionSummary(
                        session,
                        dict(bucket.pending),
                        bucket.pending_bytes,
                        bucket.summaries,
                        last_one,
                    )
                )
                bucket.pending = Counter()
                bucket.pending_bytes = 0
            if bucket.ended:
                del self._buckets[session]
        return out

    def _may_summarise(self, bucket: _Bucket, now: float) -> bool:
        if bucket.summaries >= self._cap:
            return False
        return bucket.last is None or now - bucket.last >= self._interval
