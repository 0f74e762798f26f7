"""Run one ``embassy verify`` kind and describe what was proved, for humans and machines."""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Callable
from typing import Any

from embassy.errors import ConfigError, FreshnessError, LogIntegrityError, WireFormatError
from embassy.log.segment import EVIDENCE_TYPE, LOG_SEGMENT_TYPE, Segment, parse_segment
from embassy.verify.identity import VerifiedIdentity, verify_identity_document
from embassy.verify.policy import TrustPolicy
from embassy.verify.result import verify_result
from embassy.verify.segment import VerifiedSegment, verify_segment
from embassy.wire.codec import field, only_fields, parse_json_object

Reader = Callable[[str], bytes]


def _segment_file(data: bytes, kind: str, what: str) -> tuple[Segment, dict[str, Any]]:
    obj = parse_json_object(data, what)
    only_fields(obj, {"v", "type", "segment", "nonce"}, what)
    if field(obj, "v", int, what) != 1 or field(obj, "type", str, what) != kind:
        raise WireFormatError(f"{what}: expected v 1 and type {kind!r}")
    return parse_segment(obj.get("segment"), f"{what}.segment"), obj


def _identity_facts(identity: VerifiedIdentity) -> list[str]:
    return [
        f"measurement {identity.measurement.digest.hex()}",
        f"signing key {identity.keys['signing']['keyid']}",
        f"AK name {identity.ak.name().hex()}",
        f"TPM mode {identity.tpm_mode.value}, boot {identity.segment.reset_count}",
        "AK-EK link: not provable offline; `embassy identity` proves it live by credential "
        "activation (a document alone could pair a real EK certificate with another TPM's AK)",
    ]


def verify_segments(
    segments: list[Segment], identity: VerifiedIdentity, policy: TrustPolicy
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


def run(kind: str, args: argparse.Namespace, policy: TrustPolicy, read: Reader) -> dict[str, Any]:
    if kind == "identity":
        identity = verify_identity_document(read(args.file), policy)
        return {"ok": True, "checks": list(identity.checks), "facts": _identity_facts(identity)}
    identity = verify_identity_document(read(args.identity), policy)
    checks = [f"identity:{c}" for c in identity.checks]
    if kind == "log":
        segments = [_segment_file(read(f), LOG_SEGMENT_TYPE, f)[0] for f in args.file]
        all_verified = verify_segments(segments, identity, policy)
        count = sum(len(v.statements) for v in all_verified)
        checks += sorted({c for v in all_verified for c in v.checks})
        first, last = all_verified[0].entries[0].seq, all_verified[-1].entries[-1].seq
        return {
            "ok": True,
            "checks": checks,
            "facts": [f"{count} statements in entries {first}..{last}"],
        }
    if kind == "evidence":
        segment, _obj = _segment_file(read(args.file), EVIDENCE_TYPE, args.file)
        try:
            nonce = bytes.fromhex(args.nonce)
        except ValueError:
            raise ConfigError(f"--nonce: not hex: {args.nonce!r}") from None
        verified = verify_segment(
            segment,
            identity.segment_keys,
            expected_qualifying_data=nonce,
            freshness_error=FreshnessError,
            allow_software_tpm=policy.allow_software_tpm,
        )
        return {
            "ok": True,
            "checks": [*checks, *verified.checks, "nonce"],
            "facts": [
                f"fresh quote over nonce {nonce.hex()}",
                f"log head seq {verified.entries[-1].seq}",
            ],
        }
    if kind == "statement":
        envelope = read(args.file).rstrip(b"\n")
        segment, _ = _segment_file(read(args.log), LOG_SEGMENT_TYPE, args.log)
        verified = verify_segment(
            segment, identity.segment_keys, allow_software_tpm=policy.allow_software_tpm
        )
        for logged in verified.statements:
            if logged.envelope == envelope:
                return {
                    "ok": True,
                    "checks": [*checks, *verified.checks, "statement-in-log"],
                    "facts": [f"{logged.statement.predicate_type} at seq {logged.entry.seq}"],
                }
        raise LogIntegrityError(
            "the statement is not in the verified log segment (changed, or from another log)"
        )
    if kind == "result":
        payload_id = None
        if args.payload_id:
            try:
                payload_id = bytes.fromhex(args.payload_id)
            except ValueError:
                raise ConfigError(f"--payload-id: not hex: {args.payload_id!r}") from None
        result = verify_result(read(args.file), identity, policy, expected_payload_id=payload_id)
        return {
            "ok": True,
            "checks": [*checks, *result.checks],
            "facts": [
                f"output sha256 {hashlib.sha256(result.output).hexdigest()} "
                f"({len(result.output)} bytes)",
                f"made in session {result.session} (payload {result.payload_id}), sealed at "
                f"log seq {result.seal.entry.seq}, unsealed at seq {result.unseal.entry.seq}",
                f"workload image {result.workload.get('image_digest')}",
            ],
        }
    raise WireFormatError(f"unknown verify kind {kind!r}")
