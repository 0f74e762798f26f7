"""in-toto Statement v1 with the embassy's predicates.

Every statement the embassy signs is an in-toto Statement whose predicate carries a common
``header``: where the statement sits in the log, the TPM's clock, and the embassy's TPM mode.
Binding the log position into the signed bytes means a statement moved elsewhere in the log
no longer matches its entry, so reordering is caught even before any PCR replay.

Predicate types are versioned URNs; a new shape of predicate gets a new version.

The in-toto Statement v1 rules hold for every statement made and are enforced on every one
read: at least one subject; each subject a non-empty ``name`` and a ``digest`` that is
exactly ``{"sha256": <64 lower-case hex>}`` (the embassy's subset of the in-toto DigestSet);
subject names unique within the statement. A statement whose subject is no artifact of its
own (a lifecycle event, a summary of rejected files) is about the embassy, named by its
signing key as in the identity statement (:data:`EMBASSY_SUBJECT_NAME`). The payload must be
the canonical encoding of what it says (see :func:`parse_statement`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embassy.attest.types import ClockInfo, TpmMode
from embassy.errors import WireFormatError
from embassy.wire.codec import (
    JsonObject,
    canonical_json,
    dumps_text,
    field,
    hex_decode,
    json_string,
    only_fields,
    parse_json_object,
    reject_floats,
    require_canonical,
)

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_PREFIX = "urn:embassy:predicate:"
# The subject of a statement about the embassy itself: SHA-256 of its raw Ed25519 public
# signing key, the same subject the identity statement has.
EMBASSY_SUBJECT_NAME = "embassy-signing-key"

IDENTITY_V1 = PREDICATE_PREFIX + "identity:v1"
LIFECYCLE_V1 = PREDICATE_PREFIX + "lifecycle:v1"
SEAL_V1 = PREDICATE_PREFIX + "seal:v1"
UNSEAL_V1 = PREDICATE_PREFIX + "unseal:v1"
SESSION_ABORT_V1 = PREDICATE_PREFIX + "session-abort:v1"
# v2 (the link gate): the workload is identified without a netns holder, the seal names
# its gate, link and layer-3 rules, and the gate's outcome is stated on unseal and abort.
SEAL_V2 = PREDICATE_PREFIX + "seal:v2"
UNSEAL_V2 = PREDICATE_PREFIX + "unseal:v2"
SESSION_ABORT_V2 = PREDICATE_PREFIX + "session-abort:v2"
METER_READING_V1 = PREDICATE_PREFIX + "meter-reading:v1"
METER_UPDATE_V1 = PREDICATE_PREFIX + "meter-update:v1"
SIGNATURE_WRITE_V1 = PREDICATE_PREFIX + "signature-write:v1"
INSTRUCTION_REFUSED_V1 = PREDICATE_PREFIX + "instruction-refused:v1"
ACTIVATION_REJECTED_V1 = PREDICATE_PREFIX + "activation-rejected:v1"
# v2 (no workload-chosen bytes): names of tensors and files, and parsers' messages, are
# replaced by SHA-256 digests, lengths and codes; rejections are coalesced per session.
METER_UPDATE_V2 = PREDICATE_PREFIX + "meter-update:v2"
SIGNATURE_WRITE_V2 = PREDICATE_PREFIX + "signature-write:v2"
INSTRUCTION_REFUSED_V2 = PREDICATE_PREFIX + "instruction-refused:v2"
ACTIVATION_REJECTED_V2 = PREDICATE_PREFIX + "activation-rejected:v2"
# Group commit: the activation files handled together, their signature writes and meter
# updates (formula and model digests, never values), in one statement and one registry
# transaction; it replaces one signature-write/meter-update statement per file.
METER_BATCH_V1 = PREDICATE_PREFIX + "meter-batch:v1"
# The weights-key release (embassy side): a broker's release opened for the launched
# workload, or a broker's denial relayed by it.
WEIGHTS_KEY_RELEASED_V1 = PREDICATE_PREFIX + "weights-key-released:v1"
WEIGHTS_KEY_DENIED_V1 = PREDICATE_PREFIX + "weights-key-denied:v1"
# Jobs (docs/adr/0014-jobs.md): a job's container, sealed from birth, got its input key;
# then it was destroyed (checked gone) with its result committed, or aborted with a reason.
JOB_STARTED_V1 = PREDICATE_PREFIX + "job-started:v1"
JOB_DESTROYED_V1 = PREDICATE_PREFIX + "job-destroyed:v1"
JOB_ABORTED_V1 = PREDICATE_PREFIX + "job-aborted:v1"

KNOWN_PREDICATES = frozenset(
    {
        IDENTITY_V1,
        LIFECYCLE_V1,
        SEAL_V1,
        UNSEAL_V1,
        SESSION_ABORT_V1,
        SEAL_V2,
        UNSEAL_V2,
        SESSION_ABORT_V2,
        METER_READING_V1,
        METER_UPDATE_V1,
        SIGNATURE_WRITE_V1,
        INSTRUCTION_REFUSED_V1,
        ACTIVATION_REJECTED_V1,
        METER_UPDATE_V2,
        SIGNATURE_WRITE_V2,
        INSTRUCTION_REFUSED_V2,
        ACTIVATION_REJECTED_V2,
        METER_BATCH_V1,
        WEIGHTS_KEY_RELEASED_V1,
        WEIGHTS_KEY_DENIED_V1,
        JOB_STARTED_V1,
        JOB_DESTROYED_V1,
        JOB_ABORTED_V1,
    }
)


@dataclass(frozen=True, slots=True)
class Subject:
    name: str
    sha256: bytes

    def to_json(self) -> JsonObject:
        return {"name": self.name, "digest": {"sha256": self.sha256.hex()}}


def embassy_subject(raw_signing_key: bytes) -> Subject:
    """The subject of a statement about the embassy itself (its raw Ed25519 public key)."""
    return Subject(EMBASSY_SUBJECT_NAME, hashlib.sha256(raw_signing_key).digest())


@dataclass(frozen=True, slots=True)
class Header:
    """What every embassy predicate carries, signed with it."""

    seq: int
    prev: bytes
    clock: ClockInfo
    tpm_mode: TpmMode

    def to_json(self) -> JsonObject:
        return {
            "log": {"seq": self.seq, "prev": self.prev.hex()},
            "tpm_clock": self.clock.to_json(),
            "tpm_mode": self.tpm_mode.value,
        }


@dataclass(frozen=True, slots=True)
class Statement:
    predicate_type: str
    subjects: tuple[Subject, ...]
    header: Header
    body: Mapping[str, Any]

    def encode(self) -> bytes:
        """The canonical payload bytes, which are what gets signed."""
        if "header" in self.body:
            raise ValueError("predicate body must not define 'header'")
        if not self.subjects:
            raise ValueError("an in-toto v1 statement needs at least one subject")
        names = [s.name for s in self.subjects]
        if "" in names or len(set(names)) != len(names):
            raise ValueError(f"subject names must be non-empty and unique: {names}")
        fast = self._encode_direct()
        if fast is not None:
            return fast
        predicate = {"header": self.header.to_json(), **self.body}
        return canonical_json(
            {
                "_type": STATEMENT_TYPE,
                "subject": [s.to_json() for s in self.subjects],
                "predicateType": self.predicate_type,
                "predicate": predicate,
            }
        )

    def _encode_direct(self) -> bytes | None:
        """The same canonical bytes, built from parts: the header and subjects (made by the
        embassy, of plain types checked here) are written directly, and so are the body's
        plain leaves; the body's other values (the caller's) go through the float check and
        the canonical encoder; ``"header"`` is placed where it sorts. None unless every part
        is of exactly the expected type (then :meth:`encode` takes the general encoder,
        which gives the same bytes or refuses)."""
        header = _header_text(self.header)
        subjects = [_subject_text(s) for s in self.subjects]
        body = self.body
        if (
            header is None
            or None in subjects
            or type(self.predicate_type) is not str
            or not all(type(k) is str for k in body)
        ):
            return None
        predicate: list[str] = []
        placed = False
        for key in sorted(body):
            if not placed and key > "header":
                predicate.append('"header":' + header)
                placed = True
            predicate.append(json_string(key) + ":" + _value_text(body[key]))
        if not placed:
            predicate.append('"header":' + header)
        return "".join(
            (
                '{"_type":',
                json_string(STATEMENT_TYPE),
                ',"predicate":{',
                ",".join(predicate),
                '},"predicateType":',
                json_string(self.predicate_type),
                ',"subject":[',
                ",".join(subjects),  # type: ignore[arg-type]
                "]}",
            )
        ).encode("utf-8")


def _value_text(value: object) -> str:
    """One body value's canonical text: the plain leaves written directly, anything else
    checked for floats and given to the canonical encoder."""
    kind = type(value)
    if kind is str:
        return json_string(value)  # type: ignore[arg-type]
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    reject_floats(value)
    return dumps_text(value)


def _header_text(header: Header) -> str | None:
    clock = header.clock
    if not (
        type(header.seq) is int
        and type(clock.clock) is int
        and type(clock.reset_count) is int
        and type(clock.restart_count) is int
        and type(clock.safe) is bool
        and isinstance(header.tpm_mode, TpmMode)
    ):
        return None
    return (
        f'{{"log":{{"prev":"{header.prev.hex()}","seq":{header.seq}}},'
        f'"tpm_clock":{{"clock":{clock.clock},"reset_count":{clock.reset_count},'
        f'"restart_count":{clock.restart_count},"safe":{"true" if clock.safe else "false"}}},'
        f'"tpm_mode":{json_string(header.tpm_mode.value)}}}'
    )


def _subject_text(subject: Subject) -> str | None:
    if type(subject.name) is not str:
        return None
    return f'{{"digest":{{"sha256":"{subject.sha256.hex()}"}},"name":{json_string(subject.name)}}}'


def _parse_clock(obj: object, what: str) -> ClockInfo:
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"clock", "reset_count", "restart_count", "safe"}, what)
    clock = ClockInfo(
        clock=field(obj, "clock", int, what),
        reset_count=field(obj, "reset_count", int, what),
        restart_count=field(obj, "restart_count", int, what),
        safe=field(obj, "safe", bool, what),
    )
    if min(clock.clock, clock.reset_count, clock.restart_count) < 0:
        raise WireFormatError(f"{what}: negative counter")
    return clock


def _parse_header(obj: object) -> Header:
    what = "statement.predicate.header"
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"log", "tpm_clock", "tpm_mode"}, what)
    log = field(obj, "log", dict, what)
    only_fields(log, {"seq", "prev"}, f"{what}.log")
    seq = field(log, "seq", int, f"{what}.log")
    if seq < 0:
        raise WireFormatError(f"{what}.log.seq: negative")
    mode = field(obj, "tpm_mode", str, what)
    try:
        tpm_mode = TpmMode(mode)
    except ValueError:
        raise WireFormatError(f"{what}.tpm_mode: unknown mode {mode!r}") from None
    return Header(
        seq=seq,
        prev=hex_decode(field(log, "prev", str, f"{what}.log"), f"{what}.log.prev", size=32),
        clock=_parse_clock(obj.get("tpm_clock"), f"{what}.tpm_clock"),
        tpm_mode=tpm_mode,
    )


def _parse_subject(obj: object, i: int) -> Subject:
    what = f"statement.subject[{i}]"
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"name", "digest"}, what)
    digest = field(obj, "digest", dict, what)
    only_fields(digest, {"sha256"}, f"{what}.digest")
    name = field(obj, "name", str, what)
    if not name:
        raise WireFormatError(f"{what}.name: empty")
    return Subject(
        name=name,
        sha256=hex_decode(
            field(digest, "sha256", str, f"{what}.digest"), f"{what}.digest.sha256", size=32
        ),
    )


def _parse_subjects(items: list[object]) -> tuple[Subject, ...]:
    if not items:
        raise WireFormatError("statement.subject: empty (in-toto v1 needs at least one subject)")
    subjects = tuple(_parse_subject(s, i) for i, s in enumerate(items))
    seen: dict[str, int] = {}
    for i, subject in enumerate(subjects):
        first = seen.get(subject.name)
        if first is not None:
            raise WireFormatError(
                f"statement.subject[{i}].name: {subject.name!r} is also subject[{first}]'s "
                "(names must be unique)"
            )
        seen[subject.name] = i
    return subjects


def parse_statement(payload: bytes) -> Statement:
    """Strictly parse a statement payload (the exact bytes a DSSE envelope carried).

    The payload must be the canonical encoding of what it says: the embassy signs exactly
    ``canonical_json`` of the statement, and a signed payload in any other encoding (spaces,
    another key order, escaped characters) is refused after its fields are checked, so that
    every statement has one byte form, one digest, and one log entry.
    """
    obj = parse_json_object(payload, "statement", integers_only=True)
    only_fields(obj, {"_type", "subject", "predicateType", "predicate"}, "statement")
    if field(obj, "_type", str, "statement") != STATEMENT_TYPE:
        raise WireFormatError(f"statement._type: expected {STATEMENT_TYPE!r}")
    predicate_type = field(obj, "predicateType", str, "statement")
    if predicate_type not in KNOWN_PREDICATES:
        raise WireFormatError(f"statement.predicateType: unknown {predicate_type!r}")
    subjects = _parse_subjects(field(obj, "subject", list, "statement"))
    predicate = dict(field(obj, "predicate", dict, "statement"))
    header = _parse_header(predicate.pop("header", None))
    require_canonical(payload, obj, "statement", parsed_integers_only=True)
    return Statement(predicate_type, subjects, header, predicate)


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
