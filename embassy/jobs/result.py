"""A job's result that only the user can read (docs/protocol.md §2b and §14).

The user's payload carries a reply key (:class:`embassy.payload.envelope.ReplyKey`). For
each job the embassy draws a fresh 32-byte *result key*, wraps it to the reply key with HPKE
(:func:`wrap_result_key`) and hands the plain key to the job, which encrypts its output
with it (:func:`workload_sdk.results.encrypt_result`; no HPKE in the container). The host
relays ciphertext only::

    wrapped key = {"v":1,"suite":"x25519"|"mlkem768-x25519","reply_keyid":"<hex32>",
                   "binding":{...},"wrapped":"<b64>"}
    wrapped     = HPKE base mode (KEM of the suite, HKDF-SHA256, AES-256-GCM) of result_key
    info        = b"embassy-job-result-v1\\0" || canonical JSON of binding

``binding`` is what the job runner binds the key to (job id, payload id, embassy keyid,
image digest); this module treats it as an opaque JSON object. ``reply_keyid`` is SHA-256
of the reply key's canonical JSON. Neither needs trusting: both only let a refusal name its
reason (another reply key, another job) before HPKE, which binds the binding through
``info`` and the reply key through its KEM.

The result bundle the user receives::

    {"v":1,"type":"embassy-job-result","job":"<hex>","wrapped_key":{...},
     "ciphertext_sha256":"<hex32>","ciphertext":"<b64>" (absent: delivered beside it),
     "statements":["<b64 DSSE envelope>",...],"log":{<log segment>}}

:func:`open_result` decrypts; it proves nothing about who made the result (anyone who knows
the reply public key can wrap a key to it): the signed statements in the bundle do, and
``embassy verify job`` checks them. Everything here is pure (bytes and frozen dataclasses).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.hpke import MLKEM768X25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    BestAvailableEncryption,
    Encoding,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from embassy.errors import (
    ConfigError,
    ResultOpenError,
    ResultTamperedError,
    ResultTruncatedError,
    ResultUnwrapError,
    ResultWrongJobError,
    ResultWrongReplyKeyError,
    WireFormatError,
)
from embassy.payload.envelope import (
    MAX_SUITE_LEN,
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    SUITES,
    HpkePrivateKey,
    ReplyKey,
    suite_for,
)
from embassy.wire.codec import (
    JsonObject,
    b64_list,
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
)
from workload_sdk.results import result_stream_id
from workload_sdk.stream import StreamError, decrypt_stream

RESULT_INFO_PREFIX = b"embassy-job-result-v1\0"
WRAPPED_KEY_VERSION = 1
BUNDLE_VERSION = 1
BUNDLE_TYPE = "embassy-job-result"
RESULT_KEY_LEN = 32
KEYID_LEN = 32
MAX_BINDING_LEN = 4096  # canonical JSON bytes
MAX_WRAPPED_LEN = 4096  # the longest a supported suite makes: 1,120 (enc) + 32 + 16 bytes
MAX_JOB_ID_LEN = 64
MAX_STATEMENTS = 64

_WRAPPED_FIELDS = {"v", "suite", "reply_keyid", "binding", "wrapped"}
_BUNDLE_FIELDS = {
    "v",
    "type",
    "job",
    "wrapped_key",
    "ciphertext_sha256",
    "ciphertext",
    "statements",
    "log",
}
_RAW = (Encoding.Raw, PublicFormat.Raw)


# ---------------------------------------------------------------------------------------
# The user's reply key pair


@dataclass(frozen=True)
class ReplyPrivateKey:
    """The user's private reply key: an X25519 key, and for the hybrid suite an ML-KEM-768
    key too. :attr:`public` is what the payload carries."""

    x25519: X25519PrivateKey
    mlkem768: MLKEM768PrivateKey | None = None

    @property
    def suite(self) -> str:
        return SUITE_X25519 if self.mlkem768 is None else SUITE_MLKEM768_X25519

    @property
    def public(self) -> ReplyKey:
        x_public = self.x25519.public_key().public_bytes(*_RAW)
        if self.mlkem768 is None:
            return ReplyKey(SUITE_X25519, x_public)
        mlkem = self.mlkem768.public_key().public_bytes_raw()
        return ReplyKey(SUITE_MLKEM768_X25519, x_public, mlkem)

    def hpke_private(self) -> HpkePrivateKey:
        """The private key as the suite's HPKE takes it."""
        if self.mlkem768 is None:
            return self.x25519
        return MLKEM768X25519PrivateKey(self.mlkem768, self.x25519)

    @classmethod
    def generate(cls, suite: str = SUITE_MLKEM768_X25519) -> ReplyPrivateKey:
        suite_for(suite)  # an unknown suite: UnsupportedSuiteError
        mlkem = MLKEM768PrivateKey.generate() if suite == SUITE_MLKEM768_X25519 else None
        return cls(X25519PrivateKey.generate(), mlkem)

    def to_pem(self, passphrase: bytes) -> bytes:
        """The private key file: encrypted PKCS#8 PEM blocks, never in the clear.

        ``x25519``: one X25519 block; ``mlkem768-x25519``: an ML-KEM-768 block, then the
        X25519 one. Each is encrypted with ``passphrase`` (the ``$EMBASSY_KEY_PASSPHRASE``
        mechanism of the other private keys).
        """
        if not passphrase:
            raise ValueError("a reply key is written only encrypted: give a passphrase")
        encryption = BestAvailableEncryption(passphrase)
        parts: list[MLKEM768PrivateKey | X25519PrivateKey] = [self.x25519]
        if self.mlkem768 is not None:
            parts.insert(0, self.mlkem768)
        return b"".join(
            p.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption) for p in parts
        )

    @classmethod
    def from_pem(
        cls, data: bytes, passphrase: bytes | None, what: str = "reply key"
    ) -> ReplyPrivateKey:
        """Load a file :meth:`to_pem` wrote. A key in the clear is refused."""
        if b"-----BEGIN PRIVATE KEY-----" in data:
            raise ConfigError(f"{what}: a private key in the clear; reply keys are kept encrypted")
        begin = b"-----BEGIN ENCRYPTED PRIVATE KEY-----"
        end = b"-----END ENCRYPTED PRIVATE KEY-----"
        blocks = [b[b.index(begin) :] + end for b in data.split(end) if begin in b]
        if not blocks:
            raise WireFormatError(f"{what}: not an encrypted PKCS#8 PEM private key file")
        if not passphrase:
            raise ConfigError(f"{what}: the key is encrypted: give its passphrase")
        keys = []
        for block in blocks:
            try:
                keys.append(load_pem_private_key(block, passphrase))
            except ValueError:
                raise ConfigError(f"{what}: wrong passphrase, or a damaged key") from None
            except (TypeError, UnsupportedAlgorithm) as exc:
                raise WireFormatError(f"{what}: {exc}") from None
        match keys:
            case [X25519PrivateKey() as x25519]:
                return cls(x25519)
            case [MLKEM768PrivateKey() as mlkem, X25519PrivateKey() as x25519]:
                return cls(x25519, mlkem)
        raise WireFormatError(
            f"{what}: holds {[type(k).__name__ for k in keys]}; a reply key file is one X25519 "
            "key, or an ML-KEM-768 key then an X25519 key"
        )


# ---------------------------------------------------------------------------------------
# The result key


def _binding_bytes(binding: Mapping[str, Any], what: str = "binding") -> bytes:
    """The canonical JSON of ``binding``: a JSON object of at most MAX_BINDING_LEN bytes."""
    if not isinstance(binding, Mapping) or not all(isinstance(k, str) for k in binding):
        raise WireFormatError(f"{what}: expected a JSON object")
    try:
        data = canonical_json(binding)
    except (TypeError, ValueError) as exc:
        raise WireFormatError(f"{what}: not canonical JSON: {exc}") from None
    if len(data) > MAX_BINDING_LEN:
        raise WireFormatError(f"{what}: {len(data)} bytes (at most {MAX_BINDING_LEN})")
    return data


def result_info(binding: Mapping[str, Any]) -> bytes:
    """The HPKE ``info`` of a result key: the prefix and the binding's canonical JSON."""
    return RESULT_INFO_PREFIX + _binding_bytes(binding)


@dataclass(frozen=True)
class WrappedResultKey:
    """A result key, HPKE-wrapped to a reply key under a binding."""

    suite: str
    reply_keyid: str
    binding: JsonObject
    wrapped: bytes

    def to_json(self) -> JsonObject:
        return {
            "v": WRAPPED_KEY_VERSION,
            "suite": self.suite,
            "reply_keyid": self.reply_keyid,
            "binding": self.binding,
            "wrapped": b64encode(self.wrapped),
        }

    @classmethod
    def from_json(cls, obj: object, what: str = "wrapped result key") -> WrappedResultKey:
        """Strictly parse an already-decoded JSON value."""
        if not isinstance(obj, dict):
            raise WireFormatError(f"{what}: expected a JSON object")
        version = field(obj, "v", int, what)
        if version != WRAPPED_KEY_VERSION:
            raise WireFormatError(f"{what}: unsupported version {version}")
        only_fields(obj, _WRAPPED_FIELDS, what)
        suite = field(obj, "suite", str, what)
        if suite not in SUITES:
            raise WireFormatError(
                f"{what}.suite: unsupported HPKE suite {suite[:MAX_SUITE_LEN]!r}; supported: "
                f"{', '.join(sorted(SUITES))}"
            )
        keyid = field(obj, "reply_keyid", str, what)
        hex_decode(keyid, f"{what}.reply_keyid", size=KEYID_LEN)
        binding = field(obj, "binding", dict, what)
        _binding_bytes(binding, f"{what}.binding")
        wrapped = b64decode(field(obj, "wrapped", str, what), f"{what}.wrapped")
        if not 0 < len(wrapped) <= MAX_WRAPPED_LEN:
            raise WireFormatError(f"{what}.wrapped: {len(wrapped)} bytes is out of range")
        return cls(suite, keyid, binding, wrapped)

    @classmethod
    def parse(cls, data: bytes) -> WrappedResultKey:
        return cls.from_json(parse_json_object(data, "wrapped result key"))


def _reply_key(value: ReplyKey | Mapping[str, Any]) -> ReplyKey:
    return value if isinstance(value, ReplyKey) else ReplyKey.from_json(dict(value))


def wrap_result_key(
    reply_key_json: ReplyKey | Mapping[str, Any], binding: Mapping[str, Any]
) -> tuple[bytes, JsonObject]:
    """A fresh 32-byte result key, and its wrapping to the reply key under ``binding``.

    Returns (result_key, wrapped key JSON). The job gets the key; the user the JSON.
    """
    reply = _reply_key(reply_key_json)
    bound = _binding_bytes(binding)
    result_key = os.urandom(RESULT_KEY_LEN)
    wrapped = suite_for(reply.suite).encrypt(
        result_key, reply.public_key(), info=RESULT_INFO_PREFIX + bound
    )
    # The binding as the user will read it back: exactly the JSON the info was made of.
    binding_json = parse_json_object(bound, "binding")
    return result_key, WrappedResultKey(reply.suite, reply.keyid(), binding_json, wrapped).to_json()


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _binding_difference(got: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """Name the first field in which two bindings differ."""
    for key in sorted(set(got) | set(expected)):
        if key not in got:
            return f"binding has no {key!r}, expected {_short(expected[key])}"
        if key not in expected:
            return f"binding.{key} is {_short(got[key])}, which the expected binding lacks"
        if canonical_json({"v": got[key]}) != canonical_json({"v": expected[key]}):
            return f"binding.{key} is {_short(got[key])}, expected {_short(expected[key])}"
    return "binding differs"  # pragma: no cover (equal canonical bytes compare equal)


def open_result_key(
    wrapped_json: WrappedResultKey | Mapping[str, Any],
    binding: Mapping[str, Any],
    reply_private_key: ReplyPrivateKey,
) -> bytes:
    """Unwrap the result key, or raise, checking in this order:

    the reply key it names (:class:`ResultWrongReplyKeyError`), its binding against
    ``binding`` (:class:`ResultWrongJobError`, naming the field that differs), then HPKE
    (:class:`ResultUnwrapError`). The first two read fields HPKE has not authenticated yet:
    a forged one can only turn a refusal into another refusal (both are bound by HPKE).
    """
    wrapped = (
        wrapped_json
        if isinstance(wrapped_json, WrappedResultKey)
        else WrappedResultKey.from_json(dict(wrapped_json))
    )
    expected_info = result_info(binding)
    own = reply_private_key.public
    if not hmac.compare_digest(wrapped.reply_keyid, own.keyid()) or wrapped.suite != own.suite:
        raise ResultWrongReplyKeyError(
            f"wrapped_key.reply_keyid is {wrapped.reply_keyid} ({wrapped.suite}), this reply "
            f"key is {own.keyid()} ({own.suite}): the result was encrypted for another user's "
            "reply key"
        )
    if not hmac.compare_digest(RESULT_INFO_PREFIX + _binding_bytes(wrapped.binding), expected_info):
        raise ResultWrongJobError(
            "the result key is bound to another job: "
            + _binding_difference(wrapped.binding, binding)
        )
    try:
        key = suite_for(wrapped.suite).decrypt(
            wrapped.wrapped, reply_private_key.hpke_private(), info=expected_info
        )
    except (InvalidTag, ValueError):
        raise ResultUnwrapError(
            "wrapped_key does not unwrap with this reply key under this binding: its wrapped "
            "bytes, reply_keyid or binding was changed"
        ) from None
    if len(key) != RESULT_KEY_LEN:
        raise ResultUnwrapError(f"wrapped_key unwraps to {len(key)} bytes, not {RESULT_KEY_LEN}")
    return key


# ---------------------------------------------------------------------------------------
# The result bundle


@dataclass(frozen=True)
class JobResultBundle:
    """What the user receives for a job (the statements and log are the job runner's)."""

    job: str
    wrapped_key: WrappedResultKey
    ciphertext_sha256: bytes
    ciphertext: bytes | None
    statements: tuple[bytes, ...]
    log: JsonObject

    def to_json(self) -> JsonObject:
        out: JsonObject = {
            "v": BUNDLE_VERSION,
            "type": BUNDLE_TYPE,
            "job": self.job,
            "wrapped_key": self.wrapped_key.to_json(),
            "ciphertext_sha256": self.ciphertext_sha256.hex(),
            "statements": [b64encode(s) for s in self.statements],
            "log": self.log,
        }
        if self.ciphertext is not None:
            out["ciphertext"] = b64encode(self.ciphertext)
        return out

    def to_bytes(self) -> bytes:
        return canonical_json(self.to_json())

    @classmethod
    def from_json(cls, obj: object, what: str = "job result") -> JobResultBundle:
        if not isinstance(obj, dict):
            raise WireFormatError(f"{what}: expected a JSON object")
        version = field(obj, "v", int, what)
        if version != BUNDLE_VERSION:
            raise WireFormatError(f"{what}: unsupported version {version}")
        kind = field(obj, "type", str, what)
        if kind != BUNDLE_TYPE:
            raise WireFormatError(f"{what}.type: {kind[:64]!r}, expected {BUNDLE_TYPE!r}")
        only_fields(obj, _BUNDLE_FIELDS, what)
        job = field(obj, "job", str, what)
        if not 0 < len(hex_decode(job, f"{what}.job")) <= MAX_JOB_ID_LEN:
            raise WireFormatError(f"{what}.job: 1 to {MAX_JOB_ID_LEN} bytes of hex")
        wrapped = WrappedResultKey.from_json(
            field(obj, "wrapped_key", dict, what), f"{what}.wrapped_key"
        )
        digest = hex_decode(
            field(obj, "ciphertext_sha256", str, what), f"{what}.ciphertext_sha256", size=32
        )
        ciphertext = None  # absent, never null
        if "ciphertext" in obj:
            ciphertext = b64decode(obj["ciphertext"], f"{what}.ciphertext")
        statements = b64_list(
            field(obj, "statements", list, what), f"{what}.statements", most=MAX_STATEMENTS
        )
        log = field(obj, "log", dict, what)
        return cls(job, wrapped, digest, ciphertext, tuple(statements), log)

    @classmethod
    def parse(cls, data: bytes) -> JobResultBundle:
        return cls.from_json(parse_json_object(data, "job result"))


def make_result_bundle(
    *,
    job: str,
    wrapped_key: WrappedResultKey | Mapping[str, Any],
    ciphertext_sha256: bytes,
    statements: list[bytes] | tuple[bytes, ...],
    log: Mapping[str, Any],
    ciphertext: bytes | None = None,
) -> JobResultBundle:
    """A bundle, checked as the user's side will parse it. With ``ciphertext`` inline its
    digest must be ``ciphertext_sha256``; without, it is delivered beside the bundle."""
    if ciphertext is not None and hashlib.sha256(ciphertext).digest() != ciphertext_sha256:
        raise ValueError("ciphertext_sha256 is not SHA-256 of the ciphertext")
    wrapped = (
        wrapped_key.to_json() if isinstance(wrapped_key, WrappedResultKey) else dict(wrapped_key)
    )
    obj: JsonObject = {
        "v": BUNDLE_VERSION,
        "type": BUNDLE_TYPE,
        "job": job,
        "wrapped_key": wrapped,
        "ciphertext_sha256": bytes(ciphertext_sha256).hex(),
        "statements": [b64encode(bytes(s)) for s in statements],
        "log": dict(log),
    }
    if ciphertext is not None:
        obj["ciphertext"] = b64encode(ciphertext)
    return JobResultBundle.from_json(obj)


def _bundle(value: JobResultBundle | bytes | Mapping[str, Any]) -> JobResultBundle:
    if isinstance(value, JobResultBundle):
        return value
    if isinstance(value, bytes | bytearray):
        return JobResultBundle.parse(bytes(value))
    return JobResultBundle.from_json(dict(value))


def _stream_error(exc: StreamError) -> ResultOpenError:
    if exc.reason == "wrong-payload":
        return ResultWrongJobError(
            "the ciphertext was encrypted under another result key (another job's result): "
            + exc.message
        )
    if exc.reason == "truncated":
        return ResultTruncatedError(f"the ciphertext is cut short: {exc.message}")
    return ResultTamperedError(f"the ciphertext does not authenticate: {exc.message}")


def _digest_of(src: BinaryIO) -> bytes:
    h = hashlib.sha256()
    while chunk := src.read(1 << 20):
        h.update(chunk)
    return h.digest()


def open_result_to(
    bundle: JobResultBundle | bytes | Mapping[str, Any],
    reply_private_key: ReplyPrivateKey,
    binding: Mapping[str, Any],
    dst: BinaryIO,
    *,
    ciphertext: BinaryIO | None = None,
) -> int:
    """Decrypt the result into ``dst``; return the plaintext bytes written. O(chunk) memory.

    ``ciphertext`` (seekable: it is read twice) is needed when the bundle carries none. The
    order: the result key unwraps (:func:`open_result_key`), the ciphertext's SHA-256 is the
    bundle's (:class:`ResultTamperedError`), then the stream: another job's
    (:class:`ResultWrongJobError`), cut short (:class:`ResultTruncatedError`) or a chunk
    that does not authenticate (:class:`ResultTamperedError`). On an error ``dst`` may hold
    authenticated chunks of an incomplete result: discard it.
    """
    parsed = _bundle(bundle)
    key = open_result_key(parsed.wrapped_key, binding, reply_private_key)
    if ciphertext is None:
        if parsed.ciphertext is None:
            raise ResultOpenError("the bundle carries no ciphertext: give the one beside it")
        ciphertext = io.BytesIO(parsed.ciphertext)
    start = ciphertext.tell()
    digest = _digest_of(ciphertext)
    if not hmac.compare_digest(digest, parsed.ciphertext_sha256):
        raise ResultTamperedError(
            f"the ciphertext's SHA-256 is {digest.hex()}, the bundle's ciphertext_sha256 is "
            f"{parsed.ciphertext_sha256.hex()}: changed in transit, or another result"
        )
    ciphertext.seek(start)
    written = 0
    try:
        for chunk in decrypt_stream(key, ciphertext, expected_payload_id=result_stream_id(key)):
            dst.write(chunk)
            written += len(chunk)
    except StreamError as exc:
        raise _stream_error(exc) from None
    return written


def open_result(
    bundle: JobResultBundle | bytes | Mapping[str, Any],
    reply_private_key: ReplyPrivateKey,
    binding: Mapping[str, Any],
    *,
    ciphertext: bytes | None = None,
) -> bytes:
    """:func:`open_result_to` in memory: the whole plaintext, only once all of it
    authenticated."""
    out = io.BytesIO()
    open_result_to(
        bundle,
        reply_private_key,
        binding,
        out,
        ciphertext=None if ciphertext is None else io.BytesIO(ciphertext),
    )
    return out.getvalue()
