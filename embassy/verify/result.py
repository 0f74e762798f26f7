"""Verify a result: this output was committed by a workload sealed for this session.

A result bundle (version 1, produced by the workload SDK)::

    {"v":1,"type":"embassy-result","output":"<b64>","seal_statement":"<b64 envelope>",
     "unseal_statement":"<b64 envelope>","log":<segment>}

The log segment must contain both statements and verify on its own (chain, signatures,
PCR replay to a TPM quote); then the unseal must name the seal, the same session and
workload, come after it, and commit to SHA-256 of exactly these output bytes.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from embassy.errors import LogIntegrityError, ResultMismatchError, WireFormatError
from embassy.log.segment import parse_segment
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.policy import TrustPolicy
from embassy.verify.segment import LoggedStatement, verify_segment
from embassy.wire.codec import b64decode, field, only_fields, parse_json_object
from embassy.wire.statement import SEAL_V1, SEAL_V2, UNSEAL_V1, UNSEAL_V2

RESULT_TYPE = "embassy-result"


@dataclass(frozen=True, slots=True)
class VerifiedResult:
    output: bytes
    session: str
    payload_id: str | None
    workload: dict[str, Any]
    seal: LoggedStatement
    unseal: LoggedStatement
    checks: tuple[str, ...]


def _find(statements: tuple[LoggedStatement, ...], envelope: bytes, what: str) -> LoggedStatement:
    for logged in statements:
        if logged.envelope == envelope:
            return logged
    raise LogIntegrityError(f"the {what} statement is not in the verified log segment")


def verify_result(
    data: bytes,
    identity: VerifiedIdentity,
    policy: TrustPolicy,
    *,
    expected_payload_id: bytes | None = None,
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
        raise ResultMismatchError("the seal and unseal statements are for different sessions")
    if unsealed.get("seal_statement_sha256") != hashlib.sha256(seal_env).hexdigest():
        raise ResultMismatchError("the unseal statement does not name this seal statement")
    if unsealed.get("workload") != sealed.get("workload"):
        raise ResultMismatchError("the seal and unseal statements name different workloads")
    if not seal.entry.seq < unseal.entry.seq:
        raise ResultMismatchError("the unseal statement does not come after the seal statement")
    checks.append("seal-before-unseal")
    committed = unsealed.get("output_sha256")
    if not isinstance(committed, str) or not hmac.compare_digest(
        committed, hashlib.sha256(output).hexdigest()
    ):
        raise ResultMismatchError(
            "the output is not the one the workload committed to in its unseal statement"
        )
    checks.append("output-digest")
    payload_id = sealed.get("payload_id")
    if expected_payload_id is not None:
        if payload_id != expected_payload_id.hex():
            raise ResultMismatchError(
                f"the session opened payload {payload_id}, not yours ({expected_payload_id.hex()})"
            )
        checks.append("payload-id")
    return VerifiedResult(
        output=output,
        session=str(sealed.get("session")),
        payload_id=None if payload_id is None else str(payload_id),
        workload=dict(sealed.get("workload") or {}),
        seal=seal,
        unseal=unseal,
        checks=tuple(checks),
    )
