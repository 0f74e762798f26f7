"""The facts the broker's policy decides on, drawn only from verified evidence. Pure.

The policy input (docs/protocol.md, "Key broker")::

    {"attestation": {"valid": true, "measurement": "<hex>", "tpm_kind": "hardware"|"software",
                     "boot_pcrs": {"4": "<hex>", ...}, "ak_certified": bool},
     "workload": {"image_digest", "launch_digest", "name"} | null,
     "sealed": bool,
     "request": {"model_id", "key_id", "tenant", "operation"},
     "embassy_keyid": "<hex>"}

Nothing here is taken from the request's word except ``request`` (what is asked for,
which the evidence's quote is over): the measurement, TPM kind and workload are what the
identity document proved, the boot PCRs and ``sealed`` what the fresh evidence proved.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from embassy.errors import EmbassyRestartedError
from embassy.log.segment import EVIDENCE_TYPE
from embassy.verify.evidence import VerifiedEvidence, segment_file
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.segment import VerifiedSegment
from embassy.weights.release import KeyRequest
from embassy.wire.codec import JsonObject, canonical_json
from embassy.wire.statement import (
    SEAL_V1,
    SEAL_V2,
    SESSION_ABORT_V1,
    SESSION_ABORT_V2,
    UNSEAL_V1,
    UNSEAL_V2,
)

_SEALS = frozenset({SEAL_V1, SEAL_V2})
_ENDS = frozenset({UNSEAL_V1, UNSEAL_V2, SESSION_ABORT_V1, SESSION_ABORT_V2})


def session_open(segment: VerifiedSegment) -> bool:
    """Whether a sealed session is open at the segment's head: its last seal statement has
    no unseal or abort statement after it. The evidence segment covers the whole current
    boot up to a fresh quote, so a seal before it would be in it."""
    is_open = False
    for logged in segment.statements:
        kind = logged.statement.predicate_type
        if kind in _SEALS:
            is_open = True
        elif kind in _ENDS:
            is_open = False
    return is_open


def check_same_run(identity: VerifiedIdentity, evidence: VerifiedEvidence) -> None:
    """Raise unless the evidence is from the run the identity document shows.

    The embassy's keys outlive a restart, so evidence signed by them could come from a later
    run with another workload. Every start and launch event is extended into the embassy
    PCR: the same TPM boot and the same value of that PCR at the evidence's head as at the
    identity's mean no start or launch since (and the identity's workload is the running one).
    """
    pcr = identity.embassy_pcr
    if evidence.segment.reset_count != identity.segment.reset_count:
        raise EmbassyRestartedError(
            f"the evidence is from TPM boot {evidence.segment.reset_count}, the identity "
            f"document from boot {identity.segment.reset_count}: send the current identity"
        )
    now = evidence.segment.head_pcrs.get(pcr, b"")
    then = identity.segment.head_pcrs.get(pcr, b"")
    if not now or not hmac.compare_digest(now, then):
        raise EmbassyRestartedError(
            f"PCR {pcr} (the embassy's starts and launches) at the evidence's head differs "
            "from the identity document's: the embassy restarted or relaunched its workload "
            "since (send the current identity)"
        )


def boot_pcr_values(identity: VerifiedIdentity, evidence_bytes: bytes) -> dict[str, str]:
    """The boot PCRs' values in the evidence's closing quote (verified by
    ``verify_evidence``: the quote's PCR digest covers them), keyed by decimal index."""
    segment, _ = segment_file(evidence_bytes, EVIDENCE_TYPE, "evidence")
    quoted = segment.head.quote.pcrs
    return {str(pcr): quoted[pcr].hex() for pcr in sorted(identity.boot_pcrs) if pcr in quoted}


def policy_input(
    identity: VerifiedIdentity,
    evidence: VerifiedEvidence,
    evidence_bytes: bytes,
    request: KeyRequest,
) -> JsonObject:
    """The Rego input for ``request``, from the verified identity and evidence only."""
    tpm = identity.tpm
    workload: dict[str, Any] | None = None
    if identity.workload is not None:
        workload = {
            "image_digest": identity.workload.image_digest,
            "launch_digest": identity.workload.launch_digest.hex(),
            "name": identity.workload.name,
        }
    return {
        "attestation": {
            "valid": True,
            "measurement": identity.measurement.digest.hex(),
            "tpm_kind": identity.tpm_mode.value,
            "boot_pcrs": boot_pcr_values(identity, evidence_bytes),
            "ak_certified": tpm is not None
            and (tpm.ak_certificate is not None or tpm.ak_activated_live),
        },
        "workload": workload,
        "sealed": session_open(evidence.segment),
        "request": {
            "model_id": request.model_id,
            "key_id": request.key_id,
            "tenant": request.tenant,
            "operation": request.operation,
        },
        "embassy_keyid": request.embassy_keyid,
    }


def input_digest(policy_input: JsonObject) -> bytes:
    """SHA-256 of the canonical policy input: what a decision names."""
    return hashlib.sha256(canonical_json(policy_input)).digest()
