"""The payload envelope: the input key, HPKE-wrapped to one embassy (docs/protocol.md §2).

::

    {"v":2,"payload_id":"<hex16>","expires_unix":N,"embassy_keyid":"<hex32>",
     "measurement":"<hex32>","launch_digest":"<hex32>",
     "suite":"x25519" | "mlkem768-x25519","has_action_key":false,
     "reply_key":{...} (optional),"wrapped":"<b64>"}

    wrapped   = HPKE base mode (KEM of the suite, HKDF-SHA256, AES-256-GCM) of
                input_key (32 B) || action_key (32 B, only if has_action_key)
    info      = b"embassy-payload-v2\\0" || canonical JSON of every field but ``wrapped``

``measurement`` is the embassy's measurement digest (its code, config and policy) and
``launch_digest`` its workload's launch digest, both as the user's verified identity shows
them. ``reply_key`` (optional; a job needs it) is the user's HPKE public key that a job's
result is encrypted to (:class:`ReplyKey`, docs/protocol.md §2b). The embassy refuses a
payload for another measurement or workload with codes of their own before it decrypts
anything, and as both are in the HPKE ``info``, an envelope whose fields were rewritten to
match does not unwrap. Version 1 bound neither: it is refused.

The user side (:func:`make_payload`, :func:`seal_input`) wraps to the public keys of an
identity the user has verified; the embassy side (:func:`open_payload`) unwraps with its
private keys. Both are pure: no clock, no disk, no replay store (the daemon keeps that).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from embassy.errors import (
    BadPayloadError,
    PayloadExpiredError,
    UnboundPayloadError,
    UnsupportedSuiteError,
    WireFormatError,
    WrongEmbassyError,
    WrongMeasurementError,
    WrongWorkloadError,
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
)
from workload_sdk.stream import DEFAULT_CHUNK_SIZE, encrypt_stream

VERSION = 2
INFO_PREFIX = b"embassy-payload-v2\0"
PAYLOAD_ID_LEN = 16
KEY_LEN = 32
KEYID_LEN = 32
DIGEST_LEN = 32
SUITE_X25519 = "x25519"
SUITE_MLKEM768_X25519 = "mlkem768-x25519"
# The longest ``wrapped`` a supported suite makes is 1,120 (enc) + 64 + 16 (tag) bytes.
MAX_WRAPPED_LEN = 4096
MAX_SUITE_LEN = 64

_AEAD = hpke.AEAD.AES_256_GCM
_KDF = hpke.KDF.HKDF_SHA256
SUITES: Mapping[str, hpke.Suite] = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, _KDF, _AEAD),
    SUITE_MLKEM768_X25519: hpke.Suite(hpke.KEM.MLKEM768_X25519, _KDF, _AEAD),
}

HpkePublicKey = X25519PublicKey | hpke.MLKEM768X25519PublicKey
HpkePrivateKey = X25519PrivateKey | hpke.MLKEM768X25519PrivateKey
_PRIVATE_TYPES: Mapping[str, type] = {
    SUITE_X25519: X25519PrivateKey,
    SUITE_MLKEM768_X25519: hpke.MLKEM768X25519PrivateKey,
}

_FIELDS = {
    "reply_key",
    "v",
    "payload_id",
    "expires_unix",
    "embassy_keyid",
    "measurement",
    "launch_digest",
    "suite",
    "has_action_key",
    "wrapped",
}


@dataclass(frozen=True)
class PayloadEnvelope:
    payload_id: bytes
    expires_unix: int
    embassy_keyid: str
    measurement: bytes
    launch_digest: bytes
    suite: str
    has_action_key: bool
    wrapped: bytes
    reply_key: ReplyKey | None = None

    def bound_fields(self) -> JsonObject:
        """Every field but ``wrapped``: what the HPKE ``info`` binds (``reply_key`` if set)."""
        bound: JsonObject = {
            "v": VERSION,
            "payload_id": self.payload_id.hex(),
            "expires_unix": self.expires_unix,
            "embassy_keyid": self.embassy_keyid,
            "measurement": self.measurement.hex(),
            "launch_digest": self.launch_digest.hex(),
            "suite": self.suite,
            "has_action_key": self.has_action_key,
        }
        if self.reply_key is not None:
            bound["reply_key"] = self.reply_key.to_json()
        return bound

    def to_json(self) -> JsonObject:
        return {**self.bound_fields(), "wrapped": b64encode(self.wrapped)}

    def to_bytes(self) -> bytes:
        """The canonical JSON encoding."""
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj: object, what: str = "payload envelope") -> PayloadEnvelope:
        """Strictly parse an already-decoded JSON value (e.g. the ``payload`` of a request)."""
        if not isinstance(obj, dict):
            raise WireFormatError(f"{what}: expected a JSON object")
        version = field(obj, "v", int, what)
        if version == 1:
            raise UnboundPayloadError(
                f"{what}: version 1 binds neither the embassy's measurement nor its workload, "
                "so any embassy holding the keys would open it; seal the payload again with "
                f"version {VERSION} (embassy payload seal)"
            )
        if version != VERSION:
            raise WireFormatError(f"{what}: unsupported version {version}")
        only_fields(obj, _FIELDS, what)
        payload_id = hex_decode(
            field(obj, "payload_id", str, what), f"{what}.payload_id", size=PAYLOAD_ID_LEN
        )
        expires = field(obj, "expires_unix", int, what)
        if not 0 <= expires < 2**63:
            raise WireFormatError(f"{what}.expires_unix: out of range")
        keyid = field(obj, "embassy_keyid", str, what)
        hex_decode(keyid, f"{what}.embassy_keyid", size=KEYID_LEN)
        measurement = hex_decode(
            field(obj, "measurement", str, what), f"{what}.measurement", size=DIGEST_LEN
        )
        launch = hex_decode(
            field(obj, "launch_digest", str, what), f"{what}.launch_digest", size=DIGEST_LEN
        )
        suite = field(obj, "suite", str, what)
        # An unknown suite is well-formed: open_payload refuses it as unsupported-suite.
        if not suite or len(suite) > MAX_SUITE_LEN or not suite.isascii():
            raise WireFormatError(f"{what}.suite: expected a short ASCII suite name")
        has_action_key = field(obj, "has_action_key", bool, what)
        wrapped = b64decode(field(obj, "wrapped", str, what), f"{what}.wrapped")
        if not 0 < len(wrapped) <= MAX_WRAPPED_LEN:
            raise WireFormatError(f"{what}.wrapped: {len(wrapped)} bytes is out of range")
        reply_key = None  # absent, never null: a null is refused as not an object
        if "reply_key" in obj:
            reply_key = ReplyKey.from_json(obj["reply_key"], f"{what}.reply_key")
        return cls(
            payload_id,
            expires,
            keyid,
            measurement,
            launch,
            suite,
            has_action_key,
            wrapped,
            reply_key,
        )

    @classmethod
    def parse(cls, data: bytes) -> PayloadEnvelope:
        """Strictly parse the envelope's JSON bytes."""
        return cls.from_json(parse_json_object(data, "payload envelope"))


def info_for(envelope: PayloadEnvelope) -> bytes:
    """The HPKE ``info``: the prefix and the canonical JSON of every field but ``wrapped``."""
    return INFO_PREFIX + canonical_json(envelope.bound_fields())


def suite_for(name: str) -> hpke.Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise UnsupportedSuiteError(
            f"unsupported HPKE suite {name!r}; supported: {', '.join(sorted(SUITES))}"
        ) from None


# ---------------------------------------------------------------------------------------
# The user's reply key


@dataclass(frozen=True)
class ReplyKey:
    """The user's HPKE public key for a job's result (docs/protocol.md §2b)::

        {"suite":"x25519","x25519":"<b64 32 B>"}
        {"suite":"mlkem768-x25519","mlkem768":"<b64 1184 B>","x25519":"<b64 32 B>"}

    The parts are encoded as the identity publishes its own HPKE keys (``keys.hpke``).
    """

    suite: str
    x25519: bytes
    mlkem768: bytes | None = None

    def to_json(self) -> JsonObject:
        out: JsonObject = {"suite": self.suite, "x25519": b64encode(self.x25519)}
        if self.mlkem768 is not None:
            out["mlkem768"] = b64encode(self.mlkem768)
        return out

    def keyid(self) -> str:
        """SHA-256 (hex) of the key's canonical JSON: names it in a wrapped result key."""
        return hashlib.sha256(canonical_json(self.to_json())).hexdigest()

    def public_key(self) -> HpkePublicKey:
        x25519 = X25519PublicKey.from_public_bytes(self.x25519)
        if self.suite == SUITE_X25519:
            return x25519
        assert self.mlkem768 is not None  # from_json and from_public enforce it
        return hpke.MLKEM768X25519PublicKey(
            MLKEM768PublicKey.from_public_bytes(self.mlkem768), x25519
        )

    @classmethod
    def from_json(cls, obj: object, what: str = "reply key") -> ReplyKey:
        """Strictly parse: exactly the fields of its suite, each key of its exact size."""
        if not isinstance(obj, dict):
            raise WireFormatError(f"{what}: expected a JSON object")
        suite = field(obj, "suite", str, what)
        if suite == SUITE_X25519:
            only_fields(obj, {"suite", "x25519"}, what)
            return cls(suite, _x25519_part(obj, what))
        if suite == SUITE_MLKEM768_X25519:
            only_fields(obj, {"suite", "mlkem768", "x25519"}, what)
            mlkem = _raw_key(obj, "mlkem768", 1184, what)
            try:
                MLKEM768PublicKey.from_public_bytes(mlkem)
            except ValueError:
                raise WireFormatError(f"{what}.mlkem768: not a valid ML-KEM-768 key") from None
            return cls(suite, _x25519_part(obj, what), mlkem)
        raise UnsupportedSuiteError(
            f"{what}.suite: unsupported HPKE suite {suite[:MAX_SUITE_LEN]!r}; supported: "
            f"{', '.join(sorted(SUITES))}"
        )

    @classmethod
    def parse(cls, data: bytes, what: str = "reply key") -> ReplyKey:
        return cls.from_json(parse_json_object(data, what), what)


# Any fixed scalar: an exchange with it fails exactly for the small-order points.
_PROBE = X25519PrivateKey.from_private_bytes(hashlib.sha256(b"embassy x25519 probe").digest())


def _x25519_part(obj: Mapping[str, Any], what: str) -> bytes:
    """A reply key's X25519 part; a small-order point (every shared secret zero, so HPKE
    to it fails when the result is wrapped, after the job started) is refused here."""
    raw = _raw_key(obj, "x25519", 32, what)
    try:
        _PROBE.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise WireFormatError(f"{what}.x25519: a small-order point, not a usable key") from None
    return raw


# ---------------------------------------------------------------------------------------
# The identity's public keys


def _raw_key(entry: Mapping[str, Any], name: str, size: int, what: str) -> bytes:
    raw = b64decode(field(dict(entry), name, str, what), f"{what}.{name}")
    if len(raw) != size:
        raise WireFormatError(f"{what}.{name}: expected {size} bytes, got {len(raw)}")
    return raw


def hpke_public_keys(identity_keys_json: Mapping[str, Any]) -> dict[str, HpkePublicKey]:
    """The HPKE public keys an identity's ``keys`` JSON publishes, by suite name.

    Entries of suites this code does not know are skipped; a suite listed twice is an error.
    """
    what = "identity keys"
    entries = field(dict(identity_keys_json), "hpke", list, what)
    keys: dict[str, HpkePublicKey] = {}
    for i, entry in enumerate(entries):
        where = f"{what}.hpke[{i}]"
        if not isinstance(entry, dict):
            raise WireFormatError(f"{where}: expected an object")
        suite = field(entry, "suite", str, where)
        if suite in keys:
            raise WireFormatError(f"{where}: suite {suite!r} is listed twice")
        if suite == SUITE_X25519:
            keys[suite] = X25519PublicKey.from_public_bytes(_raw_key(entry, "x25519", 32, where))
        elif suite == SUITE_MLKEM768_X25519:
            mlkem = MLKEM768PublicKey.from_public_bytes(_raw_key(entry, "mlkem768", 1184, where))
            x25519 = X25519PublicKey.from_public_bytes(_raw_key(entry, "x25519", 32, where))
            keys[suite] = hpke.MLKEM768X25519PublicKey(mlkem, x25519)
    return keys


def embassy_keyid(identity_keys_json: Mapping[str, Any]) -> str:
    """The embassy's signing keyid, checked against the signing public key it names."""
    what = "identity keys.signing"
    signing = field(dict(identity_keys_json), "signing", dict, "identity keys")
    keyid: str = field(signing, "keyid", str, what)
    hex_decode(keyid, f"{what}.keyid", size=KEYID_LEN)
    public = b64decode(field(signing, "public", str, what), f"{what}.public")
    if hashlib.sha256(public).hexdigest() != keyid:
        raise WireFormatError(f"{what}.keyid: is not SHA-256 of the signing public key")
    return keyid


# ---------------------------------------------------------------------------------------
# User side


def _digest_arg(name: str, value: bytes) -> bytes:
    if not isinstance(value, bytes) or len(value) != DIGEST_LEN:
        raise ValueError(f"{name} must be {DIGEST_LEN} bytes (a SHA-256 digest)")
    return bytes(value)


def make_payload(
    identity_keys_json: Mapping[str, Any],
    *,
    measurement: bytes,
    launch_digest: bytes,
    suite: str = SUITE_MLKEM768_X25519,
    ttl_seconds: int = 3600,
    now: float | None = None,
    action_key: bool = False,
    payload_id: bytes | None = None,
    reply_key: ReplyKey | None = None,
) -> tuple[PayloadEnvelope, bytes, bytes | None]:
    """Wrap a fresh input key (and action key) to the embassy of a *verified* identity.

    Returns (envelope, input_key, action_key or None). ``identity_keys_json`` is
    :attr:`embassy.verify.identity.VerifiedIdentity.keys`, ``measurement`` its
    ``measurement.digest`` and ``launch_digest`` its ``workload.launch_digest``: only an
    embassy of that measurement, running that workload, opens the payload. ``reply_key``
    (the user's, for a job's result) is bound into the wrapping like every other field.
    """
    measurement = _digest_arg("measurement", measurement)
    launch_digest = _digest_arg("launch_digest", launch_digest)
    hpke_suite = suite_for(suite)
    public = hpke_public_keys(identity_keys_json).get(suite)
    if public is None:
        raise UnsupportedSuiteError(f"the embassy's identity offers no {suite!r} HPKE key")
    if isinstance(ttl_seconds, bool) or not isinstance(ttl_seconds, int) or ttl_seconds <= 0:
        raise ValueError(f"ttl_seconds must be a positive int, got {ttl_seconds!r}")
    if payload_id is None:
        payload_id = os.urandom(PAYLOAD_ID_LEN)
    elif len(payload_id) != PAYLOAD_ID_LEN:
        raise ValueError(f"payload_id must be {PAYLOAD_ID_LEN} bytes")
    input_key = os.urandom(KEY_LEN)
    action = os.urandom(KEY_LEN) if action_key else None
    unsigned = PayloadEnvelope(
        payload_id=bytes(payload_id),
        expires_unix=int(time.time() if now is None else now) + ttl_seconds,
        embassy_keyid=embassy_keyid(identity_keys_json),
        measurement=measurement,
        launch_digest=launch_digest,
        suite=suite,
        has_action_key=action_key,
        wrapped=b"",
        reply_key=reply_key,
    )
    wrapped = hpke_suite.encrypt(input_key + (action or b""), public, info=info_for(unsigned))
    return dataclasses.replace(unsigned, wrapped=wrapped), input_key, action


def seal_input(
    identity_keys_json: Mapping[str, Any],
    src: BinaryIO,
    dst: BinaryIO,
    *,
    measurement: bytes,
    launch_digest: bytes,
    suite: str = SUITE_MLKEM768_X25519,
    ttl_seconds: int = 3600,
    now: float | None = None,
    payload_id: bytes | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    reply_key: ReplyKey | None = None,
) -> tuple[PayloadEnvelope, bytes]:
    """Make a payload and encrypt ``src`` to ``dst`` as its stream: (envelope, input_key).

    For an action key too, call :func:`make_payload` and ``encrypt_stream`` yourself.
    """
    envelope, input_key, _ = make_payload(
        identity_keys_json,
        measurement=measurement,
        launch_digest=launch_digest,
        suite=suite,
        ttl_seconds=ttl_seconds,
        now=now,
        payload_id=payload_id,
        reply_key=reply_key,
    )
    encrypt_stream(input_key, envelope.payload_id, src, dst, chunk_size=chunk_size)
    return envelope, input_key


# ---------------------------------------------------------------------------------------
# Embassy side


def open_payload(
    envelope: PayloadEnvelope,
    *,
    private_keys: Mapping[str, HpkePrivateKey],
    own_keyid: str,
    own_measurement: bytes,
    own_launch_digest: bytes,
    now: float,
) -> tuple[bytes, bytes | None]:
    """Unwrap (input_key, action_key or None), or raise, checking in this order:

    expired (:class:`PayloadExpiredError`), another embassy's keyid
    (:class:`WrongEmbassyError`), another measurement (:class:`WrongMeasurementError`),
    another workload (:class:`WrongWorkloadError`), a suite without a key here
    (:class:`UnsupportedSuiteError`), then HPKE (:class:`BadPayloadError`). The first five
    read fields HPKE has not yet authenticated; a forged field there can only make the
    embassy refuse, never accept: each is in the HPKE ``info``, so an envelope rewritten to
    name this embassy's measurement or workload does not unwrap. Replay is not checked here.
    """
    if now >= envelope.expires_unix:
        raise PayloadExpiredError(
            f"payload {envelope.payload_id.hex()} expired at {envelope.expires_unix} "
            f"(now {int(now)})"
        )
    if envelope.embassy_keyid != own_keyid:
        raise WrongEmbassyError(
            f"payload is for embassy {envelope.embassy_keyid}, this embassy is {own_keyid}"
        )
    if not hmac.compare_digest(envelope.measurement, own_measurement):
        raise WrongMeasurementError(
            f"payload.measurement is {envelope.measurement.hex()}, this embassy's measurement "
            f"is {own_measurement.hex()}: the payload was sealed for another embassy "
            "code, config or policy"
        )
    if not hmac.compare_digest(envelope.launch_digest, own_launch_digest):
        raise WrongWorkloadError(
            f"payload.launch_digest is {envelope.launch_digest.hex()}, this embassy's "
            f"workload has launch digest {own_launch_digest.hex()}: the payload was sealed "
            "for another workload (image or launch configuration)"
        )
    hpke_suite = suite_for(envelope.suite)
    private = private_keys.get(envelope.suite)
    if private is None:
        raise UnsupportedSuiteError(f"this embassy has no {envelope.suite!r} HPKE key")
    if not isinstance(private, _PRIVATE_TYPES[envelope.suite]):
        raise TypeError(f"private key for {envelope.suite!r} is a {type(private).__name__}")
    try:
        plain = hpke_suite.decrypt(envelope.wrapped, private, info=info_for(envelope))
    except InvalidTag:
        raise BadPayloadError(
            "payload does not unwrap: wrapped to another key, or a field was changed"
        ) from None
    expected = 2 * KEY_LEN if envelope.has_action_key else KEY_LEN
    if len(plain) != expected:
        raise BadPayloadError(f"payload unwraps to {len(plain)} bytes, expected {expected}")
    return plain[:KEY_LEN], (plain[KEY_LEN:] if envelope.has_action_key else None)
