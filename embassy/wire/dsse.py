"""DSSE (Dead Simple Signing Envelope) v1 with Ed25519, as every statement is carried.

The signature covers PAE(payloadType, payload), the exact payload bytes, so a verifier
never needs to re-encode anything. Any DSSE verifier that knows the embassy's Ed25519 key
accepts these envelopes. ``keyid`` is the hex SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from embassy.errors import SignatureError, WireFormatError
from embassy.wire.codec import (
    b64decode,
    b64encode,
    canonical_json,
    field,
    json_string,
    only_fields,
    parse_json_object,
)

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding."""
    type_bytes = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(type_bytes), type_bytes, len(payload), payload)


def raw_public_key(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def keyid(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(raw_public_key(key)).hexdigest()


@dataclass(frozen=True, slots=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed envelope. ``raw`` is the exact bytes it was parsed from."""

    payload_type: str
    payload: bytes
    signatures: tuple[Signature, ...]
    raw: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the exact envelope bytes: what the statement log records."""
        return hashlib.sha256(self.raw).digest()


@dataclass(frozen=True, slots=True)
class Signer:
    """An Ed25519 signing key with its key id computed once (it is a SHA-256 of the public
    key: worth not redoing for every envelope a log signs)."""

    key: Ed25519PrivateKey
    keyid: str

    @classmethod
    def of(cls, key: Ed25519PrivateKey) -> Signer:
        return cls(key, keyid(key.public_key()))

    def sign(self, payload: bytes, payload_type: str = IN_TOTO_PAYLOAD_TYPE) -> bytes:
        """Sign ``payload``; return the envelope's canonical JSON bytes."""
        return encode_envelope(
            payload, payload_type, self.keyid, self.key.sign(pae(payload_type, payload))
        )


def sign_envelope(
    payload: bytes, key: Ed25519PrivateKey, payload_type: str = IN_TOTO_PAYLOAD_TYPE
) -> bytes:
    """Sign ``payload`` and return the envelope's canonical JSON bytes."""
    return Signer.of(key).sign(payload, payload_type)


def encode_envelope(payload: bytes, payload_type: str, key_id: str, sig: bytes) -> bytes:
    """The canonical JSON of a one-signature envelope, written directly: its keys in sorted
    order, base64 (which never needs escaping) and two JSON strings. Anything but plain
    strings takes the general encoder, which gives the same bytes or refuses."""
    if type(payload_type) is not str or type(key_id) is not str:
        return canonical_json(
            {
                "payload": b64encode(payload),
                "payloadType": payload_type,
                "signatures": [{"keyid": key_id, "sig": b64encode(sig)}],
            }
        )
    return "".join(
        (
            '{"payload":"',
            b64encode(payload),
            '","payloadType":',
            json_string(payload_type),
            ',"signatures":[{"keyid":',
            json_string(key_id),
            ',"sig":"',
            b64encode(sig),
            '"}]}',
        )
    ).encode("utf-8")


def parse_envelope(data: bytes) -> Envelope:
    if len(data) > MAX_ENVELOPE_BYTES:
        raise WireFormatError(f"envelope: {len(data)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    obj = parse_json_object(data, "envelope")
    only_fields(obj, {"payload", "payloadType", "signatures"}, "envelope")
    payload = b64decode(field(obj, "payload", str, "envelope"), "envelope.payload")
    payload_type = field(obj, "payloadType", str, "envelope")
    sigs = field(obj, "signatures", list, "envelope")
    if not sigs:
        raise WireFormatError("envelope: no signatures")
    parsed = []
    for i, item in enumerate(sigs):
        what = f"envelope.signatures[{i}]"
        if not isinstance(item, dict):
            raise WireFormatError(f"{what}: expected an object")
        only_fields(item, {"keyid", "sig"}, what)
        parsed.append(
            Signature(
                keyid=field(item, "keyid", str, what),
                sig=b64decode(field(item, "sig", str, what), f"{what}.sig"),
            )
        )
    return Envelope(payload_type, payload, tuple(parsed), data)


def verify_envelope(
    envelope: Envelope, key: Ed25519PublicKey, payload_type: str = IN_TOTO_PAYLOAD_TYPE
) -> bytes:
    """Return the payload if ``key`` signed it; raise :class:`SignatureError` otherwise."""
    if envelope.payload_type != payload_type:
        raise WireFormatError(
            f"envelope: payloadType {envelope.payload_type!r}, expected {payload_type!r}"
        )
    wanted = keyid(key)
    candidates = [s for s in envelope.signatures if s.keyid == wanted]
    if not candidates:
        raise SignatureError(f"envelope carries no signature by key {wanted[:16]}…")
    message = pae(envelope.payload_type, envelope.payload)
    for candidate in candidates:
        try:
            key.verify(candidate.sig, message)
        except InvalidSignature:
            continue
        return envelope.payload
    raise SignatureError(f"envelope signature by key {wanted[:16]}… does not verify")
