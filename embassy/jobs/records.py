"""What the log says of jobs (pure over statements): which started, which ended, how.

A job's story in the log is ``job-started`` then exactly one of ``job-destroyed`` or
``job-aborted``, each naming the job id (hex) in its body and as its subject
``job:<id>`` (SHA-256 of the id's bytes). A job with a start and no end was cut short by
the daemon: at the next start it gets a ``job-aborted`` saying so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from embassy.wire.statement import (
    JOB_ABORTED_V1,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    Statement,
    Subject,
)

JOB_ID_LEN = 16
JOB_PREDICATES = frozenset({JOB_STARTED_V1, JOB_DESTROYED_V1, JOB_ABORTED_V1})
ENDS = frozenset({JOB_DESTROYED_V1, JOB_ABORTED_V1})


def job_subject(job_id: bytes) -> Subject:
    return Subject(f"job:{job_id.hex()}", hashlib.sha256(job_id).digest())


@dataclass(frozen=True, slots=True)
class JobRecord:
    job: str  # hex
    started: Mapping[str, Any] | None
    ended: Mapping[str, Any] | None
    end_type: str | None


def job_records(statements: Iterable[Statement]) -> dict[str, JobRecord]:
    """Every job the statements name, by hex id, with its start and end bodies."""
    out: dict[str, JobRecord] = {}
    for statement in statements:
        if statement.predicate_type not in JOB_PREDICATES:
            continue
        job = str(statement.body.get("job", ""))
        record = out.get(job, JobRecord(job, None, None, None))
        if statement.predicate_type == JOB_STARTED_V1:
            record = JobRecord(job, statement.body, record.ended, record.end_type)
        else:
            record = JobRecord(job, record.started, statement.body, statement.predicate_type)
        out[job] = record
    return out


def unfinished(statements: Iterable[Statement]) -> list[JobRecord]:
    """Jobs with a start and no end: interrupted by a daemon crash or kill."""
    return [r for r in job_records(statements).values() if r.started and r.ended is None]


def opened_job_payloads(statements: Iterable[Statement]) -> list[tuple[bytes, bytes, int]]:
    """(payload id, job id, wall time) of each started job: payloads whose keys left."""
    out = []
    for statement in statements:
        if statement.predicate_type == JOB_STARTED_V1:
            body = statement.body
            out.append(
                (
                    bytes.fromhex(str(body["payload_id"])),
                    bytes.fromhex(str(body["job"])),
                    int(body.get("wall_time_unix") or 0),
                )
            )
    return out
