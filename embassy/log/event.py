"""Events: log entries that are not statements (a daemon start, a workload launch).

An event's entry data is a DSSE envelope (payloadType ``application/vnd.embassy.event+json``)
signed by the embassy key, over canonical JSON (version 1)::

    {"body": {...}, "log": {"prev": "<hex>", "seq": 4}, "type": "embassy-start", "v": 1}

Signing events as statements are signed means every entry in the log is authenticated and
bound to its position: start-up repair (which finishes an interrupted PCR extend) extends
only an entry the embassy itself signed, never a line someone appended to the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from embassy.errors import WireFormatError
from embassy.wire.codec import (
    JsonObject,
    canonical_json,
    field,
    hex_decode,
    only_fields,
    parse_json_object,
    require_canonical,
)

EVENT_PAYLOAD_TYPE = "application/vnd.embassy.event+json"
EVENT_VERSION = 1


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    seq: int
    prev: bytes
    body: JsonObject


def encode_event(event_type: str, seq: int, prev: bytes, body: Mapping[str, Any]) -> bytes:
    return canonical_json(
        {
            "v": EVENT_VERSION,
            "type": event_type,
            "log": {"seq": seq, "prev": prev.hex()},
            "body": dict(body),
        }
    )


def parse_event(payload: bytes) -> Event:
    obj = parse_json_object(payload, "event", integers_only=True)
    only_fields(obj, {"v", "type", "log", "body"}, "event")
    if field(obj, "v", int, "event") != EVENT_VERSION:
        raise WireFormatError(f"event: unsupported version {obj['v']}")
    log = field(obj, "log", dict, "event")
    only_fields(log, {"seq", "prev"}, "event.log")
    seq = field(log, "seq", int, "event.log")
    if seq < 0:
        raise WireFormatError("event.log.seq: negative")
    event = Event(
        type=field(obj, "type", str, "event"),
        seq=seq,
        prev=hex_decode(field(log, "prev", str, "event.log"), "event.log.prev", size=32),
        body=field(obj, "body", dict, "event"),
    )
    # One byte form for a signed event, as for a statement (embassy.wire.statement).
    require_canonical(payload, obj, "event", parsed_integers_only=True)
    return event
