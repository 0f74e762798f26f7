"""Meter readings: signed by the embassy, readable only by the authority that asked.

A ``read`` instruction names a reply key (X25519). The embassy answers with a
``meter-reading:v1`` statement, signed and appended to the log like every other, whose
predicate carries the meters only as an HPKE ciphertext to that key::

    predicate = {"header": ..., "authority": "<name>", "instruction_sha256": "<hex>",
                 "suite": "x25519", "ciphertext": "<b64>"}
    HPKE      = base mode, DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM
    info      = b"embassy-meter-reading-v1\\0" || canonical JSON of
                {"authority", "embassy_keyid", "instruction_sha256"}
    plaintext = u32be(n) || canonical JSON (n bytes) || zero padding to a multiple of 512
    JSON      = {"v":1,"authority":..,"instruction_sha256":..,"formula":..,"as_of_seq":N,
                 "meters":[{"capability","value","count","last_seq"}, ...]}

Values are integers in micro-units (see :mod:`embassy.metering.score`). The padding keeps
the ciphertext's length from telling the host how many meters moved. The statement's own
header gives the reading's log position; ``as_of_seq`` is the log head it was read at, so
an authority can check the count of ``meter-update`` statements up to there.

The authority's reply key is derived from its Ed25519 signing key (:func:`reply_key`), so
an authority keeps one secret. Pure: no clock, no disk.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from embassy.errors import KeyBindingError, VerificationError, WireFormatError
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
from embassy.wire.dsse import parse_envelope, verify_envelope
from embassy.wire.statement import METER_READING_V1, Header, Subject, parse_statement

VERSION = 2  # what the embassy writes; readings of version 1 (no models) still open
_VERSIONS = (1, 2)
_MICRO = 1_000_000  # score.MICRO, not imported: reading an answer needs no numpy
SUITE = "x25519"
INFO_PREFIX = b"embassy-meter-reading-v1\0"
PAD_TO = 512
_HPKE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
_REPLY_LABEL = b"embassy-authority-reply-v1"


@dataclass(frozen=True, slots=True)
class Meter:
    capability: str
    value: int
    count: int
    last_seq: int | None

    def to_json(self) -> JsonObject:
        return {
            "capability": self.capability,
            "value": self.value,
            "count": self.count,
            "last_seq": self.last_seq,
        }


@dataclass(frozen=True, slots=True)
class ModelCalibration:
    """One formula v2 model of the authority's (per tensor and dimension): its digest, as
    ``meter-update`` statements name it, and the threshold it fitted for each capability
    from the authority's own negatives, so the authority can recompute every increment."""

    tensor_sha256: str
    dim: int
    model_sha256: str
    thresholds: tuple[tuple[str, int], ...]  # (capability, micro-units), sorted

    def to_json(self) -> JsonObject:
        return {
            "tensor_sha256": self.tensor_sha256,
            "dim": self.dim,
            "model_sha256": self.model_sha256,
            "calibration": [{"capability": c, "threshold": t} for c, t in self.thresholds],
        }


@dataclass(frozen=True, slots=True)
class Reading:
    authority: str
    instruction_sha256: bytes
    formula: str
    as_of_seq: int
    meters: tuple[Meter, ...]
    header: Header | None = None  # the statement's log position, once verified
    models: tuple[ModelCalibration, ...] = ()  # version 2 only
    version: int = VERSION

    def to_json(self) -> JsonObject:
        obj: JsonObject = {
            "v": self.version,
            "authority": self.authority,
            "instruction_sha256": self.instruction_sha256.hex(),
            "formula": self.formula,
            "as_of_seq": self.as_of_seq,
            "meters": [m.to_json() for m in self.meters],
        }
        if self.version >= 2:
            obj["models"] = [m.to_json() for m in self.models]
        elif self.models:
            raise ValueError("meter reading: version 1 carries no models")
        return obj


def reply_key(signing_key: Ed25519PrivateKey) -> X25519PrivateKey:
    """The authority's reply key: HKDF of its Ed25519 private key, one secret to keep."""
    raw = signing_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    seed = HKDF(hashes.SHA256(), 32, salt=None, info=_REPLY_LABEL).derive(raw)
    return X25519PrivateKey.from_private_bytes(seed)


def reply_public_bytes(signing_key: Ed25519PrivateKey) -> bytes:
    return reply_key(signing_key).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _info(authority: str, embassy_keyid: str, instruction_sha256: bytes) -> bytes:
    bound = {
        "authority": authority,
        "embassy_keyid": embassy_keyid,
        "instruction_sha256": instruction_sha256.hex(),
    }
    return INFO_PREFIX + canonical_json(bound)


def _pad(data: bytes) -> bytes:
    framed = len(data).to_bytes(4, "big") + data
    return framed + bytes(-len(framed) % PAD_TO)


def _unpad(data: bytes) -> bytes:
    if len(data) < 4 or len(data) % PAD_TO:
        raise WireFormatError("meter reading: bad padding")
    size = int.from_bytes(data[:4], "big")
    if size > len(data) - 4 or any(data[4 + size :]):
        raise WireFormatError("meter reading: bad padding")
    return data[4 : 4 + size]


def reading_predicate(
    reading: Reading, reply_public: bytes, embassy_keyid: str
) -> tuple[list[Subject], JsonObject]:
    """Embassy side: the subjects and body of the meter-reading statement."""
    recipient = X25519PublicKey.from_public_bytes(reply_public)
    info = _info(reading.authority, embassy_keyid, reading.instruction_sha256)
    ciphertext = _HPKE.encrypt(_pad(canonical_json(reading.to_json())), recipient, info=info)
    body: JsonObject = {
        "authority": reading.authority,
        "instruction_sha256": reading.instruction_sha256.hex(),
        "suite": SUITE,
        "ciphertext": b64encode(ciphertext),
    }
    return [Subject("instruction", reading.instruction_sha256)], body


def _parse_meters(items: Sequence[object]) -> tuple[Meter, ...]:
    meters = []
    for i, item in enumerate(items):
        what = f"meter reading.meters[{i}]"
        if not isinstance(item, dict):
            raise WireFormatError(f"{what}: expected an object")
        only_fields(item, {"capability", "value", "count", "last_seq"}, what)
        last = item.get("last_seq")
        if last is not None and (not isinstance(last, int) or isinstance(last, bool)):
            raise WireFormatError(f"{what}.last_seq: an integer or null")
        meters.append(
            Meter(
                field(item, "capability", str, what),
                field(item, "value", int, what),
                field(item, "count", int, what),
                last,
            )
        )
    return tuple(meters)


_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def _digest_hex(obj: JsonObject, key: str, what: str) -> str:
    value: str = field(obj, key, str, what)
    if not _SHA256_HEX.fullmatch(value):
        raise WireFormatError(f"{what}.{key}: 64 lowercase hex digits")
    return value


def _parse_models(items: Sequence[object]) -> tuple[ModelCalibration, ...]:
    models = []
    for i, item in enumerate(items):
        what = f"meter reading.models[{i}]"
        if not isinstance(item, dict):
            raise WireFormatError(f"{what}: expected an object")
        only_fields(item, {"tensor_sha256", "dim", "model_sha256", "calibration"}, what)
        thresholds = []
        for j, entry in enumerate(field(item, "calibration", list, what)):
            where = f"{what}.calibration[{j}]"
            if not isinstance(entry, dict):
                raise WireFormatError(f"{where}: expected an object")
            only_fields(entry, {"capability", "threshold"}, where)
            threshold = field(entry, "threshold", int, where)
            if not -_MICRO <= threshold <= _MICRO:
                raise WireFormatError(f"{where}.threshold: {threshold} is out of ±{_MICRO}")
            thresholds.append((field(entry, "capability", str, where), threshold))
        if [c for c, _ in thresholds] != sorted({c for c, _ in thresholds}):
            raise WireFormatError(f"{what}.calibration: capabilities sorted and unique")
        dim = field(item, "dim", int, what)
        if dim <= 0:
            raise WireFormatError(f"{what}.dim: must be positive")
        models.append(
            ModelCalibration(
                _digest_hex(item, "tensor_sha256", what),
                dim,
                _digest_hex(item, "model_sha256", what),
                tuple(thresholds),
            )
        )
    return tuple(models)


def _parse_reading(plaintext: bytes, header: Header) -> Reading:
    what = "meter reading"
    obj = parse_json_object(plaintext, what)
    version = field(obj, "v", int, what)
    if version not in _VERSIONS:
        raise WireFormatError(f"{what}: unsupported version {version}")
    fields = {"v", "authority", "instruction_sha256", "formula", "as_of_seq", "meters"}
    only_fields(obj, fields | {"models"} if version >= 2 else fields, what)
    return Reading(
        version=version,
        models=_parse_models(field(obj, "models", list, what)) if version >= 2 else (),
        authority=field(obj, "authority", str, what),
        instruction_sha256=hex_decode(
            field(obj, "instruction_sha256", str, what), f"{what}.instruction_sha256", size=32
        ),
        formula=field(obj, "formula", str, what),
        as_of_seq=field(obj, "as_of_seq", int, what),
        meters=_parse_meters(field(obj, "meters", list, what)),
        header=header,
    )


def open_reading(
    envelope_bytes: bytes,
    *,
    embassy_key: Ed25519PublicKey,
    embassy_keyid: str,
    signing_key: Ed25519PrivateKey,
    authority: str,
    instruction_sha256: bytes | None = None,
) -> Reading:
    """Authority side: verify the embassy's signature, then decrypt; or raise.

    ``embassy_key`` must come from an identity document the authority verified; the
    statement's log position is checked by verifying a log segment that contains it
    (``embassy verify log``), as for every statement.
    """
    payload = verify_envelope(parse_envelope(envelope_bytes), embassy_key)
    statement = parse_statement(payload)
    if statement.predicate_type != METER_READING_V1:
        raise VerificationError(f"not a meter reading: {statement.predicate_type}")
    body = statement.body
    what = "meter-reading predicate"
    only_fields(dict(body), {"authority", "instruction_sha256", "suite", "ciphertext"}, what)
    named = field(dict(body), "authority", str, what)
    digest = hex_decode(field(dict(body), "instruction_sha256", str, what), what, size=32)
    if named != authority:
        raise KeyBindingError(f"meter reading: for authority {named!r}, not {authority!r}")
    if instruction_sha256 is not None and digest != instruction_sha256:
        raise KeyBindingError("meter reading: answers another instruction")
    if field(dict(body), "suite", str, what) != SUITE:
        raise WireFormatError(f"{what}: unsupported suite")
    ciphertext = b64decode(field(dict(body), "ciphertext", str, what), f"{what}.ciphertext")
    try:
        plaintext = _HPKE.decrypt(
            ciphertext, reply_key(signing_key), info=_info(named, embassy_keyid, digest)
        )
    except (InvalidTag, ValueError):  # a forged or truncated ciphertext
        raise KeyBindingError(
            "meter reading: does not decrypt under this authority's key"
        ) from None
    reading = _parse_reading(_unpad(plaintext), statement.header)
    if reading.authority != named or reading.instruction_sha256 != digest:
        raise KeyBindingError("meter reading: encrypted content disagrees with its statement")
    return reading
