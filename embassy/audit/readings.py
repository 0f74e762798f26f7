"""An authority's meter readings, opened only from statements of the verified log.

A reading file the authority kept is shown only if its exact envelope is a statement of
the log the report covers (so its position, and the log around it, are proved); the
others are named in what the report did not prove. Without files, every meter-reading
statement of the log that opens under the authority's key is used. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.errors import EmbassyError
from embassy.metering.reading import Reading, open_reading
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.logs import VerifiedLog
from embassy.wire.dsse import keyid
from embassy.wire.statement import METER_READING_V1


@dataclass(frozen=True, slots=True)
class OpenedReadings:
    readings: tuple[Reading, ...]
    notes: tuple[str, ...]  # what was left out, and why


def open_log_readings(
    identity: VerifiedIdentity,
    log: VerifiedLog,
    authority_key: Ed25519PrivateKey,
    files: Sequence[tuple[str, bytes]] | None = None,
) -> OpenedReadings:
    """Open the readings ``authority_key`` can read: from ``files`` ((name, envelope)
    pairs), each of which must be a statement of ``log``; else from ``log`` itself."""
    in_log = {
        s.envelope: s for s in log.statements if s.statement.predicate_type == METER_READING_V1
    }
    notes: list[str] = []
    candidates: list[tuple[str, bytes]] = []
    if files is None:
        candidates = [(f"seq {s.entry.seq}", env) for env, s in in_log.items()]
    else:
        for name, envelope in files:
            if envelope in in_log:
                candidates.append((name, envelope))
            else:
                notes.append(
                    f"Reading {name} is not a meter-reading statement of the verified log "
                    "segments: not shown (audit the segment that contains it)."
                )
    readings: list[Reading] = []
    others = 0
    for name, envelope in candidates:
        authority = in_log[envelope].statement.body.get("authority")
        if not isinstance(authority, str):
            notes.append(f"Reading {name} names no authority: not shown.")
            continue
        try:
            readings.append(
                open_reading(
                    envelope,
                    embassy_key=identity.signing_key,
                    embassy_keyid=keyid(identity.signing_key),
                    signing_key=authority_key,
                    authority=authority,
                )
            )
        except EmbassyError as exc:
            if files is not None:
                notes.append(f"Reading {name} does not open with your key ({exc.code}).")
            else:
                others += 1
    if others:
        notes.append(
            f"{others} meter reading(s) in the log are for another authority (they do not "
            "open with your key): not shown."
        )
    return OpenedReadings(_by_position(readings), tuple(notes))


def _by_position(readings: Sequence[Reading]) -> tuple[Reading, ...]:
    """Readings in log order, each statement once (a file may repeat one)."""
    by_seq = {r.header.seq: r for r in readings if r.header is not None}
    return tuple(by_seq[seq] for seq in sorted(by_seq))
