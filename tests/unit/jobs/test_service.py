"""The job lifecycle on a real statement log and fake containers, from each side.

The host submits; only the job's own container gets its keys, once; the result is taken
only if its digest is the committed one and fits; every end destroys the container and is
stated; a restart ends the jobs the log shows unfinished.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embassy.config import Jobs
from embassy.daemon.http_server import Peer
from embassy.daemon.runtime import Embassy
from embassy.errors import (
    ConflictError,
    ForbiddenError,
    JobBadCommitError,
    JobOutputTooLargeError,
    JobRequestError,
    JobsBusyError,
    NotFoundError,
)
from embassy.jobs.containers import OUTPUT_NAME
from embassy.jobs.result import ReplyPrivateKey, open_result, wrap_result_key
from embassy.jobs.service import JobService, statements_of
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    JOB_ABORTED_V1,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    parse_statement,
)
from tests.fakes import FakeJobContainers, FakeTpm
from tests.unit.conftest import EmbassyFactory
from workload_sdk.results import encrypt_result

REPLY = ReplyPrivateKey.generate("x25519")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Rig:
    def __init__(self, embassy: Embassy, tmp: Path, **limits: Any) -> None:
        self.embassy = embassy
        self.containers = FakeJobContainers(tmp / "spools")
        self.clock = Clock()
        self.pids: dict[str, int] = {}  # container id -> the pid of its process
        jobs = Jobs(image="job:1", **{"pool_size": 1, "deadline_seconds": 30, **limits})
        self.service = JobService(
            jobs=jobs,
            log=embassy.log,
            containers=self.containers,
            launch_digest=bytes(32),
            wrap_result_key=wrap_result_key,
            owns=self._owns,
            segment_from=embassy.log_segment,
            statements=lambda: statements_of(embassy.log.entries),
            monotonic=self.clock,
            spawn=lambda f: f(),
        )

    def _owns(self, peer: Peer | None, cid: str) -> bool:
        return peer is not None and self.pids.get(cid) == peer.pid

    def submit(self, data: bytes = b"ciphertext", reply: Any = REPLY.public) -> str:
        before = set(self.containers.created)
        out = self.service.submit(
            payload_id=bytes(16),
            input_key=b"k" * 32,
            reply_key=reply,
            ciphertext=data,
            claim=lambda job: None,
        )
        self.service._refill()
        for cid in set(self.containers.created) - before:
            self.pids.setdefault(cid, 100 + len(self.pids))
        return str(out["job"])

    def peer_of(self, job: str) -> Peer:
        j = self.service._jobs_by_id[bytes.fromhex(job)]
        return Peer(pid=self.pids[j.slot.container_id], uid=65534, gid=65534)

    def spool_of(self, job: str) -> Path:
        return self.service._jobs_by_id[bytes.fromhex(job)].slot.spool

    def statements(self, kind: str) -> list[dict[str, Any]]:
        out = []
        for s in statements_of(self.embassy.log.entries):
            if s.predicate_type == kind:
                out.append(dict(s.body))
        return out


@pytest.fixture
def rig(make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path) -> Rig:
    return Rig(make_embassy(tpm), tmp_path)


def _run(rig: Rig, job: str, plain: bytes = b"the answer") -> tuple[dict[str, Any], str]:
    keys = rig.service.take_keys(rig.peer_of(job), wait_seconds=0)
    result_key = base64.b64decode(keys["result_key"])
    with (rig.spool_of(job) / OUTPUT_NAME).open("wb") as out:
        written = encrypt_result(result_key, io.BytesIO(plain), out)
    return keys, written.sha256


def test_a_job_from_submit_to_a_result_only_the_user_opens(rig: Rig) -> None:
    job = rig.submit(b"encrypted input")
    assert (rig.spool_of(job) / "input").read_bytes() == b"encrypted input"
    keys, digest = _run(rig, job)
    assert keys["assigned"] is True
    assert base64.b64decode(keys["input_key"]) == b"k" * 32
    rig.service.commit(rig.peer_of(job), bytes.fromhex(digest))
    status = rig.service.status(bytes.fromhex(job))
    assert status["state"] == "done"
    bundle = status["result"]
    binding = rig.statements(JOB_STARTED_V1)[0]["result_key_binding"]
    assert open_result(bundle, REPLY, binding) == b"the answer"
    other = ReplyPrivateKey.generate("x25519")
    with pytest.raises(Exception, match="another user's"):
        open_result(bundle, other, binding)
    started, destroyed = rig.statements(JOB_STARTED_V1)[0], rig.statements(JOB_DESTROYED_V1)[0]
    assert started["network"] == "none"
    assert started["container_id"] == destroyed["container_id"]
    assert started["input_sha256"] == hashlib.sha256(b"encrypted input").hexdigest()
    assert destroyed["output_sha256"] == digest
    assert destroyed["checked_gone"]["container"] == "inspect-404"
    assert started["container_id"] in rig.containers.destroyed
    assert not rig.spool_of(job).exists()


def test_keys_go_once_and_only_to_the_jobs_own_container(rig: Rig) -> None:
    job = rig.submit()
    with pytest.raises(ForbiddenError):
        rig.service.take_keys(Peer(pid=1, uid=0, gid=0), wait_seconds=0)
    with pytest.raises(ForbiddenError):
        rig.service.take_keys(None, wait_seconds=0)
    rig.service.take_keys(rig.peer_of(job), wait_seconds=0)
    with pytest.raises(ConflictError, match="once"):
        rig.service.take_keys(rig.peer_of(job), wait_seconds=0)
    assert len(rig.statements(JOB_STARTED_V1)) == 1


def test_a_warm_container_without_a_job_is_told_to_ask_again(rig: Rig) -> None:
    rig.service._refill()
    warm = rig.service._warm[0]
    rig.pids[warm.container_id] = 7
    assert rig.service.take_keys(Peer(pid=7, uid=1, gid=1), wait_seconds=0.01) == {
        "assigned": False
    }


def test_a_job_cannot_commit_for_another(rig: Rig) -> None:
    a, b = rig.submit(), rig.submit()
    _, digest_a = _run(rig, a)
    # b has no keys yet, so it has no running job; and a's commit is a's alone.
    with pytest.raises(ConflictError):
        rig.service.commit(rig.peer_of(b), bytes.fromhex(digest_a))
    assert rig.spool_of(a) != rig.spool_of(b)


@pytest.mark.parametrize(
    ("reply", "data", "error", "fragment"),
    [
        (None, b"x", JobRequestError, "reply_key"),
        (REPLY.public, b"x" * 2000, JobRequestError, "max_input_bytes"),
    ],
)
def test_refused_before_anything_starts(
    make_embassy: EmbassyFactory,
    tpm: FakeTpm,
    tmp_path: Path,
    reply: Any,
    data: bytes,
    error: type[Exception],
    fragment: str,
) -> None:
    rig = Rig(make_embassy(tpm), tmp_path, max_input_bytes=1000)
    with pytest.raises(error, match=fragment):
        rig.submit(data, reply=reply)
    assert rig.statements(JOB_STARTED_V1) == []


def test_busy_past_max_concurrent(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    rig = Rig(make_embassy(tpm), tmp_path, max_concurrent=1)
    rig.submit()
    with pytest.raises(JobsBusyError):
        rig.submit()


def _ended(rig: Rig, job: str, code: str) -> dict[str, Any]:
    status = rig.service.status(bytes.fromhex(job))
    assert status["state"] == "failed"
    assert status["error"]["code"] == code
    assert "result" not in status
    (aborted,) = [b for b in rig.statements(JOB_ABORTED_V1) if b["job"] == job]
    assert aborted["reason"] == code
    assert aborted["container_id"] in rig.containers.destroyed
    return aborted


def test_past_its_deadline_a_job_is_killed_and_stated(rig: Rig) -> None:
    job = rig.submit()
    rig.service.take_keys(rig.peer_of(job), wait_seconds=0)
    rig.clock.t += 31
    rig.service.reap()
    aborted = _ended(rig, job, "job-deadline")
    assert aborted["keys_released"] is True


def test_a_crash_without_commit_ends_the_job(rig: Rig) -> None:
    job = rig.submit()
    slot = rig.service._jobs_by_id[bytes.fromhex(job)].slot
    rig.containers.exited[slot.container_id] = 139
    rig.service.reap()
    aborted = _ended(rig, job, "job-crashed")
    assert aborted["keys_released"] is False
    assert "139" in aborted["message"]


def test_an_oversized_result_ends_the_job(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    rig = Rig(make_embassy(tpm), tmp_path, max_output_bytes=100)
    job = rig.submit()
    _, digest = _run(rig, job, b"y" * 500)
    with pytest.raises(JobOutputTooLargeError):
        rig.service.commit(rig.peer_of(job), bytes.fromhex(digest))
    _ended(rig, job, "job-output-too-large")


@pytest.mark.parametrize(
    "tamper",
    [
        lambda spool, digest: bytes(32),  # a digest of other bytes
        lambda spool, digest: (spool / OUTPUT_NAME).unlink() or bytes.fromhex(digest),
        lambda spool, digest: (
            (
                (spool / OUTPUT_NAME).unlink(),
                (spool / OUTPUT_NAME).symlink_to("/etc/passwd"),
            )
            and bytes.fromhex(digest)
        ),
    ],
)
def test_a_commit_that_does_not_match_ends_the_job(
    rig: Rig, tamper: Callable[[Path, str], bytes]
) -> None:
    job = rig.submit()
    _, digest = _run(rig, job)
    with pytest.raises(JobBadCommitError):
        rig.service.commit(rig.peer_of(job), tamper(rig.spool_of(job), digest))
    _ended(rig, job, "job-bad-commit")


def test_a_malformed_commit_ends_the_job(rig: Rig) -> None:
    job = rig.submit()
    _run(rig, job)
    rig.service.bad_commit(rig.peer_of(job), "output_sha256: not hex")
    assert "not hex" in _ended(rig, job, "job-bad-commit")["message"]


def test_a_restart_ends_unfinished_jobs_and_removes_their_containers(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    embassy = make_embassy(tpm)
    rig = Rig(embassy, tmp_path)
    job = rig.submit()
    rig.service.take_keys(rig.peer_of(job), wait_seconds=0)
    cid = rig.service._jobs_by_id[bytes.fromhex(job)].slot.container_id
    # The daemon dies here. The next run finds the container and the log's open job.
    again = Rig(embassy, tmp_path / "again")
    again.containers.left_over = [cid]
    report = again.service.recover()
    assert report == {"containers_removed": 1, "jobs_aborted": [job]}
    (aborted,) = again.statements(JOB_ABORTED_V1)
    assert aborted["reason"] == "job-interrupted"
    assert aborted["checked_gone"]["container"] == "inspect-404"
    assert again.service.recover()["jobs_aborted"] == []  # ended once
    with pytest.raises(NotFoundError):
        again.service.status(bytes.fromhex(job))


def test_statements_name_the_job_as_subject(rig: Rig) -> None:
    job = rig.submit()
    _, digest = _run(rig, job)
    rig.service.commit(rig.peer_of(job), bytes.fromhex(digest))
    for entry in rig.embassy.log.entries[-2:]:
        statement = parse_statement(parse_envelope(entry.data).payload)
        assert [s.name for s in statement.subjects] == [f"job:{job}"]
        assert statement.subjects[0].sha256 == hashlib.sha256(bytes.fromhex(job)).digest()
    assert json.dumps(rig.service.stats())


def drive_job_kinds(embassy: Embassy, tmp: Path) -> None:
    """Make ``embassy`` state job-started, job-destroyed and job-aborted (tests/unit/wire)."""
    rig = Rig(embassy, tmp)
    job = rig.submit()
    _, digest = _run(rig, job)
    rig.service.commit(rig.peer_of(job), bytes.fromhex(digest))
    crashed = rig.submit()
    rig.containers.exited[rig.service._jobs_by_id[bytes.fromhex(crashed)].slot.container_id] = 1
    rig.service.reap()


def test_the_status_is_canonical_json(rig: Rig) -> None:
    """No floats (the embassy's JSON has none): a done job's status encodes."""
    from embassy.wire.codec import canonical_json

    job = rig.submit()
    _, digest = _run(rig, job)
    rig.service.commit(rig.peer_of(job), bytes.fromhex(digest))
    status = rig.service.status(bytes.fromhex(job))
    assert set(status["timings_us"]) == {
        "assigned_to_keys",
        "keys_to_committed",
        "committed_to_destroyed",
    }
    canonical_json(status)
