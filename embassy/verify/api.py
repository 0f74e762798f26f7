"""The verification API: one :class:`Verifier` per policy, one method per kind of evidence.

Stable and documented (docs/verifying.md); ``embassy verify`` is a thin layer over it.
Every method takes the exact bytes received and returns a frozen object describing what was
proved (with ``checks`` and, for people, ``facts()``), or raises a
:class:`embassy.errors.VerificationError` (or ``WireFormatError`` for unparsable input)
whose ``code`` is stable and whose message names the field that differs. Importing this
needs no TPM, root, Docker, yaml or daemon code::

    from embassy.verify import TrustPolicy, Verifier

    verifier = Verifier(TrustPolicy(ek_cas=cas, expected_measurement=m,
                                    expected_image_digest="sha256:..."))
    identity = verifier.identity(identity_document_bytes)
    fresh = verifier.evidence(identity, evidence_bytes, nonce)
    log = verifier.log(identity, segment_bytes, complete_with=fresh)
    result = verifier.result(identity, result_bytes, payload_id=pid)
    job = verifier.job(identity, job_result_bytes, reply_key=key, payload_id=pid)
"""

from __future__ import annotations

from dataclasses import dataclass

from embassy.errors import LogIntegrityError
from embassy.jobs.result import ReplyPrivateKey
from embassy.log.segment import LOG_SEGMENT_TYPE
from embassy.verify.evidence import VerifiedEvidence, segment_file, verify_evidence
from embassy.verify.identity import VerifiedIdentity, verify_identity_document
from embassy.verify.job import VerifiedJob, verify_job
from embassy.verify.logs import VerifiedLog, verify_log
from embassy.verify.policy import TrustPolicy
from embassy.verify.result import VerifiedResult, verify_result
from embassy.verify.segment import LoggedStatement, VerifiedSegment, verify_segment


@dataclass(frozen=True, slots=True)
class VerifiedStatement:
    """One statement envelope, found in a verified log segment."""

    logged: LoggedStatement
    segment: VerifiedSegment

    @property
    def checks(self) -> tuple[str, ...]:
        return (*self.segment.checks, "statement-in-log")

    def facts(self) -> list[str]:
        return [f"{self.logged.statement.predicate_type} at seq {self.logged.entry.seq}"]


class Verifier:
    """Verifies an embassy's evidence under one :class:`TrustPolicy`."""

    def __init__(self, policy: TrustPolicy) -> None:
        self._policy = policy

    @property
    def policy(self) -> TrustPolicy:
        return self._policy

    def identity(self, document: bytes) -> VerifiedIdentity:
        """An identity document: keys, TPM, measurement, boot and workload, per the policy."""
        return verify_identity_document(document, self._policy)

    def evidence(
        self, identity: VerifiedIdentity, evidence: bytes, nonce: bytes
    ) -> VerifiedEvidence:
        """A fresh quote over ``nonce`` (which you chose) closing the current boot's log."""
        return verify_evidence(evidence, identity, self._policy, nonce, "evidence")

    def log(
        self,
        identity: VerifiedIdentity,
        *segments: bytes,
        complete_with: VerifiedEvidence | None = None,
    ) -> VerifiedLog:
        """Log segment files, in log order. They prove inclusion up to their last entry;
        with ``complete_with`` (evidence from :meth:`evidence`) also that nothing followed."""
        parsed = [
            segment_file(data, LOG_SEGMENT_TYPE, f"log segment {i}")[0]
            for i, data in enumerate(segments)
        ]
        return verify_log(parsed, identity, self._policy, complete_with=complete_with)

    def statement(
        self, identity: VerifiedIdentity, envelope: bytes, segment: bytes
    ) -> VerifiedStatement:
        """A statement envelope (exact bytes) that a verified log segment contains."""
        parsed, _ = segment_file(segment, LOG_SEGMENT_TYPE, "log segment")
        verified = verify_segment(
            parsed, identity.segment_keys, allow_software_tpm=self._policy.allow_software_tpm
        )
        for logged in verified.statements:
            if logged.envelope == envelope:
                return VerifiedStatement(logged, verified)
        raise LogIntegrityError(
            "the statement is not in the verified log segment (changed, or from another log)"
        )

    def job(
        self,
        identity: VerifiedIdentity,
        result: bytes,
        *,
        reply_key: ReplyPrivateKey | None = None,
        payload_id: bytes | None = None,
    ) -> VerifiedJob:
        """A job's result bundle: its container sealed from birth (network none), the input
        key released once, the output committed, the container destroyed and checked gone;
        with ``reply_key``, the result opened (``plaintext``)."""
        return verify_job(
            result,
            identity,
            self._policy,
            reply_key=reply_key,
            expected_payload_id=payload_id,
        )

    def result(
        self,
        identity: VerifiedIdentity,
        result: bytes,
        *,
        payload_id: bytes | None = None,
        before: VerifiedEvidence | None = None,
        after: VerifiedEvidence | None = None,
    ) -> VerifiedResult:
        """A result bundle: this output, from the identity's workload, sealed for a session
        (your payload's, if ``payload_id``), before its deadline, and within your evidence
        ``before`` sending and ``after`` receiving, if given."""
        return verify_result(
            result,
            identity,
            self._policy,
            expected_payload_id=payload_id,
            before=before,
            after=after,
        )
