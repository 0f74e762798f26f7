"""Verify an identity document: the embassy's keys, bound by a quote to its TPM and software.

An identity document (version 2) is ``{"v":2,"type":"embassy-identity-document",
"segment":{...},"ak_certificates":["<b64 DER>", ...]}``: a log segment whose last entry is
the identity statement and whose closing quote's qualifying data is SHA-256 of that
statement's payload, and the AK's certificate chain (leaf first; empty until a registrar
enrolled the embassy). Version 1 is the same without the chain. Everything the relying
party needs is inside; nothing is taken on the embassy's word that the TPM, the EK's maker
or the registrar does not also vouch for (:mod:`embassy.verify.tpm_trust`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.attest.marshal import PublicArea, parse_public
from embassy.attest.quote import verify_ak_attributes
from embassy.attest.types import TpmMode
from embassy.errors import (
    LogIntegrityError,
    MeasurementMismatchError,
    PcrMismatchError,
    WireFormatError,
)
from embassy.log.entry import EntryType, LogEntry
from embassy.log.event import Event
from embassy.log.segment import IDENTITY_DOCUMENT_TYPE, parse_segment
from embassy.log.verify_entry import authenticate_entry
from embassy.verify.policy import TrustPolicy
from embassy.verify.segment import SegmentKeys, VerifiedSegment, verify_segment
from embassy.verify.tpm_trust import TpmBinding, verify_tpm_binding
from embassy.verify.workload import Workload, check_pins, workload_of_run
from embassy.wire.codec import (
    b64_list,
    b64decode,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)
from embassy.wire.dsse import parse_envelope, verify_envelope
from embassy.wire.measurement import Measurement, measurement_from_json
from embassy.wire.statement import IDENTITY_V1, Statement, parse_statement


@dataclass(frozen=True)
class VerifiedIdentity:
    statement: Statement
    payload: bytes
    signing_key: Ed25519PublicKey
    keys: dict[str, Any]
    ak: PublicArea
    ek: PublicArea
    ek_certificate: bytes
    embassy_pcr: int
    log_pcr: int
    boot_pcrs: tuple[int, ...]
    measurement: Measurement
    tpm_mode: TpmMode
    segment: VerifiedSegment
    checks: tuple[str, ...]
    # The workload the run launched (its launch events in the segment), None if none.
    workload: Workload | None = None
    # What the EK and AK certificates proved about the TPM (tpm_trust).
    tpm: TpmBinding | None = None

    @property
    def segment_keys(self) -> SegmentKeys:
        return SegmentKeys(self.signing_key, self.ak, self.embassy_pcr, self.log_pcr)


def _identity_fields(body: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes, dict[str, Any]]:
    what = "identity predicate"
    keys = field(body, "keys", dict, what)
    signing = field(keys, "signing", dict, f"{what}.keys")
    signing_raw = b64decode(field(signing, "public", str, f"{what}.keys.signing"), "signing key")
    if len(signing_raw) != 32:
        raise WireFormatError(f"{what}.keys.signing.public: expected 32 bytes")
    tpm = field(body, "tpm", dict, what)
    return (
        signing_raw,
        b64decode(field(tpm, "ak_public", str, f"{what}.tpm"), "ak_public"),
        b64decode(field(tpm, "ek_public", str, f"{what}.tpm"), "ek_public"),
        b64decode(field(tpm, "ek_certificate", str, f"{what}.tpm"), "ek_certificate"),
        field(tpm, "pcrs", dict, f"{what}.tpm"),
    )


MAX_AK_CHAIN = 4


def _ak_chain(doc: dict[str, Any]) -> list[bytes]:
    """The document's AK certificate chain (version 2; version 1 has none)."""
    what = "identity document"
    if doc.get("type") != IDENTITY_DOCUMENT_TYPE or doc.get("v") not in (1, 2):
        raise WireFormatError(f"{what}: expected v 1 or 2 and type {IDENTITY_DOCUMENT_TYPE!r}")
    if doc["v"] == 1:
        only_fields(doc, {"v", "type", "segment"}, what)
        return []
    only_fields(doc, {"v", "type", "segment", "ak_certificates"}, what)
    return b64_list(doc.get("ak_certificates"), f"{what}.ak_certificates", most=MAX_AK_CHAIN)


def verify_identity_document(data: bytes, policy: TrustPolicy) -> VerifiedIdentity:
    """Verify an identity document against the auditor's policy, or raise why not."""
    policy.warn_insecure()
    doc = parse_json_object(data, "identity document")
    ak_chain = _ak_chain(doc)
    segment = parse_segment(doc.get("segment"), "identity document.segment")
    if not segment.entries or segment.entries[-1].type is not EntryType.STATEMENT:
        raise LogIntegrityError(
            "identity document: its segment must end with the identity statement"
        )
    envelope = parse_envelope(segment.entries[-1].data)
    claimed = parse_statement(envelope.payload)
    if claimed.predicate_type != IDENTITY_V1:
        raise WireFormatError(f"identity document: last statement is {claimed.predicate_type}")
    signing_raw, ak_raw, ek_raw, ek_cert, pcrs = _identity_fields(dict(claimed.body))
    signing_key = Ed25519PublicKey.from_public_bytes(signing_raw)
    payload = verify_envelope(envelope, signing_key)
    checks = ["identity-signature"]

    ak = parse_public(ak_raw)
    ek = parse_public(ek_raw)
    verify_ak_attributes(ak)
    checks.append("ak-attributes")
    embassy_pcr = field(pcrs, "embassy", int, "identity predicate.tpm.pcrs")
    log_pcr = field(pcrs, "log", int, "identity predicate.tpm.pcrs")
    boot = tuple(field(pcrs, "boot", list, "identity predicate.tpm.pcrs"))
    keys = SegmentKeys(signing_key, ak, embassy_pcr, log_pcr)

    verified = verify_segment(
        segment,
        keys,
        expected_qualifying_data=hashlib.sha256(payload).digest(),
        allow_software_tpm=policy.allow_software_tpm,
    )
    checks += [c for c in verified.checks if c not in checks]

    measurement = _verify_measurement(claimed, segment.entries, embassy_pcr, signing_key, policy)
    checks.append("measurement")
    workload = workload_of_run(segment.entries, signing_key)
    checks += check_pins(
        workload,
        expected_image_digest=policy.expected_image_digest,
        expected_launch_digest=policy.expected_launch_digest,
    )
    binding = verify_tpm_binding(
        ak=ak,
        ek=ek,
        ek_certificate=ek_cert,
        ak_chain=ak_chain,
        claimed=claimed.header.tpm_mode,
        policy=policy,
    )
    checks += binding.checks
    _verify_boot_pcrs(segment.head.quote.pcrs, policy, binding.kind)
    if policy.expected_pcrs:
        checks.append("boot-pcrs")
    return VerifiedIdentity(
        statement=claimed,
        payload=payload,
        signing_key=signing_key,
        keys=dict(field(dict(claimed.body), "keys", dict, "identity predicate")),
        ak=ak,
        ek=ek,
        ek_certificate=ek_cert,
        embassy_pcr=embassy_pcr,
        log_pcr=log_pcr,
        boot_pcrs=boot,
        measurement=measurement,
        tpm_mode=binding.kind,
        segment=verified,
        checks=tuple(checks),
        workload=workload,
        tpm=binding,
    )


def _verify_measurement(
    statement: Statement,
    entries: tuple[LogEntry, ...],
    embassy_pcr: int,
    signing_key: Ed25519PublicKey,
    policy: TrustPolicy,
) -> Measurement:
    what = "identity predicate.measurement"
    m = field(dict(statement.body), "measurement", dict, "identity predicate")
    claimed = hex_decode(field(m, "digest", str, what), f"{what}.digest", size=32)
    start_seq = field(m, "start_entry", int, what)
    starts = [e for e in entries if e.type is EntryType.EMBASSY_START]
    if not starts or starts[-1].seq != start_seq or starts[-1].pcr != embassy_pcr:
        latest = f"seq {starts[-1].seq} in PCR {starts[-1].pcr}" if starts else "absent"
        raise LogIntegrityError(
            f"measurement.start_entry: the identity names start entry seq {start_seq} (in PCR "
            f"{embassy_pcr}), but the latest start event in its segment is {latest}"
        )
    event = authenticate_entry(starts[-1], signing_key)
    assert isinstance(event, Event)
    measurement = measurement_from_json(event.body)
    if measurement.digest != claimed:
        raise MeasurementMismatchError(
            f"measurement.digest: the identity statement says {claimed.hex()}, but its start "
            f"event (seq {starts[-1].seq}) extended {measurement.digest.hex()} into the PCR"
        )
    if policy.expected_measurement is not None:
        if measurement.digest != policy.expected_measurement:
            raise MeasurementMismatchError(
                f"embassy measurement is {measurement.digest.hex()}, expected "
                f"{policy.expected_measurement.hex()}"
            )
    elif not policy.insecure_any_measurement:
        raise MeasurementMismatchError(
            "no expected measurement given: compute it with `embassy measure` from the "
            "source and config you trust"
        )
    return measurement


def _verify_boot_pcrs(quoted: dict[int, bytes], policy: TrustPolicy, mode: TpmMode) -> None:
    # PCRs 13 and 14 are extended by software; they mean something only if the boot that
    # ran that software is pinned (docs/image.md). A software TPM's boot PCRs prove nothing
    # either way, and such evidence already needs allow_software_tpm.
    if mode is TpmMode.HARDWARE and not policy.expected_pcrs and not policy.insecure_any_boot:
        raise PcrMismatchError(
            "no boot PCRs pinned for hardware-TPM evidence: pass the image's expected.json "
            "(--expected) or --expect-pcr N=HEX for PCRs 4, 11 and 12"
        )
    for pcr, value in sorted(policy.expected_pcrs.items()):
        if pcr not in quoted:
            raise PcrMismatchError(f"PCR {pcr} is pinned but the quote does not cover it")
        if quoted[pcr] != value:
            raise PcrMismatchError(f"PCR {pcr} is {quoted[pcr].hex()}, expected {value.hex()}")


def identity_tpm_unverified(doc: dict[str, Any]) -> tuple[bytes, bytes, bytes]:
    """(AK public, EK public, EK certificate) as a document *claims* them, for a live
    credential challenge or a registrar's enrolment.

    Nothing here is trusted: the challenge itself proves (or disproves) the claim.
    """
    segment = parse_segment(doc.get("segment"), "identity document.segment")
    if not segment.entries:
        raise WireFormatError("identity document: empty segment")
    statement = parse_statement(parse_envelope(segment.entries[-1].data).payload)
    _, ak, ek, ek_cert, _ = _identity_fields(dict(statement.body))
    return ak, ek, ek_cert
