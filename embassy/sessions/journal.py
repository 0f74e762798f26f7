"""The seal journal: intents written (and fsync'd) before the kernel's state changes.

Each line is canonical JSON (version 1)::

    {"v":1,"op":"open","session":"<hex>","token_sha256":"<hex>","deadline":1795314750}
    {"v":1,"op":"sealed","session":"<hex>","rules_sha256":"<hex>","statement_sha256":"<hex>"}
    {"v":1,"op":"close","session":"<hex>"}
    {"v":1,"op":"abort","session":"<hex>","reason":"deadline"}
    {"v":1,"op":"unsealed"}

:func:`replay` is pure: it turns the records into the sessions' states. The journal is one
of two witnesses on restart; the other is the signed statement log (a seal statement with
no unseal or abort means an open session, whatever the journal says).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from embassy.errors import WireFormatError
from embassy.wire.codec import canonical_json, field, hex_decode, parse_json_object

JOURNAL_VERSION = 1


class Op(enum.StrEnum):
    OPEN = "open"
    SEALED = "sealed"
    CLOSE = "close"
    ABORT = "abort"
    UNSEALED = "unsealed"


@dataclass(frozen=True, slots=True)
class Record:
    op: Op
    session: bytes | None = None
    token_sha256: bytes | None = None
    deadline: int | None = None
    rules_sha256: bytes | None = None
    statement_sha256: bytes | None = None
    reason: str | None = None

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"v": JOURNAL_VERSION, "op": self.op.value}
        for name in ("session", "token_sha256", "rules_sha256", "statement_sha256"):
            value = getattr(self, name)
            if value is not None:
                obj[name] = value.hex()
        if self.deadline is not None:
            obj["deadline"] = self.deadline
        if self.reason is not None:
            obj["reason"] = self.reason
        return canonical_json(obj)


def parse_record(raw: bytes) -> Record:
    obj = parse_json_object(raw, "journal record")
    if field(obj, "v", int, "journal record") != JOURNAL_VERSION:
        raise WireFormatError("journal record: unsupported version")
    try:
        op = Op(field(obj, "op", str, "journal record"))
    except ValueError:
        raise WireFormatError(f"journal record: unknown op {obj['op']!r}") from None

    def digest(name: str, size: int = 32) -> bytes | None:
        return hex_decode(obj[name], f"journal record.{name}", size=size) if name in obj else None

    return Record(
        op=op,
        session=digest("session", 16),
        token_sha256=digest("token_sha256"),
        deadline=field(obj, "deadline", int, "journal record") if "deadline" in obj else None,
        rules_sha256=digest("rules_sha256"),
        statement_sha256=digest("statement_sha256"),
        reason=field(obj, "reason", str, "journal record") if "reason" in obj else None,
    )


class Phase(enum.StrEnum):
    OPENING = "opening"  # intent journaled; seal or statement may not have happened
    SEALED = "sealed"  # sealed and the seal statement issued: the token was handed out
    CLOSED = "closed"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class SessionState:
    session: bytes
    phase: Phase
    token_sha256: bytes
    deadline: int
    seal_statement_sha256: bytes | None = None

    @property
    def is_open(self) -> bool:
        return self.phase in (Phase.OPENING, Phase.SEALED)


def replay(records: Iterable[Record]) -> dict[bytes, SessionState]:
    """Pure: the state of every session the journal has seen, in order of opening."""
    states: dict[bytes, SessionState] = {}
    for record in records:
        sid = record.session
        if record.op is Op.OPEN and sid is not None:
            states[sid] = SessionState(
                sid, Phase.OPENING, record.token_sha256 or b"", record.deadline or 0
            )
        elif sid is not None and sid in states:
            state = states[sid]
            if record.op is Op.SEALED:
                states[sid] = replace(
                    state, phase=Phase.SEALED, seal_statement_sha256=record.statement_sha256
                )
            elif record.op is Op.CLOSE:
                states[sid] = replace(state, phase=Phase.CLOSED)
            elif record.op is Op.ABORT:
                states[sid] = replace(state, phase=Phase.ABORTED)
    return states
