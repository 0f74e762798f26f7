"""Weights-key release: the messages between the workload, the embassy and the key broker
(docs/protocol.md, "Weights-key release").

The embassy has no network: the workload carries every message. So each one is bound end
to end, and the workload can only drop them::

    workload ── POST /v1/nonce ──────────────────────────────────────────────▶ broker
             ◀─ {"nonce"} ─────────────────────────────────────────────────────
    workload ── POST /v1/weights/request {model_id,key_id,tenant,operation,nonce} ▶ embassy
             ◀─ release request: the key request, the identity document, and evidence:
                a log segment closed by a quote over ``KeyRequest.evidence_nonce()``
    workload ── POST /v1/release (the release request) ──────────────────────▶ broker
             ◀─ release (the key HPKE-wrapped to the embassy's identity key, the binding
                in ``info``) or denial (reason code), both signed by the broker
    workload ── POST /v1/weights/key {"release"} ───────────────────────────▶ embassy
             ◀─ {"key", "statement"} (weights-key-released)

The quote's qualifying data is SHA-256 of a prefix and the canonical key request, so the
evidence answers *this* request, for *this* broker nonce, from *this* embassy (its keyid is
in the request). The wrapped key's HPKE ``info`` binds the request digest, the decision id
and the policy digest, so a release for another request, model or decision does not open.

Pure: no clock, no I/O; callers pass keys and time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from embassy.errors import BadPayloadError, SignatureError, WireFormatError
from embassy.payload.envelope import (
    HpkePrivateKey,
    hpke_public_keys,
    suite_for,
)
from embassy.wire.codec import (
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
    parse_typed_object,
)

VERSION = 1
REQUEST_TYPE = "embassy-weights-release-request"
RELEASE_TYPE = "embassy-weights-release"
DENIAL_TYPE = "embassy-weights-denial"
EVIDENCE_PREFIX = b"embassy-weights-evidence-v1\0"
INFO_PREFIX = b"embassy-weights-key-v1\0"
SIGNATURE_PREFIX = b"embassy-weights-broker-v1\0"
OPERATIONS = frozenset({"decrypt-for-load"})
NONCE_LEN = 32
KEY_LEN = 32
KEYID_LEN = 32
MAX_ID_LEN = 128
# Model ids, key ids, tenants and decision ids: printable, bounded, no separators to confuse.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
MAX_MESSAGE_BYTES = 1 << 20


def check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise WireFormatError(
            f"{what}: expected 1-{MAX_ID_LEN} characters of [A-Za-z0-9._:/@+-], not starting "
            "with punctuation"
        )
    return value


@dataclass(frozen=True, slots=True)
class KeyRequest:
    """What the workload asks for, made by the embassy (``embassy_keyid`` is its own)."""

    model_id: str
    key_id: str
    tenant: str
    operation: str
    nonce: bytes
    embassy_keyid: str

    def __post_init__(self) -> None:
        check_id(self.model_id, "model_id")
        check_id(self.key_id, "key_id")
        check_id(self.tenant, "tenant")
        if self.operation not in OPERATIONS:
            raise WireFormatError(
                f"operation: {self.operation!r} is not one of {', '.join(sorted(OPERATIONS))}"
            )
        if len(self.nonce) != NONCE_LEN:
            raise WireFormatError(f"nonce: expected {NONCE_LEN} bytes")
        hex_decode(self.embassy_keyid, "embassy_keyid", size=KEYID_LEN)

    def to_json(self) -> JsonObject:
        return {
            "model_id": self.model_id,
            "key_id": self.key_id,
            "tenant": self.tenant,
            "operation": self.operation,
            "nonce": self.nonce.hex(),
            "embassy_keyid": self.embassy_keyid,
        }

    def digest(self) -> bytes:
        """SHA-256 of the canonical request: what the release names."""
        return hashlib.sha256(canonical_json(self.to_json())).digest()

    def evidence_nonce(self) -> bytes:
        """The qualifying data of the evidence quote that answers this request."""
        return hashlib.sha256(EVIDENCE_PREFIX + canonical_json(self.to_json())).digest()


def parse_key_request(obj: object, what: str = "request") -> KeyRequest:
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"model_id", "key_id", "tenant", "operation", "nonce", "embassy_keyid"}, what)
    return KeyRequest(
        model_id=field(obj, "model_id", str, what),
        key_id=field(obj, "key_id", str, what),
        tenant=field(obj, "tenant", str, what),
        operation=field(obj, "operation", str, what),
        nonce=hex_decode(field(obj, "nonce", str, what), f"{what}.nonce", size=NONCE_LEN),
        embassy_keyid=field(obj, "embassy_keyid", str, what),
    )


# -- the release request (embassy -> workload -> broker) -------------------------------------


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """A key request with the evidence that answers it. ``identity`` and ``evidence`` are
    the canonical bytes of the documents, as :mod:`embassy.verify` takes them."""

    request: KeyRequest
    identity: bytes
    evidence: bytes

    def to_json(self) -> JsonObject:
        return {
            "v": VERSION,
            "type": REQUEST_TYPE,
            "request": self.request.to_json(),
            "identity": parse_json_object(self.identity, "identity"),
            "evidence": parse_json_object(self.evidence, "evidence"),
        }


def parse_release_request(data: bytes) -> ReleaseRequest:
    what = "release request"
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireFormatError(f"{what}: over {MAX_MESSAGE_BYTES} bytes")
    obj = parse_typed_object(data, REQUEST_TYPE, {"request", "identity", "evidence"}, what)
    identity = field(obj, "identity", dict, what)
    evidence = field(obj, "evidence", dict, what)
    return ReleaseRequest(
        parse_key_request(obj.get("request"), f"{what}.request"),
        canonical_json(identity),
        canonical_json(evidence),
    )


# -- the release and the denial (broker -> workload -> embassy) ------------------------------


@dataclass(frozen=True, slots=True)
class Release:
    """The broker's grant: the key wrapped to the embassy, and what the decision was."""

    request_sha256: bytes
    model_id: str
    key_id: str
    decision_id: str
    policy_sha256: bytes
    suite: str
    wrapped: bytes
    broker_keyid: str
    signature: bytes

    def signed_fields(self) -> JsonObject:
        return {
            "v": VERSION,
            "type": RELEASE_TYPE,
            "request_sha256": self.request_sha256.hex(),
            "model_id": self.model_id,
            "key_id": self.key_id,
            "decision_id": self.decision_id,
            "policy_sha256": self.policy_sha256.hex(),
            "suite": self.suite,
            "wrapped": b64encode(self.wrapped),
            "broker_keyid": self.broker_keyid,
        }

    def to_json(self) -> JsonObject:
        return {**self.signed_fields(), "signature": b64encode(self.signature)}

    def info(self) -> bytes:
        """HPKE ``info``: everything the key is bound to (all but the ciphertext itself)."""
        bound = {k: v for k, v in self.signed_fields().items() if k != "wrapped"}
        return INFO_PREFIX + canonical_json(bound)


@dataclass(frozen=True, slots=True)
class Denial:
    request_sha256: bytes
    decision_id: str
    reason: str
    message: str
    policy_sha256: bytes | None
    broker_keyid: str
    signature: bytes

    def signed_fields(self) -> JsonObject:
        return {
            "v": VERSION,
            "type": DENIAL_TYPE,
            "request_sha256": self.request_sha256.hex(),
            "decision_id": self.decision_id,
            "reason": self.reason,
            "message": self.message,
            "policy_sha256": None if self.policy_sha256 is None else self.policy_sha256.hex(),
            "broker_keyid": self.broker_keyid,
        }

    def to_json(self) -> JsonObject:
        return {**self.signed_fields(), "signature": b64encode(self.signature)}


def broker_keyid(public: Ed25519PublicKey) -> str:
    from embassy.wire.dsse import keyid

    return keyid(public)


def _sign(fields: JsonObject, key: Ed25519PrivateKey) -> bytes:
    return key.sign(SIGNATURE_PREFIX + canonical_json(fields))


def wrap_release(
    request: KeyRequest,
    weights_key: bytes,
    identity_keys_json: Mapping[str, Any],
    *,
    suite: str,
    decision_id: str,
    policy_sha256: bytes,
    broker_key: Ed25519PrivateKey,
) -> Release:
    """The broker's side: wrap ``weights_key`` to the *verified* identity's HPKE key."""
    if len(weights_key) != KEY_LEN:
        raise ValueError(f"a weights key is {KEY_LEN} bytes")
    check_id(decision_id, "decision_id")
    public = hpke_public_keys(identity_keys_json).get(suite)
    if public is None:
        raise WireFormatError(f"the embassy's identity offers no {suite!r} HPKE key")
    unsigned = Release(
        request_sha256=request.digest(),
        model_id=request.model_id,
        key_id=request.key_id,
        decision_id=decision_id,
        policy_sha256=policy_sha256,
        suite=suite,
        wrapped=b"",
        broker_keyid=broker_keyid(broker_key.public_key()),
        signature=b"",
    )
    wrapped = suite_for(suite).encrypt(weights_key, public, info=unsigned.info())
    release = dataclasses.replace(unsigned, wrapped=wrapped)
    return dataclasses.replace(release, signature=_sign(release.signed_fields(), broker_key))


def deny(
    request_sha256: bytes,
    *,
    decision_id: str,
    reason: str,
    message: str,
    policy_sha256: bytes | None,
    broker_key: Ed25519PrivateKey,
) -> Denial:
    unsigned = Denial(
        request_sha256,
        decision_id,
        reason,
        message[:500],
        policy_sha256,
        broker_keyid(broker_key.public_key()),
        b"",
    )
    return dataclasses.replace(unsigned, signature=_sign(unsigned.signed_fields(), broker_key))


def parse_release(data: bytes) -> Release:
    what = "release"
    obj = parse_typed_object(
        data,
        RELEASE_TYPE,
        {
            "request_sha256",
            "model_id",
            "key_id",
            "decision_id",
            "policy_sha256",
            "suite",
            "wrapped",
            "broker_keyid",
            "signature",
        },
        what,
    )
    return Release(
        request_sha256=hex_decode(
            field(obj, "request_sha256", str, what), "request_sha256", size=32
        ),
        model_id=check_id(obj.get("model_id"), f"{what}.model_id"),
        key_id=check_id(obj.get("key_id"), f"{what}.key_id"),
        decision_id=check_id(obj.get("decision_id"), f"{what}.decision_id"),
        policy_sha256=hex_decode(field(obj, "policy_sha256", str, what), "policy_sha256", size=32),
        suite=field(obj, "suite", str, what),
        wrapped=b64decode(obj.get("wrapped"), f"{what}.wrapped"),
        broker_keyid=field(obj, "broker_keyid", str, what),
        signature=b64decode(obj.get("signature"), f"{what}.signature"),
    )


def parse_denial(data: bytes) -> Denial:
    what = "denial"
    obj = parse_typed_object(
        data,
        DENIAL_TYPE,
        {
            "request_sha256",
            "decision_id",
            "reason",
            "message",
            "policy_sha256",
            "broker_keyid",
            "signature",
        },
        what,
    )
    policy = obj.get("policy_sha256")
    return Denial(
        request_sha256=hex_decode(
            field(obj, "request_sha256", str, what), "request_sha256", size=32
        ),
        decision_id=check_id(obj.get("decision_id"), f"{what}.decision_id"),
        reason=check_id(obj.get("reason"), f"{what}.reason"),
        message=field(obj, "message", str, what),
        policy_sha256=None if policy is None else hex_decode(policy, "policy_sha256", size=32),
        broker_keyid=field(obj, "broker_keyid", str, what),
        signature=b64decode(obj.get("signature"), f"{what}.signature"),
    )


def verify_broker_signature(message: Release | Denial, broker: Ed25519PublicKey) -> None:
    """Raise unless the broker whose public key is ``broker`` signed ``message``."""
    if message.broker_keyid != broker_keyid(broker):
        raise SignatureError(f"signed by broker {message.broker_keyid}, not {broker_keyid(broker)}")
    try:
        broker.verify(message.signature, SIGNATURE_PREFIX + canonical_json(message.signed_fields()))
    except InvalidSignature:
        raise SignatureError("the broker's signature does not verify") from None


def open_release(
    release: Release,
    request: KeyRequest,
    *,
    private_keys: Mapping[str, HpkePrivateKey],
) -> bytes:
    """The embassy's side: the weights key, if ``release`` answers ``request`` (its own)."""
    if not hmac.compare_digest(release.request_sha256, request.digest()):
        raise BadPayloadError(
            f"the release answers request {release.request_sha256.hex()}, not this embassy's "
            f"pending request {request.digest().hex()}"
        )
    if (release.model_id, release.key_id) != (request.model_id, request.key_id):
        raise BadPayloadError(
            f"the release is for model {release.model_id!r} key {release.key_id!r}, the "
            f"request for {request.model_id!r} key {request.key_id!r}"
        )
    private = private_keys.get(release.suite)
    if private is None:
        raise BadPayloadError(f"this embassy has no {release.suite!r} HPKE key")
    try:
        key = suite_for(release.suite).decrypt(release.wrapped, private, info=release.info())
    except InvalidTag:
        raise BadPayloadError(
            "the release does not unwrap: wrapped to another embassy, or a field was changed"
        ) from None
    if len(key) != KEY_LEN:
        raise BadPayloadError(f"the release unwraps to {len(key)} bytes, not {KEY_LEN}")
    return key
