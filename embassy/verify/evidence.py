"""Fresh evidence: a quote over the verifier's own nonce, closing the log of the current boot.

An evidence file (``GET /v1/evidence?nonce=``, version 1) is ``{"v":1,"type":
"embassy-evidence","nonce":"<hex>","segment":{...}}``: the segment's closing quote has the
nonce as its qualifying data, so it was made after the verifier chose the nonce, and its
entries replay to the quoted PCRs, so its last entry was the log's head at that moment.
That is what proves recency, and (``verify log --complete``) that a log shown to the
verifier was the whole log then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from embassy.attest.types import ClockInfo
from embassy.errors import FreshnessError, WireFormatError
from embassy.log.segment import EVIDENCE_TYPE, Segment, parse_segment
from embassy.verify.segment import VerifiedSegment, verify_segment
from embassy.wire.codec import field, only_fields, parse_json_object

if TYPE_CHECKING:
    from embassy.verify.identity import VerifiedIdentity
    from embassy.verify.policy import TrustPolicy


def segment_file(data: bytes, kind: str, what: str) -> tuple[Segment, dict[str, Any]]:
    """Parse a ``{"v":1,"type":kind,"segment":{...}}`` document (evidence adds a nonce)."""
    obj = parse_json_object(data, what)
    only_fields(obj, {"v", "type", "segment", "nonce"}, what)
    if field(obj, "v", int, what) != 1 or field(obj, "type", str, what) != kind:
        raise WireFormatError(f"{what}: expected v 1 and type {kind!r}")
    return parse_segment(obj.get("segment"), f"{what}.segment"), obj


@dataclass(frozen=True, slots=True)
class VerifiedEvidence:
    """A quote over ``nonce`` when the log head was entry ``head_seq``, at TPM ``clock``."""

    nonce: bytes
    segment: VerifiedSegment

    @property
    def head_seq(self) -> int:
        return self.segment.entries[-1].seq

    @property
    def head_digest(self) -> bytes:
        return self.segment.entries[-1].digest

    @property
    def clock(self) -> ClockInfo:
        return self.segment.head_clock

    def facts(self) -> list[str]:
        return [
            f"fresh quote over nonce {self.nonce.hex()}",
            f"log head seq {self.head_seq} at TPM clock {self.clock.clock} ms "
            f"(boot {self.clock.reset_count})",
        ]


def verify_evidence(
    data: bytes, identity: VerifiedIdentity, policy: TrustPolicy, nonce: bytes, what: str
) -> VerifiedEvidence:
    """Verify an evidence file against the identity's keys and the verifier's ``nonce``."""
    segment, _ = segment_file(data, EVIDENCE_TYPE, what)
    verified = verify_segment(
        segment,
        identity.segment_keys,
        expected_qualifying_data=nonce,
        freshness_error=FreshnessError,
        allow_software_tpm=policy.allow_software_tpm,
    )
    return VerifiedEvidence(nonce, verified)
