"""``embassy verify job`` from the attacker's side, on a daemon run with job mode (fake
containers, real log, real keys): an honest bundle verifies and opens; every edit of it,
another user's key, another payload, a replayed or misbound payload is refused."""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import embassy.daemon.runtime as runtime
import embassy.jobs.containers as job_containers
from embassy.daemon.http_server import Peer
from embassy.daemon.runtime import Embassy
from embassy.errors import (
    EmbassyError,
    ForbiddenError,
    JobStoryError,
    LogIntegrityError,
    PayloadReplayedError,
    ResultWrongReplyKeyError,
    WrongWorkloadError,
)
from embassy.jobs.containers import OUTPUT_NAME
from embassy.jobs.result import ReplyPrivateKey
from embassy.payload.envelope import SUITE_X25519, make_payload
from embassy.verify.api import Verifier
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.job import jobs_launch
from embassy.wire.codec import canonical_json
from tests.fakes import FakeJobContainers, FakeTpm
from tests.unit.conftest import EmbassyFactory, policy_for
from workload_sdk.results import encrypt_result
from workload_sdk.stream import encrypt_stream

USER = ReplyPrivateKey.generate(SUITE_X25519)
JOBS = {"socket_group": "10001", "jobs": {"image": "job:1", "pool_size": 1}}


class World:
    def __init__(self, embassy: Embassy, containers: FakeJobContainers, tpm: FakeTpm) -> None:
        self.embassy = embassy
        self.containers = containers
        self.verifier = Verifier(policy_for(tpm))
        self.identity: VerifiedIdentity = self.verifier.identity(
            canonical_json(embassy.identity_document())
        )

    def payload(self, launch: bytes | None = None) -> tuple[dict[str, Any], bytes]:
        envelope, input_key, _ = make_payload(
            self.identity.keys,
            measurement=self.identity.measurement.digest,
            launch_digest=launch or jobs_launch(self.identity).launch_digest,
            suite=SUITE_X25519,
            reply_key=USER.public,
        )
        sealed = io.BytesIO()
        encrypt_stream(input_key, envelope.payload_id, io.BytesIO(b"{}"), sealed)
        return envelope.to_json(), sealed.getvalue()

    def run(self) -> tuple[dict[str, Any], str]:
        payload, data = self.payload()
        job = str(self.embassy.submit_job(None, payload, data)["job"])
        slot = self.embassy.jobs._jobs_by_id[bytes.fromhex(job)].slot  # type: ignore[union-attr]
        peer = Peer(pid=int(slot.container_id[:6], 16), uid=1, gid=1)
        keys = self.embassy.job_keys(peer)
        with (slot.spool / OUTPUT_NAME).open("wb") as out:
            written = encrypt_result(
                base64.b64decode(keys["result_key"]), io.BytesIO(b"the result"), out
            )
        self.embassy.job_commit(peer, bytes.fromhex(written.sha256), "")
        status = self.embassy.job_status(bytes.fromhex(job), 10)
        assert status["state"] == "done", status
        return status["result"], str(payload["payload_id"])


@pytest.fixture
def world(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> World:
    containers = FakeJobContainers(tmp_path / "spools")

    class Factory:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __getattr__(self, name: str) -> Any:
            return getattr(containers, name)

        def prepare(self) -> str:
            return containers.image_digest

    monkeypatch.setattr(job_containers, "JobContainers", Factory)
    # A container's process: the fake pid is the first 6 hex digits of its id.
    monkeypatch.setattr(
        runtime, "_owns", lambda peer, cid: peer is not None and peer.pid == int(cid[:6], 16)
    )
    embassy = make_embassy(tpm, extra=JOBS)
    return World(embassy, containers, tpm)


def test_an_honest_job_verifies_and_opens(world: World) -> None:
    bundle, payload_id = world.run()
    job = world.verifier.job(
        world.identity,
        canonical_json(bundle),
        reply_key=USER,
        payload_id=bytes.fromhex(payload_id),
    )
    assert job.plaintext == b"the result"
    assert {"sealed-from-birth", "input-key-released-once", "destroyed-checked-gone"} <= set(
        job.checks
    )
    assert job.network == "none"


def _statement(bundle: dict[str, Any], i: int) -> dict[str, Any]:
    return json.loads(base64.b64decode(bundle["statements"][i]))  # type: ignore[no-any-return]


def _edit_ciphertext(b: dict[str, Any]) -> None:
    data = bytearray(base64.b64decode(b["ciphertext"]))
    data[-1] ^= 1
    b["ciphertext"] = base64.b64encode(bytes(data)).decode()


def _swap_statements(b: dict[str, Any]) -> None:
    b["statements"] = b["statements"][:1]


def _other_job(b: dict[str, Any]) -> None:
    b["job"] = "00" * 16


def _other_digest(b: dict[str, Any]) -> None:
    b["ciphertext_sha256"] = hashlib.sha256(b"x").hexdigest()
    del b["ciphertext"]


def _forged_statement(b: dict[str, Any]) -> None:
    envelope = _statement(b, 1)
    envelope["payload"] = envelope["payload"][:-4] + "AAA="
    b["statements"][1] = base64.b64encode(canonical_json(envelope)).decode()


def _other_wrapped_key(b: dict[str, Any]) -> None:
    b["wrapped_key"]["binding"]["job"] = "11" * 16


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (_edit_ciphertext, JobStoryError),
        (_swap_statements, JobStoryError),
        (_other_job, JobStoryError),
        (_other_digest, JobStoryError),
        (_forged_statement, LogIntegrityError),
        (_other_wrapped_key, JobStoryError),
    ],
    ids=["ciphertext", "no-destroyed", "other-job", "other-digest", "forged", "wrapped-key"],
)
def test_every_edit_of_the_bundle_is_refused(
    world: World, edit: Callable[[dict[str, Any]], None], error: type[EmbassyError]
) -> None:
    bundle, _ = world.run()
    edited = copy.deepcopy(bundle)
    edit(edited)
    with pytest.raises(error):
        world.verifier.job(world.identity, canonical_json(edited), reply_key=USER)


def test_another_users_key_and_another_payload_are_refused(world: World) -> None:
    bundle, _ = world.run()
    data = canonical_json(bundle)
    with pytest.raises(ResultWrongReplyKeyError):
        world.verifier.job(world.identity, data, reply_key=ReplyPrivateKey.generate(SUITE_X25519))
    with pytest.raises(JobStoryError, match="payload_id"):
        world.verifier.job(world.identity, data, payload_id=bytes(16))


def test_a_job_payload_opens_once_and_only_for_the_jobs_launch(world: World) -> None:
    payload, data = world.payload()
    world.embassy.submit_job(None, payload, data)
    with pytest.raises(PayloadReplayedError):
        world.embassy.submit_job(None, payload, data)
    misbound, data = world.payload(launch=bytes(32))
    with pytest.raises(WrongWorkloadError):
        world.embassy.submit_job(None, misbound, data)


def test_a_job_cannot_submit_jobs(world: World) -> None:
    world.embassy.jobs._refill()  # type: ignore[union-attr]
    slot = world.embassy.jobs._warm[0]  # type: ignore[union-attr]
    payload, data = world.payload()
    with pytest.raises(ForbiddenError):
        world.embassy.submit_job(
            Peer(pid=int(slot.container_id[:6], 16), uid=1, gid=1), payload, data
        )
