"""Verify a job: sealed from birth, its key released once, its result committed, the
container destroyed and checked gone, and (given the reply key) the result opened.

A job's result bundle (:class:`embassy.jobs.result.JobResultBundle`) carries the job's
``job-started`` and ``job-destroyed`` statements and a log segment from the start on. The
checks, in order, each with its own message naming what differs:

1. the segment verifies on its own against the identity's keys (chain, signatures, PCR
   replay to a TPM quote), and both statements are in it, exact bytes;
2. they are this job's (body and subject), started before destroyed, and the segment
   shows one start (the input key went once), one destruction and no abort for it;
3. the same container, image, runtime and lifetime in both; the network ``none`` in
   both (the container was created with no network: sealed from birth);
4. the job ran the identity's job image and launch digest (its ``jobs-ready`` statement);
5. the destruction names the bundle's ciphertext digest and wrapped key, and every part
   (container, writable layer, spool, mounts) checked gone;
6. with the user's reply key, the result key unwraps under the job's binding and the
   ciphertext decrypts (:func:`embassy.jobs.result.open_result`).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any

from embassy.errors import JobStoryError, LogIntegrityError, WireFormatError
from embassy.jobs.records import job_subject
from embassy.jobs.result import JobResultBundle, ReplyPrivateKey, open_result
from embassy.log.segment import LOG_SEGMENT_TYPE, parse_segment
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.policy import TrustPolicy
from embassy.verify.segment import LoggedStatement, verify_segment
from embassy.wire.codec import canonical_json
from embassy.wire.statement import (
    JOB_ABORTED_V1,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    LIFECYCLE_V1,
)

_SAME = ("container_id", "image_digest", "runtime", "created", "started", "payload_id")
GONE = {"container": ("inspect-404",), "spool": ("absent",), "mounts": ("none",)}
LAYER_GONE = ("absent", "not-reported")


@dataclass(frozen=True, slots=True)
class JobsLaunch:
    """What the identity's run says its jobs run: from its ``jobs-ready`` statement."""

    image_digest: str
    launch_digest: bytes
    runtime: str


def jobs_launch(identity: VerifiedIdentity) -> JobsLaunch:
    """The job image and launch digest the identity's run stated (what a job payload binds)."""
    found = None
    for logged in identity.segment.statements:
        body = logged.statement.body
        if logged.statement.predicate_type == LIFECYCLE_V1 and body.get("event") == "jobs-ready":
            found = body
    if found is None:
        raise JobStoryError("the identity's log shows no jobs-ready statement: job mode is off")
    return JobsLaunch(
        image_digest=str(found["image_digest"]),
        launch_digest=bytes.fromhex(str(found["launch_digest"])),
        runtime=str(found["runtime"]),
    )


@dataclass(frozen=True, slots=True)
class VerifiedJob:
    job: str
    payload_id: str
    image_digest: str
    container_id: str
    runtime: str
    network: str
    created: str
    started: str
    destroyed_wall_unix: int
    input_sha256: str
    output_sha256: str
    checked_gone: dict[str, str]
    plaintext: bytes | None
    checks: tuple[str, ...]

    def facts(self) -> list[str]:
        out = [
            f"job {self.job} ran in container {self.container_id[:12]} of {self.image_digest}",
            f"runtime {self.runtime}, network {self.network} from creation ({self.created})",
            f"input key released once; input ciphertext sha256 {self.input_sha256}",
            f"result ciphertext sha256 {self.output_sha256}",
            "destroyed at "
            f"{self.destroyed_wall_unix}; checked gone: "
            + ", ".join(f"{k}={v}" for k, v in sorted(self.checked_gone.items())),
        ]
        if self.plaintext is not None:
            out.append(f"result opened with the reply key: {len(self.plaintext)} bytes")
        return out


def _fail(message: str) -> JobStoryError:
    return JobStoryError(message)


def _find(statements: tuple[LoggedStatement, ...], envelope: bytes) -> LoggedStatement:
    for logged in statements:
        if logged.envelope == envelope:
            return logged
    raise LogIntegrityError(
        "a statement of the bundle is not in its verified log segment (changed, or from "
        "another log)"
    )


def _check_gone(gone: Any) -> dict[str, str]:
    if not isinstance(gone, dict):
        raise _fail("job-destroyed.checked_gone: missing")
    for key, ok in GONE.items():
        if gone.get(key) not in ok:
            raise _fail(f"job-destroyed.checked_gone.{key} is {gone.get(key)!r}, not {ok[0]!r}")
    if gone.get("writable_layer") not in LAYER_GONE:
        raise _fail(
            f"job-destroyed.checked_gone.writable_layer is {gone.get('writable_layer')!r}, "
            "not 'absent'"
        )
    return {str(k): str(v) for k, v in gone.items()}


def _story(
    bundle: JobResultBundle, statements: tuple[LoggedStatement, ...]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The job's start and destruction bodies, checked to be its own, in order, once."""
    logged = [_find(statements, envelope) for envelope in bundle.statements]
    by_type = {s.statement.predicate_type: s for s in logged}
    started, destroyed = by_type.get(JOB_STARTED_V1), by_type.get(JOB_DESTROYED_V1)
    if started is None or destroyed is None:
        raise _fail("the bundle must carry the job's job-started and job-destroyed statements")
    subject = job_subject(bytes.fromhex(bundle.job))
    for name, one in (("job-started", started), ("job-destroyed", destroyed)):
        body = one.statement.body
        if body.get("job") != bundle.job or one.statement.subjects != (subject,):
            raise _fail(f"{name}.job is {body.get('job')!r}, the bundle's job is {bundle.job}")
    if not started.entry.seq < destroyed.entry.seq:
        raise _fail(
            f"job-destroyed (seq {destroyed.entry.seq}) is not after job-started "
            f"(seq {started.entry.seq})"
        )
    # The whole segment from the start on: one start, one destruction, no abort.
    counts = {JOB_STARTED_V1: 0, JOB_DESTROYED_V1: 0, JOB_ABORTED_V1: 0}
    for other in statements:
        kind = other.statement.predicate_type
        if kind in counts and other.statement.body.get("job") == bundle.job:
            counts[kind] += 1
    if counts != {JOB_STARTED_V1: 1, JOB_DESTROYED_V1: 1, JOB_ABORTED_V1: 0}:
        raise _fail(
            f"the log shows the job started {counts[JOB_STARTED_V1]} time(s), destroyed "
            f"{counts[JOB_DESTROYED_V1]}, aborted {counts[JOB_ABORTED_V1]}: expected 1, 1, 0"
        )
    return dict(started.statement.body), dict(destroyed.statement.body)


def _check_sealed(s: dict[str, Any], d: dict[str, Any]) -> None:
    for key in _SAME:
        if s.get(key) != d.get(key):
            raise _fail(f"job-destroyed.{key} is {d.get(key)!r}, job-started.{key} {s.get(key)!r}")
    for name, body in (("job-started", s), ("job-destroyed", d)):
        if body.get("network") != "none":
            raise _fail(f"{name}.network is {body.get('network')!r}, not 'none'")
    if s.get("input_key_released") is not True:
        raise _fail("job-started.input_key_released is not true")


def _check_launch(
    s: dict[str, Any], identity: VerifiedIdentity, expected_payload_id: bytes | None
) -> None:
    if expected_payload_id is not None and s.get("payload_id") != expected_payload_id.hex():
        raise _fail(
            f"job-started.payload_id is {s.get('payload_id')}, your payload is "
            f"{expected_payload_id.hex()}"
        )
    launch = jobs_launch(identity)
    if s.get("image_digest") != launch.image_digest:
        raise _fail(
            f"job-started.image_digest is {s.get('image_digest')}, the identity's jobs run "
            f"{launch.image_digest}"
        )
    if s.get("launch_digest") != launch.launch_digest.hex():
        raise _fail(
            f"job-started.launch_digest is {s.get('launch_digest')}, the identity's jobs "
            f"have {launch.launch_digest.hex()}"
        )


def _check_output(bundle: JobResultBundle, d: dict[str, Any]) -> None:
    if d.get("output_sha256") != bundle.ciphertext_sha256.hex():
        raise _fail(
            f"job-destroyed.output_sha256 is {d.get('output_sha256')}, the bundle's "
            f"ciphertext_sha256 is {bundle.ciphertext_sha256.hex()}"
        )
    if bundle.ciphertext is not None and not hmac.compare_digest(
        hashlib.sha256(bundle.ciphertext).digest(), bundle.ciphertext_sha256
    ):
        raise _fail("the bundle's ciphertext does not have its ciphertext_sha256")
    wrapped = d.get("wrapped_result_key")
    if not isinstance(wrapped, dict) or canonical_json(wrapped) != canonical_json(
        bundle.wrapped_key.to_json()
    ):
        raise _fail("job-destroyed.wrapped_result_key is not the bundle's wrapped_key")


def _binding(bundle: JobResultBundle, s: dict[str, Any]) -> dict[str, Any]:
    binding = s.get("result_key_binding")
    if not isinstance(binding, dict):
        raise _fail("job-started.result_key_binding: missing")
    for key in ("job", "payload_id", "image_digest", "container_id"):
        want = bundle.job if key == "job" else s.get(key)
        if binding.get(key) != want:
            raise _fail(f"job-started.result_key_binding.{key} is {binding.get(key)!r}")
    return binding


def verify_job(
    data: bytes,
    identity: VerifiedIdentity,
    policy: TrustPolicy,
    *,
    reply_key: ReplyPrivateKey | None = None,
    expected_payload_id: bytes | None = None,
) -> VerifiedJob:
    """Verify a job's result bundle (exact bytes) against the verified identity."""
    bundle = JobResultBundle.parse(data)
    log = bundle.log
    if log.get("type") != LOG_SEGMENT_TYPE:
        raise WireFormatError(f"job result.log.type: expected {LOG_SEGMENT_TYPE!r}")
    segment = verify_segment(
        parse_segment(log.get("segment"), "job result.log.segment"),
        identity.segment_keys,
        allow_software_tpm=policy.allow_software_tpm,
    )
    s, d = _story(bundle, segment.statements)
    checks = [*segment.checks, "statements-in-log", "input-key-released-once"]
    _check_sealed(s, d)
    checks += ["same-container", "sealed-from-birth"]
    _check_launch(s, identity, expected_payload_id)
    checks.append("identity-job-image")
    _check_output(bundle, d)
    checks.append("output-committed")
    gone = _check_gone(d.get("checked_gone"))
    checks.append("destroyed-checked-gone")
    binding = _binding(bundle, s)
    plaintext = None
    if reply_key is not None:
        plaintext = open_result(bundle, reply_key, binding)
        checks.append("result-opened")
    return VerifiedJob(
        job=bundle.job,
        payload_id=str(s["payload_id"]),
        image_digest=str(s["image_digest"]),
        container_id=str(s["container_id"]),
        runtime=str(s.get("runtime")),
        network="none",
        created=str(s.get("created")),
        started=str(s.get("started")),
        destroyed_wall_unix=int(d.get("destroyed_wall_unix") or 0),
        input_sha256=str(s.get("input_sha256")),
        output_sha256=bundle.ciphertext_sha256.hex(),
        checked_gone=gone,
        plaintext=plaintext,
        checks=tuple(checks),
    )
