"""Verify a result: this output was committed by a workload sealed for this session.

A result bundle (version 1, produced by the workload SDK)::

    {"v":1,"type":"embassy-result","output":"<b64>","seal_statement":"<b64 envelope>",
     "unseal_statement":"<b64 envelope>","log":<segment>}

The log segment must contain both statements and verify on its own (chain, signatures,
PCR replay to a TPM quote); then the unseal must name the seal, the same session and
workload, come after it, and commit to SHA-256 of exactly these output bytes. Beyond the
bundle's own consistency, the result must belong to the identity the user verified:

- **Workload**: the seal and unseal statements name the workload (image digest, launch
  digest) the identity's launch events prove (:mod:`embassy.verify.workload`).
- **No restart**: the embassy ran on, in the same TPM boot and the same run, from the
  identity statement to the unseal. Every start and launch event is extended into the
  embassy PCR, so its value replayed up to the unseal must be the one the identity's quote
  shows; a start or launch event the segment shows between the identity and the unseal is
  named. A restart of the *same* measurement between seal and unseal is refused too (a
  session's seal is not proven across a restart); anything after the unseal is outside
  the result and not judged.
- **Deadline**: the unseal's wall time is before the seal's ``deadline_unix``, and the TPM
  time from seal to unseal is at most the deadline's distance from the seal's wall time
  (plus :data:`DEADLINE_SLACK_MS` for reading the clocks at slightly different moments):
  the embassy's wall clock alone cannot stretch a session.
- **Window**: when and, given the user's own evidence before and after, within what the
  session happened (:mod:`embassy.verify.window`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from embassy.errors import (
    DeadlineError,
    EmbassyRestartedError,
    LogIntegrityError,
    ResultMismatchError,
    WireFormatError,
)
from embassy.log.segment import extend, parse_segment
from embassy.verify.evidence import VerifiedEvidence
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.policy import TrustPolicy
from embassy.verify.segment import LoggedStatement, VerifiedSegment, verify_segment
from embassy.verify.window import TimeWindow, bound_window
from embassy.verify.workload import EMBASSY_PCR_EVENTS, check_statement_workload
from embassy.wire.codec import b64decode, field, only_fields, parse_json_object
from embassy.wire.statement import SEAL_V1, SEAL_V2, UNSEAL_V1, UNSEAL_V2

RESULT_TYPE = "embassy-result"
# The seal's and unseal's clocks (wall and TPM) are read a few moments apart from the
# deadline check they stand for; this much TPM time past the deadline is not a refusal.
DEADLINE_SLACK_MS = 1000


@dataclass(frozen=True, slots=True)
class VerifiedResult:
    output: bytes
    session: str
    payload_id: str | None
    workload: dict[str, Any]
    seal: LoggedStatement
    unseal: LoggedStatement
    checks: tuple[str, ...]
    deadline_unix: int | None = None
    window: TimeWindow | None = None

    def facts(self) -> list[str]:
        out = [
            f"output sha256 {hashlib.sha256(self.output).hexdigest()} ({len(self.output)} bytes)",
            f"made in session {self.session} (payload {self.payload_id}), sealed at log seq "
            f"{self.seal.entry.seq}, unsealed at seq {self.unseal.entry.seq}",
            f"workload image {self.workload.get('image_digest')}, launch digest "
            f"{self.workload.get('launch_digest')} (the identity's)",
        ]
        if self.deadline_unix is not None:
            out.append(f"unsealed before its deadline {self.deadline_unix} (unix s)")
        if self.window is not None:
            out += self.window.facts()
        return out


def _differing(a: object, b: object, what: str) -> str:
    """The fields in which two JSON values differ, named by path (for error messages)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return ", ".join(
            _differing(a.get(k), b.get(k), f"{what}.{k}")
            for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)
        )
    return what


def _find(statements: tuple[LoggedStatement, ...], envelope: bytes, what: str) -> LoggedStatement:
    for logged in statements:
        if logged.envelope == envelope:
            return logged
    raise LogIntegrityError(f"the {what} statement is not in the verified log segment")


def _int_or_none(body: dict[str, Any], key: str, what: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise WireFormatError(f"{what}.{key}: expected an integer")
    return value


def check_same_run(
    segment: VerifiedSegment, identity: VerifiedIdentity, seal: LoggedStatement, unseal_seq: int
) -> None:
    """Raise unless the embassy ran on, unrestarted and without a new launch, from the
    identity statement to the unseal (see the module's docstring)."""
    ident = identity.segment
    identity_seq = ident.entries[-1].seq
    if segment.reset_count != ident.reset_count:
        raise EmbassyRestartedError(
            f"the result's log is from TPM boot {segment.reset_count}, the identity's from boot "
            f"{ident.reset_count}: the embassy restarted since the identity you verified "
            "(verify its current identity)"
        )
    if seal.entry.seq <= identity_seq:
        raise EmbassyRestartedError(
            f"the seal statement (seq {seal.entry.seq}) is not after the identity statement "
            f"(seq {identity_seq}): it was made by an earlier run of the embassy"
        )
    pcr = identity.embassy_pcr
    value = segment.start_pcrs.get(pcr, bytes(32))
    for entry in segment.entries:
        if entry.seq >= unseal_seq:
            break
        if entry.type in EMBASSY_PCR_EVENTS and entry.seq > identity_seq:
            where = (
                "between the seal and the unseal"
                if entry.seq > seal.entry.seq
                else ("between the identity and the seal")
            )
            raise EmbassyRestartedError(
                f"entry seq {entry.seq} ({entry.type.value}) is {where}: the embassy "
                "restarted or relaunched its workload, and a session's seal is not proven "
                "across that"
            )
        if entry.pcr == pcr:
            value = extend(value, entry.digest)
    if not hmac.compare_digest(value, ident.head_pcrs.get(pcr, b"")):
        raise EmbassyRestartedError(
            f"PCR {pcr} (the embassy's starts and launches) before the unseal differs from "
            "the identity's quote: the embassy restarted or relaunched its workload between "
            "the identity you verified and this result (verify its current identity)"
        )


def check_deadline(
    sealed: dict[str, Any], unsealed: dict[str, Any], seal: LoggedStatement, unseal: LoggedStatement
) -> int:
    """Raise unless the session unsealed before its deadline; return the deadline."""
    deadline = _int_or_none(sealed, "deadline_unix", "seal statement")
    if deadline is None:
        raise WireFormatError("seal statement.deadline_unix: missing")
    sealed_at = _int_or_none(sealed, "wall_time_unix", "seal statement")
    unsealed_at = _int_or_none(unsealed, "wall_time_unix", "unseal statement")
    if unsealed_at is not None and unsealed_at >= deadline:
        raise DeadlineError(
            f"unseal statement.wall_time_unix is {unsealed_at}, at or past the seal's "
            f"deadline_unix {deadline}"
        )
    if sealed_at is not None:
        budget_ms = (deadline - sealed_at) * 1000
        elapsed_ms = unseal.statement.header.clock.clock - seal.statement.header.clock.clock
        if elapsed_ms > budget_ms + DEADLINE_SLACK_MS:
            raise DeadlineError(
                f"the TPM clock ran {elapsed_ms} ms from the seal to the unseal, but the "
                f"deadline was {budget_ms} ms after the seal (deadline_unix {deadline}, "
                f"wall_time_unix {sealed_at}): the session unsealed past its deadline"
            )
    return deadline


def verify_result(
    data: bytes,
    identity: VerifiedIdentity,
    policy: TrustPolicy,
    *,
    expected_payload_id: bytes | None = None,
    before: VerifiedEvidence | None = None,
    after: VerifiedEvidence | None = None,
) -> VerifiedResult:
    what = "result"
    obj = parse_json_object(data, what)
    only_fields(obj, {"v", "type", "output", "seal_statement", "unseal_statement", "log"}, what)
    if field(obj, "v", int, what) != 1 or field(obj, "type", str, what) != RESULT_TYPE:
        raise WireFormatError(f"result: expected v 1 and type {RESULT_TYPE!r}")
    output = b64decode(field(obj, "output", str, what), "result.output")
    seal_env = b64decode(field(obj, "seal_statement", str, what), "result.seal_statement")
    unseal_env = b64decode(field(obj, "unseal_statement", str, what), "result.unseal_statement")
    segment = verify_segment(
        parse_segment(obj.get("log"), "result.log"),
        identity.segment_keys,
        allow_software_tpm=policy.allow_software_tpm,
    )
    checks = list(segment.checks)
    seal, unseal = (
        _find(segment.statements, seal_env, "seal"),
        _find(segment.statements, unseal_env, "unseal"),
    )
    kinds = (seal.statement.predicate_type, unseal.statement.predicate_type)
    if kinds not in ((SEAL_V2, UNSEAL_V2), (SEAL_V1, UNSEAL_V1)):
        raise ResultMismatchError("the statements are not a seal and an unseal statement")
    sealed, unsealed = dict(seal.statement.body), dict(unseal.statement.body)
    if unsealed.get("session") != sealed.get("session"):
        raise ResultMismatchError(
            "session: the seal and unseal statements are for different sessions (seal: "
            f"{sealed.get('session')}, unseal: {unsealed.get('session')})"
        )
    seal_sha256 = hashlib.sha256(seal_env).hexdigest()
    if unsealed.get("seal_statement_sha256") != seal_sha256:
        raise ResultMismatchError(
            f"seal_statement_sha256: the unseal statement names seal statement "
            f"{unsealed.get('seal_statement_sha256')}, but this seal statement's SHA-256 is "
            f"{seal_sha256}"
        )
    if unsealed.get("workload") != sealed.get("workload"):
        raise ResultMismatchError(
            "the seal and unseal statements name different workloads (differing: "
            f"{_differing(sealed.get('workload'), unsealed.get('workload'), 'workload')})"
        )
    if not seal.entry.seq < unseal.entry.seq:
        raise ResultMismatchError(
            f"the unseal statement (seq {unseal.entry.seq}) does not come after the seal "
            f"statement (seq {seal.entry.seq})"
        )
    checks.append("seal-before-unseal")
    check_statement_workload(sealed.get("workload"), identity.workload, "seal")
    checks.append("identity-workload")
    check_same_run(segment, identity, seal, unseal.entry.seq)
    checks.append("no-restart")
    deadline = check_deadline(sealed, unsealed, seal, unseal)
    checks.append("deadline")
    committed = unsealed.get("output_sha256")
    if not isinstance(committed, str) or not hmac.compare_digest(
        committed, hashlib.sha256(output).hexdigest()
    ):
        raise ResultMismatchError(
            "output_sha256: the output is not the one the workload committed to in its "
            f"unseal statement (the output's SHA-256 is {hashlib.sha256(output).hexdigest()}, "
            f"the statement says {committed})"
        )
    checks.append("output-digest")
    payload_id = sealed.get("payload_id")
    if expected_payload_id is not None:
        if payload_id != expected_payload_id.hex():
            raise ResultMismatchError(
                f"the session opened payload {payload_id}, not yours ({expected_payload_id.hex()})"
            )
        checks.append("payload-id")
    window = bound_window(seal, unseal, before=before, after=after)
    if before is not None or after is not None:
        checks.append("time-window")
    return VerifiedResult(
        output=output,
        session=str(sealed.get("session")),
        payload_id=None if payload_id is None else str(payload_id),
        workload=dict(sealed.get("workload") or {}),
        seal=seal,
        unseal=unseal,
        checks=tuple(checks),
        deadline_unix=deadline,
        window=window,
    )
