"""The audit report's model: frozen values built only from what the verifier proved.

:func:`build_report` takes a :class:`VerifiedIdentity` and a :class:`VerifiedLog` (each
returned by :class:`embassy.verify.Verifier`, which raises on anything it cannot prove)
and, optionally, meter readings the authority opened from statements of that log. Nothing
here reads a file, the network or a clock. Every string a statement carries is kept as
data: the renderer escapes it (the workload chooses some of them).

What the model says it did *not* prove (``Report.not_proved``) is as much a part of it as
what it did: a log segment proves inclusion, not that the log ends there; wall times are
the embassy's word; meter values are in the log only encrypted to their authority.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from embassy.attest.types import TpmMode
from embassy.audit.story import (
    JobSpan,
    KeyRelease,
    MeterPoint,
    ReadingPoint,
    Rejection,
    Restart,
    SessionSpan,
    WorkloadTimeline,
    build_story,
)
from embassy.log.entry import GENESIS, EntryType
from embassy.metering.reading import Reading
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.logs import VerifiedLog
from embassy.verify.segment import LoggedStatement
from embassy.wire.dsse import keyid
from embassy.wire.statement import PREDICATE_PREFIX

# A statement's fields are shown up to this many characters each (the table stays readable;
# the digests that matter are 64 characters).
MAX_FIELD_CHARS = 160

__all__ = [
    "JobSpan",
    "KeyRelease",
    "MeterPoint",
    "ReadingPoint",
    "Rejection",
    "Report",
    "Restart",
    "SegmentView",
    "SessionSpan",
    "StatementRow",
    "Verified",
    "WorkloadTimeline",
    "build_report",
]


@dataclass(frozen=True, slots=True)
class SegmentView:
    """One verified segment: where it starts and ends and how its start is fixed."""

    first_seq: int
    last_seq: int
    boot: int
    anchored: bool
    head_clock_ms: int
    statements: int


@dataclass(frozen=True, slots=True)
class Verified:
    """The report's header: what the identity and the log proved."""

    embassy_keyid: str
    measurement: str
    tpm_kind: str
    tpm_facts: tuple[str, ...]
    ak_certified: bool
    workload: tuple[tuple[str, str], ...]  # (label, value), empty when none was launched
    identity_checks: tuple[str, ...]
    log_checks: tuple[str, ...]
    first_seq: int
    last_seq: int
    head_clock_ms: int
    head_boot: int
    segments: tuple[SegmentView, ...]
    complete: bool
    proved: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StatementRow:
    """One statement of the log, as the table shows it."""

    seq: int
    kind: str  # the predicate's short name and version, e.g. "seal:v2"
    predicate_type: str
    tpm_clock_ms: int
    boot: int
    restart: int
    wall_time_unix: int | None
    subjects: tuple[tuple[str, str], ...]  # (name, sha256 hex)
    fields: tuple[tuple[str, str], ...]  # (key, value as shown), the header left out
    verified: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Report:
    verified: Verified
    not_proved: tuple[str, ...]
    workloads: tuple[WorkloadTimeline, ...]
    restarts: tuple[Restart, ...]
    statements: tuple[StatementRow, ...]
    releases: tuple[KeyRelease, ...]
    meter_updates: tuple[MeterPoint, ...]
    readings: tuple[ReadingPoint, ...]
    rejections: tuple[Rejection, ...]


def short_kind(predicate_type: str) -> str:
    return predicate_type.removeprefix(PREDICATE_PREFIX)


def shown(value: Any) -> str:
    """A field's value as text, cut to :data:`MAX_FIELD_CHARS` (escaping is the renderer's)."""
    if isinstance(value, str):
        text = value
    else:
        text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= MAX_FIELD_CHARS else text[: MAX_FIELD_CHARS - 1] + "…"


def _wall(body: Mapping[str, Any]) -> int | None:
    value = body.get("wall_time_unix")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _segment_views(log: VerifiedLog) -> tuple[SegmentView, ...]:
    return tuple(
        SegmentView(
            first_seq=seg.entries[0].seq,
            last_seq=seg.entries[-1].seq,
            boot=seg.reset_count,
            anchored="anchor-quote" in seg.checks,
            head_clock_ms=seg.head_clock.clock,
            statements=len(seg.statements),
        )
        for seg in log.segments
    )


def _verified(identity: VerifiedIdentity, log: VerifiedLog) -> Verified:
    tpm = identity.tpm
    workload: tuple[tuple[str, str], ...] = ()
    if identity.workload is not None:
        w = identity.workload
        workload = (
            ("name", w.name),
            ("image", w.image),
            ("image digest", w.image_digest),
            ("launch digest", w.launch_digest.hex()),
            ("launch events", f"seq {w.first_seq}..{w.last_seq}"),
        )
    return Verified(
        embassy_keyid=keyid(identity.signing_key),
        measurement=identity.measurement.digest.hex(),
        tpm_kind=identity.tpm_mode.value,
        tpm_facts=tuple(tpm.describe()) if tpm is not None else (),
        ak_certified=tpm is not None and (tpm.ak_certificate is not None or tpm.ak_activated_live),
        workload=workload,
        identity_checks=identity.checks,
        log_checks=log.checks,
        first_seq=log.first_seq,
        last_seq=log.last_seq,
        head_clock_ms=log.head_clock.clock,
        head_boot=log.head_clock.reset_count,
        segments=_segment_views(log),
        complete=log.complete_at is not None,
        proved=tuple(log.facts()),
    )


def _not_proved(
    identity: VerifiedIdentity, log: VerifiedLog, *, readings_opened: bool
) -> tuple[str, ...]:
    """What the verified evidence leaves open, in words an auditor can act on."""
    out: list[str] = []
    last = log.last_seq
    if log.complete_at is None:
        out.append(
            f"The log may go on after seq {last}: these segments prove inclusion only. No "
            "fresh evidence over your nonce showed seq "
            f"{last} to be the log's head (audit with --complete --evidence --nonce)."
        )
    first = log.segments[0]
    if "anchor-quote" in first.checks:
        out.append(
            f"Entries before seq {log.first_seq} are not shown: the first segment starts at a "
            "checkpoint, so what came earlier in that boot is not part of this report."
        )
    elif not (first.entries[0].seq == 0 and first.entries[0].prev == GENESIS):
        out.append(
            f"Earlier TPM boots (before seq {log.first_seq}) are not shown: the first segment "
            f"starts at the beginning of boot {first.reset_count}, not of the log."
        )
    for before, after in zip(log.segments, log.segments[1:], strict=False):
        gap_from, gap_to = before.entries[-1].seq + 1, after.entries[0].seq - 1
        if gap_from <= gap_to:
            out.append(
                f"Entries seq {gap_from}..{gap_to} between two segments are not shown "
                "(nothing here says what they were)."
            )
    tpm = identity.tpm
    if tpm is None or tpm.ek is None:
        out.append("The TPM's kind is not proven: the EK certificate's CA was not checked.")
    if tpm is None or (tpm.ak_certificate is None and not tpm.ak_activated_live):
        out.append("The AK is not proven to be in the EK's TPM (no AK certificate).")
    if identity.tpm_mode is TpmMode.SOFTWARE:
        out.append(
            "The TPM is a software TPM: no hardware root of trust; the report shows what it "
            "signed, which a host controlling it could also have signed."
        )
    out.append(
        "Wall times (wall_time_unix, deadlines) are the embassy's own clock, not the TPM's; "
        "order and durations here come from log positions and the TPM clock."
    )
    out.append(
        "Inputs and outputs are shown only as the digests the statements commit to; "
        "their contents are not in the log."
    )
    if not readings_opened:
        out.append(
            "Meter values are not shown: the log carries them only encrypted to their "
            "authority (pass the authority's --authority-key to open its "
            "readings). The charts count meter-update statements."
        )
    return tuple(out)


def _row_checks(logged: LoggedStatement, log: VerifiedLog) -> tuple[str, ...]:
    """What the verifier established for this statement (it is in a verified segment)."""
    seq = logged.entry.seq
    segment = next(s for s in log.segments if s.entries[0].seq <= seq <= s.entries[-1].seq)
    checks = [
        "embassy signature",
        "hash chain",
        f"PCR replay to the quote at seq {segment.entries[-1].seq}",
        "TPM clock order",
    ]
    if log.complete_at is not None and segment is log.segments[-1]:
        checks.append("log complete to its head")
    return tuple(checks)


def _rows(log: VerifiedLog) -> tuple[StatementRow, ...]:
    rows = []
    for logged in log.statements:
        st = logged.statement
        body = st.body
        rows.append(
            StatementRow(
                seq=logged.entry.seq,
                kind=short_kind(st.predicate_type),
                predicate_type=st.predicate_type,
                tpm_clock_ms=st.header.clock.clock,
                boot=st.header.clock.reset_count,
                restart=st.header.clock.restart_count,
                wall_time_unix=_wall(body),
                subjects=tuple((s.name, s.sha256.hex()) for s in st.subjects),
                fields=tuple((str(k), shown(v)) for k, v in sorted(body.items())),
                verified=_row_checks(logged, log),
            )
        )
    return tuple(rows)


def build_report(
    identity: VerifiedIdentity,
    log: VerifiedLog,
    readings: Sequence[Reading] = (),
    notes: Sequence[str] = (),
) -> Report:
    """The report of ``log`` (verified against ``identity``).

    ``readings`` must be meter readings opened from statements of ``log`` (see
    :func:`embassy.audit.readings.open_log_readings`); one whose statement position is not
    a meter-reading statement of the log is refused. ``notes`` (what was left out of the
    readings) go to what the report did not prove.
    """
    positions = {
        s.entry.seq
        for s in log.statements
        if short_kind(s.statement.predicate_type).startswith("meter-reading")
    }
    for reading in readings:
        if reading.header is None or reading.header.seq not in positions:
            where = "unknown" if reading.header is None else str(reading.header.seq)
            raise ValueError(f"reading at seq {where} is not a meter-reading statement of the log")
    events = tuple(
        (e.seq, e.type)
        for seg in log.segments
        for e in seg.entries
        if e.type is not EntryType.STATEMENT
    )
    story = build_story(log.statements, events, identity.workload, readings)
    return Report(
        verified=_verified(identity, log),
        not_proved=(*_not_proved(identity, log, readings_opened=bool(readings)), *notes),
        workloads=story.workloads,
        restarts=story.restarts,
        statements=_rows(log),
        releases=story.releases,
        meter_updates=story.meter_updates,
        readings=story.readings,
        rejections=story.rejections,
    )
