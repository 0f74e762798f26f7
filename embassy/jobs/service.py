"""The job lifecycle: assign a warm sealed container, release its keys once, take its
result, destroy it and state what was checked gone (docs/adr/0014-jobs.md).

::

    submit   (the host; the payload checked, unwrapped and not replayed before this)
             take a warm container → write the encrypted input into its spool → assigned
    keys     (the job's own container only; it long-polls while warm)
             job-started statement (fsync'd, PCR-extended) → input key + result key, once
    commit   (the job's own container only) {"output_sha256"}
             read its spool's result (bounded), compare the digest → destroy → check gone →
             job-destroyed statement (output digest, wrapped result key, the checks) → done
    reaper   every 0.25 s: past its deadline → killed; exited without a commit → crashed;
             each: destroy → check gone → job-aborted statement (why) → failed
    start    remove every job container of this embassy, then a job-aborted "daemon
             restarted" for each job the log shows started and not ended

The input is the user's ciphertext and the result is ciphertext under a key wrapped to the
user's reply key: the host relays neither in the clear. Keys never touch the disk.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from embassy.config import Jobs
from embassy.daemon.http_server import Peer
from embassy.errors import (
    ConflictError,
    EmbassyError,
    ForbiddenError,
    JobBadCommitError,
    JobCrashedError,
    JobDeadlineError,
    JobFailedError,
    JobInterruptedError,
    JobOutputTooLargeError,
    JobRequestError,
    JobsBusyError,
    NotFoundError,
)
from embassy.jobs.containers import INPUT_NAME, OUTPUT_NAME, Gone, Slot
from embassy.jobs.records import job_subject, unfinished
from embassy.wire.codec import b64encode, canonical_json
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    JOB_ABORTED_V1,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    Statement,
    Subject,
    parse_statement,
)

_LOG = logging.getLogger(__name__)
REAP_SECONDS = 0.25
WAIT_SECONDS = 10.0  # a warm container's key request waits this long for a job, then again
JOB_ID_LEN = 16
_READ = 1 << 20

WrapResultKey = Callable[[Any, dict[str, Any]], tuple[bytes, dict[str, Any]]]


class Containers(Protocol):
    """What the lifecycle needs of Docker (:class:`embassy.jobs.containers.JobContainers`)."""

    image_digest: str
    runtime: str

    def create(self) -> Slot: ...
    def destroy(self, slot: Slot) -> Gone: ...
    def state(self, slot: Slot) -> tuple[bool, int | None]: ...
    def sweep(self) -> list[tuple[str, Gone]]: ...


class Log(Protocol):
    def append_statement(
        self, predicate_type: str, subjects: list[Subject], body: Mapping[str, Any]
    ) -> Any: ...


def job_launch_digest(jobs: Jobs, image_digest: str) -> bytes:
    """What a job payload's ``launch_digest`` binds: the jobs section and the image's ID."""
    body = {**jobs.to_json(), "image_digest": image_digest}
    return hashlib.sha256(b"embassy-job-launch-v1\0" + canonical_json(body)).digest()


@dataclass
class Job:
    job_id: bytes
    payload_id: bytes
    slot: Slot
    input_key: bytes
    reply_key: Any
    input_sha256: bytes
    input_bytes: int
    deadline: float  # monotonic
    deadline_unix: int
    assigned_unix: int
    state: str = "assigned"  # running, committing, done, failed
    statements: list[bytes] = field(default_factory=list)
    started_seq: int | None = None
    wrapped_key: dict[str, Any] | None = None
    output: bytes | None = None
    output_sha256: bytes | None = None
    error: EmbassyError | None = None
    ended: threading.Event = field(default_factory=threading.Event)
    # Monotonic times of each step (where a job's time goes; the host sees them anyway).
    marks: dict[str, float] = field(default_factory=dict)


class JobService:
    def __init__(
        self,
        *,
        jobs: Jobs,
        log: Log,
        containers: Containers,
        launch_digest: bytes,
        wrap_result_key: WrapResultKey,
        owns: Callable[[Peer | None, str], bool],
        segment_from: Callable[[int], dict[str, Any]],
        statements: Callable[[], list[Statement]] = list,
        now: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        spawn: Callable[[Callable[[], None]], None] | None = None,
    ) -> None:
        self._jobs = jobs
        self._log = log
        self._containers = containers
        self.launch_digest = launch_digest
        self._wrap = wrap_result_key
        self._owns = owns
        self._segment_from = segment_from
        self._statements = statements
        self._now = now
        self._monotonic = monotonic
        self._spawn = spawn or _thread
        self._lock = threading.Condition()
        self._warm: list[Slot] = []
        self._creating = 0
        self._by_container: dict[str, Job] = {}
        self._jobs_by_id: dict[bytes, Job] = {}
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # -- start and stop ---------------------------------------------------------------------

    def recover(self) -> dict[str, Any]:
        """Remove every job container left by an earlier run, and end each job the log shows
        started and not ended with a job-aborted statement: "daemon restarted"."""
        swept = dict(self._containers.sweep())
        aborted = []
        for record in unfinished(self._statements()):
            started = record.started or {}
            cid = str(started.get("container_id", ""))
            gone = swept.get(cid)
            body = {
                "job": record.job,
                "payload_id": started.get("payload_id"),
                "image_digest": started.get("image_digest"),
                "container_id": cid,
                "reason": JobInterruptedError.code,
                "message": "daemon restarted while the job ran; its container was removed",
                "keys_released": True,
                "checked_gone": None if gone is None else gone.to_json(),
                "wall_time_unix": int(self._now()),
            }
            self._log.append_statement(
                JOB_ABORTED_V1, [job_subject(bytes.fromhex(record.job))], body
            )
            aborted.append(record.job)
        return {"containers_removed": len(swept), "jobs_aborted": aborted}

    def start(self) -> None:
        self._refill()
        self._reaper = threading.Thread(target=self._reap_loop, name="embassy-jobs", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        """Stop reaping; destroy warm containers and fail running jobs (stated)."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)
        with self._lock:
            warm, self._warm = self._warm, []
            running = [j for j in self._jobs_by_id.values() if j.state in ("assigned", "running")]
        for slot in warm:
            self._containers.destroy(slot)
        for job in running:
            self._fail(job, JobInterruptedError("the daemon stopped while the job ran"))

    # -- the pool ---------------------------------------------------------------------------

    def _refill(self) -> None:
        with self._lock:
            need = self._jobs.pool_size - len(self._warm) - self._creating
            self._creating += max(need, 0)
        for _ in range(max(need, 0)):
            self._spawn(self._create_one)

    def _create_one(self) -> None:
        try:
            slot = self._containers.create()
        except EmbassyError as exc:
            _LOG.warning("jobs: could not create a warm container (%s)", exc.code)
            with self._lock:
                self._creating -= 1
            return
        with self._lock:
            self._creating -= 1
            stopping = self._stop.is_set()
            if not stopping:
                self._warm.append(slot)
                self._lock.notify_all()
        if stopping:
            self._containers.destroy(slot)

    def _take_slot(self) -> Slot:
        with self._lock:
            if self._warm:
                return self._warm.pop(0)
        return self._containers.create()  # none warm: pay the start-up

    # -- submit (the host) ------------------------------------------------------------------

    def submit(
        self,
        *,
        payload_id: bytes,
        input_key: bytes,
        reply_key: Any,
        ciphertext: bytes,
        claim: Callable[[bytes], None],
    ) -> dict[str, Any]:
        if reply_key is None:
            raise JobRequestError(
                "payload.reply_key is missing: a job's result is encrypted to the user's "
                "reply key, so a job payload must carry one"
            )
        if len(ciphertext) > self._jobs.max_input_bytes:
            raise JobRequestError(
                f"input is {len(ciphertext)} bytes, more than jobs.max_input_bytes "
                f"({self._jobs.max_input_bytes})"
            )
        with self._lock:
            active = sum(1 for j in self._jobs_by_id.values() if j.state in ("assigned", "running"))
            if active >= self._jobs.max_concurrent:
                raise JobsBusyError(f"{active} jobs are running (jobs.max_concurrent); retry later")
            job_id = secrets.token_bytes(JOB_ID_LEN)
        claim(job_id)
        slot = self._take_slot()
        try:
            _write_input(slot, ciphertext)
        except OSError:
            self._containers.destroy(slot)
            raise
        finally:
            # Refilled when the job ends (creating a container beside a running job slows
            # both on a small machine), or now if no warm container is left.
            with self._lock:
                empty = not self._warm
            if empty:
                self._refill()
        now = self._now()
        job = Job(
            job_id=job_id,
            payload_id=payload_id,
            slot=slot,
            input_key=input_key,
            reply_key=reply_key,
            input_sha256=hashlib.sha256(ciphertext).digest(),
            input_bytes=len(ciphertext),
            deadline=self._monotonic() + self._jobs.deadline_seconds,
            deadline_unix=int(now) + self._jobs.deadline_seconds,
            assigned_unix=int(now),
        )
        job.marks["assigned"] = self._monotonic()
        with self._lock:
            self._jobs_by_id[job_id] = job
            self._by_container[slot.container_id] = job
            self._lock.notify_all()
        return {"job": job_id.hex(), "state": job.state, "deadline_unix": job.deadline_unix}

    # -- the job's own routes ---------------------------------------------------------------

    def _container_of(self, peer: Peer | None) -> str:
        with self._lock:
            candidates = [s.container_id for s in self._warm] + list(self._by_container)
        for cid in candidates:
            if self._owns(peer, cid):
                return cid
        raise ForbiddenError("job routes answer only a job container's own processes")

    def is_job_process(self, peer: Peer | None) -> bool:
        try:
            self._container_of(peer)
        except ForbiddenError:
            return False
        return True

    def take_keys(self, peer: Peer | None, wait_seconds: float = WAIT_SECONDS) -> dict[str, Any]:
        """For a warm container: wait for a job (then ``{"assigned": false}``: ask again).
        For an assigned one: state job-started, then hand its keys over, once."""
        cid = self._container_of(peer)
        with self._lock:
            self._lock.wait_for(lambda: cid in self._by_container, timeout=wait_seconds)
            job = self._by_container.get(cid)
            if job is None:
                return {"assigned": False}
            if job.state != "assigned":
                raise ConflictError("this job's keys were released already (once only)")
            job.state = "running"
        job.marks["keys"] = self._monotonic()
        binding = {
            "job": job.job_id.hex(),
            "payload_id": job.payload_id.hex(),
            "image_digest": job.slot.image_digest,
            "container_id": job.slot.container_id,
        }
        result_key, wrapped = self._wrap(job.reply_key, binding)
        body = {
            "job": job.job_id.hex(),
            "payload_id": job.payload_id.hex(),
            "launch_digest": self.launch_digest.hex(),
            **job.slot.to_json(),
            "input_sha256": job.input_sha256.hex(),
            "input_bytes": job.input_bytes,
            "input_key_released": True,
            "result_key_binding": binding,
            "assigned_wall_unix": job.assigned_unix,
            "deadline_unix": job.deadline_unix,
            "wall_time_unix": int(self._now()),
        }
        appended = self._log.append_statement(JOB_STARTED_V1, [job_subject(job.job_id)], body)
        job.statements.append(appended.envelope)
        job.started_seq = appended.entry.seq
        job.wrapped_key = wrapped
        return {
            "assigned": True,
            "job": job.job_id.hex(),
            "payload_id": job.payload_id.hex(),
            "input_key": b64encode(job.input_key),
            "result_key": b64encode(result_key),
            "deadline_unix": job.deadline_unix,
            "statement": b64encode(appended.envelope),
        }

    def _running_job(self, peer: Peer | None) -> Job:
        cid = self._container_of(peer)
        with self._lock:
            job = self._by_container.get(cid)
            if job is None or job.state != "running":
                raise ConflictError("no running job in this container (keys first, commit once)")
            job.state = "committing"
            return job

    def commit(self, peer: Peer | None, output_sha256: bytes) -> dict[str, Any]:
        """Take the result the job wrote to its spool, if its digest is the one committed;
        the container is destroyed and the job-destroyed statement made right after."""
        job = self._running_job(peer)
        try:
            data = _read_output(job.slot, self._jobs.max_output_bytes)
            digest = hashlib.sha256(data).digest()
            if not hmac.compare_digest(digest, output_sha256):
                raise JobBadCommitError(
                    f"output_sha256 is {output_sha256.hex()}, the result in the spool has "
                    f"SHA-256 {digest.hex()}"
                )
        except JobFailedError as exc:
            self._spawn(partial(self._fail, job, exc, claimed=True))
            raise
        job.output, job.output_sha256 = data, digest
        job.marks["committed"] = self._monotonic()
        self._spawn(lambda: self._finish(job))
        return {"accepted": True, "job": job.job_id.hex(), "output_bytes": len(data)}

    def bad_commit(self, peer: Peer | None, message: str) -> None:
        """A commit that does not parse ends the job: bad commit, destroyed, stated."""
        job = self._running_job(peer)
        self._spawn(lambda: self._fail(job, JobBadCommitError(message), claimed=True))

    # -- ends -------------------------------------------------------------------------------

    def _finish(self, job: Job) -> None:
        gone = self._containers.destroy(job.slot)
        job.marks["destroyed"] = self._monotonic()
        body = {
            "job": job.job_id.hex(),
            "payload_id": job.payload_id.hex(),
            **job.slot.to_json(),
            "destroyed_wall_unix": int(self._now()),
            "output_sha256": (job.output_sha256 or b"").hex(),
            "output_bytes": len(job.output or b""),
            "wrapped_result_key": job.wrapped_key,
            "checked_gone": gone.to_json(),
        }
        appended = self._log.append_statement(JOB_DESTROYED_V1, [job_subject(job.job_id)], body)
        job.statements.append(appended.envelope)
        with self._lock:
            job.state = "done" if gone.ok else "failed"
            if not gone.ok:
                job.error = JobFailedError(f"the container was not found gone: {gone.to_json()}")
            self._by_container.pop(job.slot.container_id, None)
        job.ended.set()
        self._refill()

    def _fail(self, job: Job, error: JobFailedError, *, claimed: bool = False) -> None:
        with self._lock:
            if not claimed:
                if job.state not in ("assigned", "running"):
                    return  # ended (or ending) already
                job.state = "committing"
        gone = self._containers.destroy(job.slot)
        body = {
            "job": job.job_id.hex(),
            "payload_id": job.payload_id.hex(),
            **job.slot.to_json(),
            "reason": error.code,
            "message": error.message,
            "keys_released": job.started_seq is not None,
            "destroyed_wall_unix": int(self._now()),
            "checked_gone": gone.to_json(),
            "wall_time_unix": int(self._now()),
        }
        appended = self._log.append_statement(JOB_ABORTED_V1, [job_subject(job.job_id)], body)
        job.statements.append(appended.envelope)
        job.input_key = b""
        with self._lock:
            job.state, job.error = "failed", error
            self._by_container.pop(job.slot.container_id, None)
        job.ended.set()
        self._refill()

    # -- the reaper -------------------------------------------------------------------------

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_SECONDS):
            try:
                self.reap()
            except Exception:
                _LOG.exception("jobs: reaper round failed")

    def reap(self) -> None:
        """One round: deadlines, crashed jobs, dead warm containers."""
        with self._lock:
            live = [j for j in self._jobs_by_id.values() if j.state in ("assigned", "running")]
            warm = list(self._warm)
        for job in live:
            if self._monotonic() >= job.deadline:
                self._fail(
                    job,
                    JobDeadlineError(
                        f"not committed within jobs.deadline_seconds "
                        f"({self._jobs.deadline_seconds} s): killed"
                    ),
                )
                continue
            running, code = self._containers.state(job.slot)
            if not running:
                self._fail(
                    job, JobCrashedError(f"the job's container exited (code {code}) uncommitted")
                )
        for slot in warm:
            running, _ = self._containers.state(slot)
            if not running:
                with self._lock:
                    if slot not in self._warm:
                        continue
                    self._warm.remove(slot)
                self._containers.destroy(slot)
                self._refill()

    # -- status (the host) ------------------------------------------------------------------

    def status(self, job_id: bytes, wait_seconds: float = 0.0) -> dict[str, Any]:
        with self._lock:
            job = self._jobs_by_id.get(job_id)
        if job is None:
            raise NotFoundError("no such job (this daemon run)")
        if wait_seconds > 0:
            job.ended.wait(wait_seconds)
        out: dict[str, Any] = {"job": job_id.hex(), "state": job.state}
        marks = job.marks
        steps = [("assigned", "keys"), ("keys", "committed"), ("committed", "destroyed")]
        out["timings_us"] = {  # integers: the embassy's JSON has no floats
            f"{a}_to_{b}": int((marks[b] - marks[a]) * 1_000_000)
            for a, b in steps
            if a in marks and b in marks
        }
        if job.error is not None:
            out["error"] = {"code": job.error.code, "message": job.error.message}
        if job.state == "done" and job.started_seq is not None:
            out["result"] = {
                "v": 1,
                "type": "embassy-job-result",
                "job": job_id.hex(),
                "wrapped_key": job.wrapped_key,
                "ciphertext_sha256": (job.output_sha256 or b"").hex(),
                "ciphertext": b64encode(job.output or b""),
                "statements": [b64encode(s) for s in job.statements],
                "log": self._segment_from(job.started_seq),
            }
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            states: dict[str, int] = {}
            for job in self._jobs_by_id.values():
                states[job.state] = states.get(job.state, 0) + 1
            return {"warm": len(self._warm), "jobs": states}


def _thread(target: Callable[[], None]) -> None:
    threading.Thread(target=target, name="embassy-job", daemon=True).start()


def _write_input(slot: Slot, ciphertext: bytes) -> None:
    """The encrypted input into the job's spool: the embassy's file, read-only to the job."""
    path = slot.spool / INPUT_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    try:
        view = memoryview(ciphertext)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _read_output(slot: Slot, limit: int) -> bytes:
    """The job's result, exactly the bytes read (a regular file, not a link; bounded)."""
    path = slot.spool / OUTPUT_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise JobBadCommitError(
            f"no result at {OUTPUT_NAME} in the spool ({exc.strerror})"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JobBadCommitError(f"{OUTPUT_NAME} in the spool is not a regular file")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, _READ)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise JobOutputTooLargeError(
                    f"the result is larger than jobs.max_output_bytes ({limit})"
                )
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def statements_of(entries: Any) -> list[Statement]:
    """Parsed statements of log entries (for :meth:`JobService.recover`)."""
    from embassy.log.entry import EntryType

    return [
        parse_statement(parse_envelope(e.data).payload)
        for e in entries
        if e.type is EntryType.STATEMENT
    ]
