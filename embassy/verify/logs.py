"""Verify log segments in order, say exactly what they prove, and (with fresh evidence) that
nothing came after them.

A verified segment proves *inclusion*: its entries, in order, are what the embassy signed
and the TPM's PCRs replay. It does not prove that the log ends where the segment ends: an
older genuine checkpoint closes a tail-truncated segment just as well. What a log proves is
therefore stated as "entries up to seq N, TPM clock T; entries after that are not proven
absent". Completeness takes a quote made after the verifier chose a nonce (evidence, see
:mod:`embassy.verify.evidence`) whose head is the log's last entry: then that entry was the
log's head at the evidence's TPM clock.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from embassy.attest.types import ClockInfo
from embassy.errors import IncompleteLogError, LogIntegrityError
from embassy.log.segment import Segment
from embassy.verify.evidence import VerifiedEvidence
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.policy import TrustPolicy
from embassy.verify.segment import LoggedStatement, VerifiedSegment, verify_segment


@dataclass(frozen=True, slots=True)
class VerifiedLog:
    """What some segments proved: their statements, up to entry ``last_seq``; complete (no
    entry after it) only when ``complete_at`` names the evidence that showed it."""

    segments: tuple[VerifiedSegment, ...]
    complete_at: VerifiedEvidence | None = None

    @property
    def statements(self) -> tuple[LoggedStatement, ...]:
        return tuple(s for seg in self.segments for s in seg.statements)

    @property
    def first_seq(self) -> int:
        return self.segments[0].entries[0].seq

    @property
    def last_seq(self) -> int:
        return self.segments[-1].entries[-1].seq

    @property
    def head_clock(self) -> ClockInfo:
        return self.segments[-1].head_clock

    @property
    def checks(self) -> tuple[str, ...]:
        found = sorted({c for s in self.segments for c in s.checks})
        return (*found, "complete") if self.complete_at is not None else tuple(found)

    def facts(self) -> list[str]:
        clock = self.head_clock
        out = [
            f"{len(self.statements)} statements in entries {self.first_seq}..{self.last_seq}",
            f"proved: entries up to seq {self.last_seq}, TPM clock {clock.clock} ms "
            f"(boot {clock.reset_count})",
        ]
        if self.complete_at is None:
            out.append(
                "entries after that are not proven absent (inclusion, not completeness: "
                "check with --complete and fresh evidence over your nonce)"
            )
        else:
            ev = self.complete_at
            out.append(
                f"complete: seq {self.last_seq} was the log's head when the TPM quoted your "
                f"nonce {ev.nonce.hex()} at TPM clock {ev.clock.clock} ms (boot "
                f"{ev.clock.reset_count}); no entry after it existed then"
            )
        return out


def verify_segments(
    segments: Sequence[Segment], identity: VerifiedIdentity, policy: TrustPolicy
) -> list[VerifiedSegment]:
    """Verify several segments in log order; contiguous ones must chain."""
    out: list[VerifiedSegment] = []
    for segment in segments:
        verified = verify_segment(
            segment, identity.segment_keys, allow_software_tpm=policy.allow_software_tpm
        )
        if out:
            last = out[-1].entries[-1]
            first = verified.entries[0]
            if first.seq <= last.seq:
                raise LogIntegrityError(
                    f"segments overlap or are out of order (seq {first.seq} after {last.seq})"
                )
            if verified.reset_count < out[-1].reset_count:
                raise LogIntegrityError("a later segment is from an earlier TPM boot")
            if first.seq == last.seq + 1 and first.prev != last.digest:
                raise LogIntegrityError(
                    f"segment starting at seq {first.seq} does not chain to the one before it"
                )
        out.append(verified)
    return out


def check_complete(segment: VerifiedSegment, evidence: VerifiedEvidence) -> None:
    """Raise unless ``evidence``'s head is ``segment``'s last entry (nothing came after)."""
    last = segment.entries[-1]
    if evidence.clock.reset_count != segment.reset_count:
        raise IncompleteLogError(
            f"the log has entries after seq {last.seq}: your evidence is from TPM boot "
            f"{evidence.clock.reset_count}, the log's last segment from boot "
            f"{segment.reset_count}"
        )
    if evidence.head_seq > last.seq:
        raise IncompleteLogError(
            f"the log has entries after seq {last.seq}: your fresh evidence shows its head "
            f"at seq {evidence.head_seq}"
        )
    if evidence.head_seq < last.seq:
        raise IncompleteLogError(
            f"your evidence shows the log head at seq {evidence.head_seq}, before the "
            f"segment's last entry (seq {last.seq}): it is older than the log, so it cannot "
            "show that nothing came after; take evidence after fetching the log"
        )
    if not hmac.compare_digest(evidence.head_digest, last.digest):
        raise LogIntegrityError(
            f"entry seq {last.seq} differs between the log and your evidence (a fork)"
        )


def verify_log(
    segments: Sequence[Segment],
    identity: VerifiedIdentity,
    policy: TrustPolicy,
    *,
    complete_with: VerifiedEvidence | None = None,
) -> VerifiedLog:
    """Verify ``segments``; with ``complete_with``, also that the log ended at the last."""
    if not segments:
        raise LogIntegrityError("no log segment given")
    verified = verify_segments(segments, identity, policy)
    if complete_with is not None:
        check_complete(verified[-1], complete_with)
    return VerifiedLog(tuple(verified), complete_with)
