"""The key broker's decision log: one signed, hash-chained entry per decision
(docs/protocol.md, "Broker decision log").

Each entry is the canonical JSON object::

    {"v": 1, "seq": N, "prev": "<hex SHA-256 of entry N-1's bytes, or 64 zeros for N = 1>",
     "decision": {...}}

signed by the broker with Ed25519 over ``SIGNATURE_PREFIX + entry``. The chain makes the log
append-only to anyone holding the broker's public key: an entry removed leaves a gap, one
changed no longer matches its signature or the next entry's ``prev``, and two entries for one
``seq`` (a fork: two replicas, or a rewritten history) are both signed, which is the proof.

Pure: no clock, no I/O. The stores (:mod:`embassy.broker.store`, ``store_pg``) call
:func:`next_entry` inside their transaction; auditors call :func:`verify_decision_log`.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.errors import DecisionLogError, WireFormatError
from embassy.wire.codec import (
    JsonObject,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
    require_canonical,
)

VERSION = 1
SIGNATURE_PREFIX = b"embassy-broker-decision-v1\0"
DIGEST_LEN = 32
GENESIS_PREV = bytes(DIGEST_LEN)
SIGNATURE_LEN = 64
FIRST_SEQ = 1
MAX_ENTRY_BYTES = 16 * 1024
MAX_TEXT_LEN = 256

DECISION_FIELDS = frozenset(
    {
        "decision_id",
        "time_unix",
        "decision",
        "reason",
        "model_id",
        "key_id",
        "tenant",
        "operation",
        "request_sha256",
        "embassy_keyid",
        "policy_sha256",
        "input_sha256",
    }
)
# What a denied request named: logged as received (bounded, printable), or null when the
# request did not get as far as naming it.
_TEXT_FIELDS = ("model_id", "key_id", "tenant", "operation")
_DIGEST_FIELDS = ("embassy_keyid", "policy_sha256", "input_sha256")
_DECISION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_REASON = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*")


@dataclass(frozen=True, slots=True)
class LoggedDecision:
    """One stored entry: ``entry`` is the canonical bytes, ``signature`` the broker's over
    ``SIGNATURE_PREFIX + entry``, ``digest`` SHA-256 of ``entry`` (as the store holds it: the
    verifier recomputes it)."""

    seq: int
    entry: bytes
    signature: bytes
    digest: bytes


@dataclass(frozen=True, slots=True)
class DecisionEntry:
    """A parsed entry."""

    seq: int
    prev: bytes
    decision: JsonObject


def entry_digest(entry: bytes) -> bytes:
    return hashlib.sha256(entry).digest()


def signed_bytes(entry: bytes) -> bytes:
    """What the broker signs for ``entry``."""
    return SIGNATURE_PREFIX + entry


def check_decision(obj: object, what: str = "decision") -> JsonObject:
    """Refuse a decision object that is not exactly the documented shape; return it."""
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, set(DECISION_FIELDS), what)
    missing = sorted(DECISION_FIELDS - set(obj))
    if missing:
        raise WireFormatError(f"{what}: missing field {missing[0]!r}")
    decision_id = field(obj, "decision_id", str, what)
    if not _DECISION_ID.fullmatch(decision_id):
        raise WireFormatError(f"{what}.decision_id: expected 1-128 of [A-Za-z0-9._:/@+-]")
    if field(obj, "time_unix", int, what) < 0:
        raise WireFormatError(f"{what}.time_unix: must not be negative")
    verdict = field(obj, "decision", str, what)
    if verdict not in ("allow", "deny"):
        raise WireFormatError(f"{what}.decision: expected 'allow' or 'deny', not {verdict!r}")
    reason = obj["reason"]
    if verdict == "deny":
        if not isinstance(reason, str) or not _REASON.fullmatch(reason):
            raise WireFormatError(f"{what}.reason: a denial needs a kebab-case reason code")
    elif reason is not None:
        raise WireFormatError(f"{what}.reason: must be null for an allow")
    for name in _TEXT_FIELDS:
        _check_text(obj[name], f"{what}.{name}", nullable=verdict == "deny")
    hex_decode(field(obj, "request_sha256", str, what), f"{what}.request_sha256", size=32)
    for name in _DIGEST_FIELDS:
        _check_digest(obj[name], f"{what}.{name}", nullable=verdict == "deny")
    return obj


def _check_text(value: object, what: str, *, nullable: bool) -> None:
    if value is None:
        if not nullable:
            raise WireFormatError(f"{what}: an allow names it")
        return
    if not isinstance(value, str) or not value or len(value) > MAX_TEXT_LEN:
        raise WireFormatError(f"{what}: expected 1-{MAX_TEXT_LEN} characters or null")
    if not _PRINTABLE.fullmatch(value):
        raise WireFormatError(f"{what}: control characters are not allowed")


def _check_digest(value: object, what: str, *, nullable: bool) -> None:
    if value is None:
        if not nullable:
            raise WireFormatError(f"{what}: an allow names it")
        return
    hex_decode(value, what, size=32)


def encode_entry(seq: int, prev: bytes, decision: Mapping[str, Any]) -> bytes:
    """The canonical bytes of entry ``seq`` chained to ``prev``."""
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < FIRST_SEQ:
        raise WireFormatError(f"seq: expected an integer >= {FIRST_SEQ}")
    if len(prev) != DIGEST_LEN:
        raise WireFormatError(f"prev: expected {DIGEST_LEN} bytes")
    checked = check_decision(dict(decision))
    entry = canonical_json({"v": VERSION, "seq": seq, "prev": prev.hex(), "decision": checked})
    if len(entry) > MAX_ENTRY_BYTES:
        raise WireFormatError(f"entry: {len(entry)} bytes (at most {MAX_ENTRY_BYTES})")
    return entry


def parse_entry(entry: bytes) -> DecisionEntry:
    """Strictly parse an entry's bytes: canonical, version 1, every field checked."""
    what = "decision log entry"
    if len(entry) > MAX_ENTRY_BYTES:
        raise WireFormatError(f"{what}: {len(entry)} bytes (at most {MAX_ENTRY_BYTES})")
    obj = parse_json_object(entry, what, integers_only=True)
    only_fields(obj, {"v", "seq", "prev", "decision"}, what)
    version = field(obj, "v", int, what)
    if version != VERSION:
        raise WireFormatError(f"{what}.v: version {version} is not {VERSION}")
    seq = field(obj, "seq", int, what)
    if seq < FIRST_SEQ:
        raise WireFormatError(f"{what}.seq: expected >= {FIRST_SEQ}, got {seq}")
    prev = hex_decode(field(obj, "prev", str, what), f"{what}.prev", size=DIGEST_LEN)
    decision = check_decision(field(obj, "decision", dict, what), f"{what}.decision")
    require_canonical(entry, obj, what, parsed_integers_only=True)
    return DecisionEntry(seq=seq, prev=prev, decision=decision)


def next_entry(
    head: LoggedDecision | None,
    decision: Mapping[str, Any],
    sign: Callable[[bytes], bytes],
) -> LoggedDecision:
    """The entry that follows ``head`` (None: the log is empty), signed with ``sign``.

    ``prev`` is recomputed from the head's bytes, never taken from a stored digest.
    """
    seq = FIRST_SEQ if head is None else head.seq + 1
    prev = GENESIS_PREV if head is None else entry_digest(head.entry)
    entry = encode_entry(seq, prev, decision)
    signature = sign(signed_bytes(entry))
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_LEN:
        raise WireFormatError(f"signature: expected {SIGNATURE_LEN} bytes from the signer")
    return LoggedDecision(seq=seq, entry=entry, signature=signature, digest=entry_digest(entry))


def _check_one(item: LoggedDecision, public: Ed25519PublicKey) -> DecisionEntry:
    seq = item.seq
    if not hmac.compare_digest(item.digest, entry_digest(item.entry)):
        raise DecisionLogError(
            f"entry seq {seq}: digest: the stored digest is not SHA-256 of the entry (changed)",
            "changed",
        )
    try:
        public.verify(item.signature, signed_bytes(item.entry))
    except InvalidSignature:
        raise DecisionLogError(
            f"entry seq {seq}: signature: does not verify with the broker's key (the entry "
            "was changed, or another key signed it)",
            "signature",
        ) from None
    try:
        parsed = parse_entry(item.entry)
    except WireFormatError as exc:
        raise DecisionLogError(f"entry seq {seq}: {exc.message}", "malformed") from None
    if parsed.seq != seq:
        raise DecisionLogError(
            f"entry seq {seq}: seq: the signed entry says {parsed.seq} (moved)", "changed"
        )
    return parsed


def verify_decision_log(
    entries: Sequence[LoggedDecision],
    broker_public: Ed25519PublicKey,
    *,
    after: LoggedDecision | None = None,
) -> None:
    """Check that ``entries`` are consecutive, signed, chained entries of one log.

    Without ``after`` they must start at seq 1; with it (the last entry an earlier run
    verified) they must continue from it. Each way a log can fail is its own ``reason`` on
    the :class:`DecisionLogError`: ``duplicate`` and ``fork`` (one seq twice, with the same or
    different bytes), ``reorder``, ``gap``, ``changed`` (the bytes disagree with their digest
    or seq), ``signature``, ``malformed``, ``chain`` (``prev`` is not the digest of the entry
    before: a fork or a replaced entry).
    """
    chain = ([after] if after is not None else []) + list(entries)
    seen: dict[int, bytes] = {}
    for item in chain:
        if item.seq in seen:
            if hmac.compare_digest(seen[item.seq], item.entry):
                raise DecisionLogError(f"entry seq {item.seq} appears twice", "duplicate")
            raise DecisionLogError(f"entry seq {item.seq}: two different entries (a fork)", "fork")
        seen[item.seq] = item.entry
    for before, item in itertools.pairwise(chain):
        if item.seq < before.seq:
            raise DecisionLogError(
                f"entry seq {item.seq} comes after seq {before.seq} (reordered)", "reorder"
            )
    expected = FIRST_SEQ if after is None else after.seq
    prev = GENESIS_PREV
    for index, item in enumerate(chain):
        if item.seq != expected:
            raise DecisionLogError(
                f"entry seq {item.seq} where seq {expected} was expected (a gap: "
                f"{item.seq - expected} missing)",
                "gap",
            )
        parsed = _check_one(item, broker_public)
        if (index > 0 or after is None) and not hmac.compare_digest(parsed.prev, prev):
            raise DecisionLogError(
                f"entry seq {item.seq}: prev: not the digest of entry seq {item.seq - 1} "
                "(a fork or a replaced entry)",
                "chain",
            )
        prev = entry_digest(item.entry)
        expected += 1
