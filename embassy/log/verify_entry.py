"""Authenticate one log entry: its envelope is the embassy's and names this position."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.errors import LogIntegrityError
from embassy.log.entry import EntryType, LogEntry
from embassy.log.event import EVENT_PAYLOAD_TYPE, Event, parse_event
from embassy.wire.dsse import IN_TOTO_PAYLOAD_TYPE, parse_envelope, verify_envelope
from embassy.wire.statement import Statement, parse_statement


def authenticate_entry(entry: LogEntry, key: Ed25519PublicKey) -> Statement | Event:
    """Verify ``entry``'s signature under ``key`` and that it was signed for its position.

    Raises SignatureError, WireFormatError or LogIntegrityError.
    """
    envelope = parse_envelope(entry.data)
    if entry.type is EntryType.STATEMENT:
        statement = parse_statement(verify_envelope(envelope, key, IN_TOTO_PAYLOAD_TYPE))
        seq, prev = statement.header.seq, statement.header.prev
        result: Statement | Event = statement
    else:
        event = parse_event(verify_envelope(envelope, key, EVENT_PAYLOAD_TYPE))
        if event.type != entry.type.value:
            raise LogIntegrityError(
                f"entry seq {entry.seq} is typed {entry.type.value} but signed as {event.type}"
            )
        seq, prev = event.seq, event.prev
        result = event
    if seq != entry.seq:
        raise LogIntegrityError(
            f"log.seq: entry signed for log position {seq} sits at seq {entry.seq}: it was moved"
        )
    if prev != entry.prev:
        raise LogIntegrityError(
            f"log.prev: entry seq {entry.seq} was signed to follow an entry with digest "
            f"{prev.hex()}, but the entry before it has digest {entry.prev.hex()}: it was "
            "moved to another log or the entries before it were changed"
        )
    return result
