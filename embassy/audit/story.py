"""What happened, per workload, read from verified statements: sessions, jobs, restarts, key
releases, meter movements and rejections.

Only statements of a verified log reach here; still, a body's fields are read defensively
(a field of the wrong type is shown as absent, never trusted as something else), since a
predicate's shape differs across versions. Pure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from embassy.log.entry import EntryType
from embassy.metering.reading import Reading
from embassy.verify.segment import LoggedStatement
from embassy.verify.workload import Workload
from embassy.wire.statement import (
    ACTIVATION_REJECTED_V1,
    ACTIVATION_REJECTED_V2,
    INSTRUCTION_REFUSED_V1,
    INSTRUCTION_REFUSED_V2,
    JOB_ABORTED_V1,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    LIFECYCLE_V1,
    METER_BATCH_V1,
    METER_UPDATE_V1,
    METER_UPDATE_V2,
    SEAL_V1,
    SEAL_V2,
    SESSION_ABORT_V1,
    SESSION_ABORT_V2,
    UNSEAL_V1,
    UNSEAL_V2,
    WEIGHTS_KEY_DENIED_V1,
    WEIGHTS_KEY_RELEASED_V1,
)

UNKNOWN = "(not stated)"


@dataclass(frozen=True, slots=True)
class Point:
    """A statement's place: log position and TPM clock."""

    seq: int
    clock_ms: int
    boot: int
    restart: int
    wall_time_unix: int | None

    @classmethod
    def of(cls, logged: LoggedStatement) -> Point:
        clock = logged.statement.header.clock
        return cls(
            logged.entry.seq,
            clock.clock,
            clock.reset_count,
            clock.restart_count,
            _int(logged.statement.body, "wall_time_unix"),
        )


@dataclass(frozen=True, slots=True)
class SessionSpan:
    session: str
    payload_id: str | None
    sealed: Point
    ended: Point | None  # None: no end in the proved log
    outcome: str  # "unsealed", "aborted" or "open at the end of the proved log"
    reason: str | None  # an abort's
    output_sha256: str | None
    deadline_unix: int | None
    restarted_inside: bool  # an embassy start between the seal and its end (or the log's end)
    end_names_seal: bool  # the unseal or abort names this seal statement's SHA-256

    @property
    def tpm_ms(self) -> int | None:
        """TPM milliseconds sealed, when both ends are in one boot and restart."""
        e = self.ended
        if e is None or (e.boot, e.restart) != (self.sealed.boot, self.sealed.restart):
            return None
        return e.clock_ms - self.sealed.clock_ms


@dataclass(frozen=True, slots=True)
class JobSpan:
    job: str
    payload_id: str | None
    container_id: str | None
    runtime: str | None
    network: str | None
    started: Point | None  # None: the job-started statement is not in the proved log
    ended: Point | None
    outcome: str  # "destroyed", "aborted" or "running at the end of the proved log"
    reason: str | None
    output_sha256: str | None
    checked_gone: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class WorkloadTimeline:
    """Sessions and jobs of one workload (image and launch digest)."""

    label: str
    image_digest: str
    launch_digest: str
    is_identity_workload: bool
    sessions: tuple[SessionSpan, ...]
    jobs: tuple[JobSpan, ...]


@dataclass(frozen=True, slots=True)
class Restart:
    seq: int
    kind: str  # "embassy start" or "workload launch"


@dataclass(frozen=True, slots=True)
class KeyRelease:
    at: Point
    decision: str  # "released" or "denied"
    model_id: str
    key_id: str
    tenant: str
    request_sha256: str
    decision_id: str
    policy_sha256: str | None
    broker_keyid: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class MeterPoint:
    """One stated meter update of a capability (the value is not in the log)."""

    seq: int
    authority: str
    capability: str
    session: str | None


@dataclass(frozen=True, slots=True)
class ReadingPoint:
    """A meter's value in a reading the authority opened (micro-units)."""

    seq: int  # the reading statement's position
    as_of_seq: int
    authority: str
    capability: str
    value: int
    count: int


@dataclass(frozen=True, slots=True)
class Rejection:
    at: Point
    kind: str
    session: str | None
    codes: tuple[tuple[str, int], ...]
    detail: str


@dataclass(frozen=True, slots=True)
class Story:
    workloads: tuple[WorkloadTimeline, ...]
    restarts: tuple[Restart, ...]
    releases: tuple[KeyRelease, ...]
    meter_updates: tuple[MeterPoint, ...]
    readings: tuple[ReadingPoint, ...]
    rejections: tuple[Rejection, ...]


def _int(body: Mapping[str, Any], key: str) -> int | None:
    value = body.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(body: Mapping[str, Any], key: str) -> str | None:
    value = body.get(key)
    return value if isinstance(value, str) else None


def _workload_key(body: Mapping[str, Any]) -> tuple[str, str]:
    w = body.get("workload")
    if isinstance(w, Mapping):
        return (_str(w, "image_digest") or UNKNOWN, _str(w, "launch_digest") or UNKNOWN)
    return (_str(body, "image_digest") or UNKNOWN, _str(body, "launch_digest") or UNKNOWN)


def _sessions(
    statements: Sequence[LoggedStatement], starts: Sequence[int]
) -> dict[tuple[str, str], list[SessionSpan]]:
    seals: dict[str, tuple[LoggedStatement, str]] = {}
    ends: dict[str, LoggedStatement] = {}
    for logged in statements:
        kind, body = logged.statement.predicate_type, logged.statement.body
        session = _str(body, "session")
        if session is None:
            continue
        if kind in (SEAL_V1, SEAL_V2):
            seals.setdefault(session, (logged, hashlib.sha256(logged.envelope).hexdigest()))
        elif kind in (UNSEAL_V1, UNSEAL_V2, SESSION_ABORT_V1, SESSION_ABORT_V2):
            ends.setdefault(session, logged)
    out: dict[tuple[str, str], list[SessionSpan]] = {}
    last_seq = statements[-1].entry.seq if statements else 0
    for session, (seal, seal_sha) in seals.items():
        end = ends.get(session)
        body = seal.statement.body
        end_body: Mapping[str, Any] = end.statement.body if end is not None else {}
        aborted = end is not None and end.statement.predicate_type in (
            SESSION_ABORT_V1,
            SESSION_ABORT_V2,
        )
        until = end.entry.seq if end is not None else last_seq
        span = SessionSpan(
            session=session,
            payload_id=_str(body, "payload_id"),
            sealed=Point.of(seal),
            ended=Point.of(end) if end is not None else None,
            outcome=(
                "open at the end of the proved log"
                if end is None
                else ("aborted" if aborted else "unsealed")
            ),
            reason=_str(end_body, "reason"),
            output_sha256=_str(end_body, "output_sha256"),
            deadline_unix=_int(body, "deadline_unix"),
            restarted_inside=any(seal.entry.seq < s < until for s in starts),
            end_names_seal=end is not None and end_body.get("seal_statement_sha256") == seal_sha,
        )
        out.setdefault(_workload_key(body), []).append(span)
    return out


def _gone(body: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    gone = body.get("checked_gone")
    if not isinstance(gone, Mapping):
        return ()
    return tuple((str(k), str(v)) for k, v in sorted(gone.items()))


def _jobs(statements: Sequence[LoggedStatement]) -> dict[tuple[str, str], list[JobSpan]]:
    started: dict[str, LoggedStatement] = {}
    ended: dict[str, LoggedStatement] = {}
    order: list[str] = []
    for logged in statements:
        kind, body = logged.statement.predicate_type, logged.statement.body
        job = _str(body, "job")
        if job is None or kind not in (JOB_STARTED_V1, JOB_DESTROYED_V1, JOB_ABORTED_V1):
            continue
        if job not in order:
            order.append(job)
        if kind == JOB_STARTED_V1:
            started.setdefault(job, logged)
        else:
            ended.setdefault(job, logged)
    out: dict[tuple[str, str], list[JobSpan]] = {}
    for job in order:
        start, end = started.get(job), ended.get(job)
        first = start or end
        assert first is not None
        body = first.statement.body
        end_body: Mapping[str, Any] = end.statement.body if end is not None else {}
        outcome = "running at the end of the proved log"
        if end is not None:
            outcome = "destroyed" if end.statement.predicate_type == JOB_DESTROYED_V1 else "aborted"
        span = JobSpan(
            job=job,
            payload_id=_str(body, "payload_id"),
            container_id=_str(body, "container_id"),
            runtime=_str(body, "runtime"),
            network=_str(body, "network"),
            started=Point.of(start) if start is not None else None,
            ended=Point.of(end) if end is not None else None,
            outcome=outcome,
            reason=_str(end_body, "reason"),
            output_sha256=_str(end_body, "output_sha256"),
            checked_gone=_gone(end_body),
        )
        out.setdefault(_workload_key(body), []).append(span)
    return out


def _release(logged: LoggedStatement) -> KeyRelease:
    body = logged.statement.body
    released = logged.statement.predicate_type == WEIGHTS_KEY_RELEASED_V1
    return KeyRelease(
        at=Point.of(logged),
        decision="released" if released else "denied",
        model_id=_str(body, "model_id") or UNKNOWN,
        key_id=_str(body, "key_id") or UNKNOWN,
        tenant=_str(body, "tenant") or UNKNOWN,
        request_sha256=_str(body, "request_sha256") or UNKNOWN,
        decision_id=_str(body, "decision_id") or UNKNOWN,
        policy_sha256=_str(body, "policy_sha256"),
        broker_keyid=_str(body, "broker_keyid") or UNKNOWN,
        reason=None if released else (_str(body, "reason") or UNKNOWN),
    )


def _meter_points(logged: LoggedStatement) -> list[MeterPoint]:
    """The meter updates one statement states: one per (authority, capability)."""
    kind, body, seq = logged.statement.predicate_type, logged.statement.body, logged.entry.seq
    updates: list[tuple[Mapping[str, Any], str | None]] = []
    if kind in (METER_UPDATE_V1, METER_UPDATE_V2):
        updates.append((body, _str(body, "session")))
    elif kind == METER_BATCH_V1:
        parts = body.get("sessions")
        for part in parts if isinstance(parts, list) else []:
            if not isinstance(part, Mapping):
                continue
            items = part.get("meter_updates")
            for item in items if isinstance(items, list) else []:
                if isinstance(item, Mapping):
                    updates.append((item, _str(part, "session")))
    out = []
    for update, session in updates:
        capabilities = update.get("capabilities")
        for capability in capabilities if isinstance(capabilities, list) else []:
            if isinstance(capability, str):
                authority = _str(update, "authority") or UNKNOWN
                out.append(MeterPoint(seq, authority, capability, session))
    return out


def _counted(body: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    counts = body.get("counts")
    if not isinstance(counts, Mapping):
        return ()
    return tuple((str(k), v) for k, v in sorted(counts.items()) if isinstance(v, int))


def _refused(body: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    refused = body.get("refused")
    tally: dict[str, int] = {}
    for item in refused if isinstance(refused, list) else []:
        code = (_str(item, "code") if isinstance(item, Mapping) else None) or UNKNOWN
        tally[code] = tally.get(code, 0) + 1
    return tuple(sorted(tally.items()))


def _reason(body: Mapping[str, Any]) -> tuple[tuple[str, int], ...]:
    return ((_str(body, "reason") or UNKNOWN, 1),)


def _rejection(logged: LoggedStatement) -> Rejection | None:
    """A statement that records something refused, aborted or found wrong, else None."""
    kind, body = logged.statement.predicate_type, logged.statement.body
    at, session = Point.of(logged), _str(body, "session")
    if kind in (ACTIVATION_REJECTED_V1, ACTIVATION_REJECTED_V2):
        detail = f"{_int(body, 'files') or 0} file(s), {_int(body, 'bytes') or 0} bytes"
        return Rejection(at, "activation files rejected", session, _counted(body), detail)
    if kind in (INSTRUCTION_REFUSED_V1, INSTRUCTION_REFUSED_V2):
        go_on = body.get("session_continues_unmetered") is True
        detail = "session went on unmetered" if go_on else "session refused"
        return Rejection(at, "instructions refused", session, _refused(body), detail)
    found: dict[str, tuple[str, str | None, str]] = {
        SESSION_ABORT_V1: ("session aborted", session, "output not certified"),
        SESSION_ABORT_V2: ("session aborted", session, "output not certified"),
        JOB_ABORTED_V1: ("job aborted", _str(body, "job"), "job destroyed"),
        WEIGHTS_KEY_DENIED_V1: (
            "weights key denied",
            None,
            f"model {_str(body, 'model_id') or UNKNOWN}",
        ),
    }
    if kind in found:
        what, who, detail = found[kind]
        return Rejection(at, what, who, _reason(body), detail)
    if kind == LIFECYCLE_V1 and body.get("event") == "intrusion":
        n = _int(body, "aborted_sessions") or 0
        return Rejection(at, "intrusion", None, (("intrusion", 1),), f"{n} session(s) aborted")
    return None


def _reading_points(readings: Sequence[Reading]) -> tuple[ReadingPoint, ...]:
    points = [
        ReadingPoint(
            seq=r.header.seq if r.header is not None else r.as_of_seq,
            as_of_seq=r.as_of_seq,
            authority=r.authority,
            capability=m.capability,
            value=m.value,
            count=m.count,
        )
        for r in readings
        for m in r.meters
    ]
    return tuple(sorted(points, key=lambda p: (p.authority, p.capability, p.seq)))


def _label(
    key: tuple[str, str], identity_workload: Workload | None, *, jobs_only: bool
) -> tuple[str, bool]:
    image, launch = key
    if (
        identity_workload is not None
        and image == identity_workload.image_digest
        and launch == identity_workload.launch_digest.hex()
    ):
        return f"{identity_workload.name} (the identity's workload)", True
    return f"{'jobs of image' if jobs_only else 'workload'} {image[:19]}…", False


def build_story(
    statements: Sequence[LoggedStatement],
    events: Sequence[tuple[int, EntryType]],
    identity_workload: Workload | None,
    readings: Sequence[Reading],
) -> Story:
    starts = [seq for seq, kind in events if kind is EntryType.EMBASSY_START]
    restarts = tuple(
        Restart(seq, "embassy start" if kind is EntryType.EMBASSY_START else "workload launch")
        for seq, kind in events
        if kind in (EntryType.EMBASSY_START, EntryType.LAUNCH_SEPARATOR)
    )
    sessions, jobs = _sessions(statements, starts), _jobs(statements)
    workloads = []
    for key in sorted(set(sessions) | set(jobs)):
        label, ours = _label(key, identity_workload, jobs_only=key not in sessions)
        workloads.append(
            WorkloadTimeline(
                label=label,
                image_digest=key[0],
                launch_digest=key[1],
                is_identity_workload=ours,
                sessions=tuple(sessions.get(key, [])),
                jobs=tuple(jobs.get(key, [])),
            )
        )
    releases = tuple(
        _release(s)
        for s in statements
        if s.statement.predicate_type in (WEIGHTS_KEY_RELEASED_V1, WEIGHTS_KEY_DENIED_V1)
    )
    meters = tuple(p for s in statements for p in _meter_points(s))
    rejections = tuple(r for s in statements if (r := _rejection(s)) is not None)
    return Story(
        workloads=tuple(workloads),
        restarts=restarts,
        releases=releases,
        meter_updates=meters,
        readings=_reading_points(readings),
        rejections=rejections,
    )
