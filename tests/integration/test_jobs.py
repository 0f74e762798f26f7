"""Job mode on a real dockerd, under runc and gVisor (runsc-nonet), from the attacker's side.

Each job runs examples/job_service/job.py in a container the embassy made for it alone:
probed from inside, it has no link but loopback; a marker it writes is in no later job and
nowhere in the host's container storage once it is destroyed; two jobs at once see only
their own spool; a daemon killed mid-job leaves no job container after its restart and
the log says how the job ended; a late, crashing, oversized or lying job ends with its
error and a statement; a result opens with the user's reply key only; and
``embassy verify job`` checks the whole story offline.

Network rule: none. Job containers have no network at all.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.client import ApiError, call
from embassy.jobs.result import ReplyPrivateKey, open_result
from embassy.payload.envelope import SUITE_X25519, make_payload
from embassy.verify.api import Verifier
from embassy.verify.identity import VerifiedIdentity
from embassy.verify.job import jobs_launch
from embassy.wire.codec import b64encode, canonical_json
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import JOB_ABORTED_V1, parse_statement
from tests.integration.conftest import (
    IN_CI,
    REPO,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    require,
)
from workload_sdk.stream import encrypt_stream

pytestmark = pytest.mark.integration
docker = pytest.importorskip("docker")

JOB_IMAGE = "embassy/job-service:latest"
JOB_ACCESS = 'socket_group: "10001"\n'
USER = ReplyPrivateKey.generate(SUITE_X25519)


def jobs_config(runtime: str | None, **extra: int) -> str:
    limits = {"pool_size": 2, "deadline_seconds": 20, "max_output_bytes": 65536, **extra}
    lines = [f"  image: {JOB_IMAGE}", '  user: "10001:10001"']
    if runtime is not None:
        lines.append(f"  runtime: {runtime}")
    lines += [f"  {k}: {v}" for k, v in limits.items()]
    return JOB_ACCESS + "jobs:\n" + "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    c = docker.from_env()
    ensure_sealed_service_image(c)
    subprocess.run(["bash", str(REPO / "examples/job_service/build.sh")], check=True, timeout=600)
    yield c
    c.close()


def _runtime_ready(client: Any, runtime: str | None) -> None:
    if runtime is None:
        return
    require("runsc")
    if runtime not in (client.info().get("Runtimes") or {}):
        msg = f"dockerd has no {runtime} runtime: run scripts/ensure_dockerd.sh"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


class User:
    """The user's side: a verified identity, payloads with a reply key, results."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.verifier = Verifier(daemon.trust(insecure_any_measurement=True))
        document = canonical_json(call(daemon.socket, "GET", "/v1/identity"))
        self.identity: VerifiedIdentity = self.verifier.identity(document)
        self.launch = jobs_launch(self.identity)

    def submit(self, request: dict[str, Any], reply: ReplyPrivateKey = USER) -> str:
        envelope, input_key, _ = make_payload(
            self.identity.keys,
            measurement=self.identity.measurement.digest,
            launch_digest=self.launch.launch_digest,
            suite=SUITE_X25519,
            reply_key=reply.public,
        )
        sealed = io.BytesIO()
        encrypt_stream(
            input_key, envelope.payload_id, io.BytesIO(json.dumps(request).encode()), sealed
        )
        body = {"payload": envelope.to_json(), "input": b64encode(sealed.getvalue())}
        return str(call(self.daemon.socket, "POST", "/v1/jobs", body)["job"])

    def wait(self, job: str, timeout: int = 60) -> dict[str, Any]:
        return call(self.daemon.socket, "GET", f"/v1/jobs/{job}?wait=50", timeout=timeout)

    def run(self, request: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Submit, wait, verify the bundle and open the result."""
        status = self.wait(self.submit(request))
        assert status["state"] == "done", status
        bundle = canonical_json(status["result"])
        verified = self.verifier.job(self.identity, bundle, reply_key=USER)
        assert verified.plaintext is not None
        return status, verified


def _cleanup(client: Any, daemon: Daemon) -> None:
    """After a daemon the test killed: its warm containers and their tmpfs spools."""
    from embassy.jobs.containers import unmount_spool

    daemon.cleanup()
    for container in _job_containers(client, daemon):
        container.remove(force=True, v=True)
    spools = daemon.data_dir / "jobs"
    for spool in spools.iterdir() if spools.is_dir() else ():
        unmount_spool(spool)


def _job_containers(client: Any, daemon: Daemon) -> list[Any]:
    return client.containers.list(
        all=True,
        filters={"label": [f"org.embassy.id={embassy_id(daemon)}", "org.embassy.role=job"]},
    )


@pytest.fixture(scope="module", params=[None, "runsc-nonet"], ids=["runc", "runsc"])
def world(
    request: pytest.FixtureRequest, client: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Daemon, User]]:
    require("swtpm", "swtpm_setup")
    _runtime_ready(client, request.param)
    daemon = Daemon(Path(tmp_path_factory.mktemp("jobs")), jobs_config(request.param))
    daemon.start()
    try:
        yield daemon, User(daemon)
    finally:
        daemon.stop()
        left = _job_containers(client, daemon)
        _cleanup(client, daemon)
        assert left == []  # a clean stop destroys the warm ones


def test_a_job_is_sealed_from_birth_and_verified_destroyed(
    world: tuple[Daemon, User], client: Any
) -> None:
    daemon, user = world
    status, verified = user.run({"op": "probe"})
    probe = json.loads(verified.plaintext)
    # Probed from inside: loopback only, both ways of asking the kernel.
    assert probe["sys_class_net"] == ["lo"]
    assert probe["proc_net_dev"] == ["lo"]
    assert probe["uid"] == 10001
    assert probe["job_dir"] == ["input"]  # its own spool: its input, nothing of anyone else
    assert "sealed-from-birth" in verified.checks
    assert "destroyed-checked-gone" in verified.checks
    assert verified.network == "none"
    assert verified.runtime == user.launch.runtime
    # And the container really is gone.
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(verified.container_id)
    assert not (daemon.data_dir / "jobs" / verified.container_id).exists()
    # Another user's reply key does not open the result.
    binding = None
    for envelope in status["result"]["statements"]:
        body = parse_statement(parse_envelope(base64.b64decode(envelope)).payload).body
        binding = body.get("result_key_binding", binding)
    with pytest.raises(Exception, match="another user's reply key"):
        open_result(status["result"], ReplyPrivateKey.generate(SUITE_X25519), binding)
    # The demo's computation.
    _, summary = user.run({"text": "two words"})
    assert json.loads(summary.plaintext)["words"] == 2


def _storage_holding(marker: bytes) -> list[str]:
    """Files under Docker's storage whose bytes contain ``marker`` (writable layers, logs)."""
    roots = [
        p for p in ("/var/lib/docker/overlay2", "/var/lib/docker/containers") if os.path.isdir(p)
    ]
    out = subprocess.run(
        ["grep", "-rlaF", "--", marker.decode(), *roots],
        capture_output=True,
        timeout=300,
        check=False,
    )
    return out.stdout.decode().split()


def test_nothing_of_a_job_survives_it(world: tuple[Daemon, User]) -> None:
    _, user = world
    marker = os.urandom(12).hex()
    _, first = user.run({"op": "marker", "marker": marker})
    assert json.loads(first.plaintext)["seen_before"] == []
    _, second = user.run({"op": "marker", "marker": os.urandom(12).hex()})
    assert json.loads(second.plaintext)["seen_before"] == []  # not the first job's marker
    assert _storage_holding(marker.encode()) == []


def test_two_jobs_at_once_see_only_their_own_spool(world: tuple[Daemon, User]) -> None:
    daemon, user = world
    sleeper = user.submit({"op": "sleep", "seconds": 3})
    spools = [p.name for p in (daemon.data_dir / "jobs").iterdir()]
    _, peek = user.run(
        {
            "op": "peek",
            "paths": [
                "/job",
                *(f"/job/../{name}" for name in spools),
                *(str(daemon.data_dir / "jobs" / name) for name in spools),
                str(daemon.data_dir),
            ],
        }
    )
    seen = json.loads(peek.plaintext)
    assert seen.pop("/job") == ["input"]
    for path, what in seen.items():
        assert str(what).startswith("refused"), (path, what)
    assert user.wait(sleeper)["state"] == "done"


@pytest.mark.parametrize(
    ("request_", "code"),
    [
        ({"op": "crash"}, "job-crashed"),
        ({"op": "big", "bytes": 200_000}, "job-output-too-large"),
        ({"op": "bad-commit"}, "job-bad-commit"),
    ],
    ids=["crash", "oversized", "bad-commit"],
)
def test_a_job_that_fails_ends_with_its_error_and_a_statement(
    world: tuple[Daemon, User], client: Any, request_: dict[str, Any], code: str
) -> None:
    daemon, user = world
    job = user.submit(request_)
    status = user.wait(job)
    assert status["state"] == "failed"
    assert status["error"]["code"] == code
    aborted = _aborted(daemon, job)
    assert aborted["reason"] == code
    assert aborted["checked_gone"]["container"] == "inspect-404"
    with pytest.raises(docker.errors.NotFound):
        client.containers.get(aborted["container_id"])


def _aborted(daemon: Daemon, job: str) -> dict[str, Any]:
    found = []
    for line in (daemon.data_dir / "log.jsonl").read_bytes().splitlines():
        entry = json.loads(line)
        if entry["type"] != "statement":
            continue
        statement = parse_statement(parse_envelope(base64.b64decode(entry["data"])).payload)
        if statement.predicate_type == JOB_ABORTED_V1 and statement.body["job"] == job:
            found.append(dict(statement.body))
    assert len(found) == 1, found
    return found[0]


def test_host_only_routes_refuse_a_job_and_job_routes_refuse_the_host(
    world: tuple[Daemon, User],
) -> None:
    daemon, _ = world
    for path in ("/v1/jobs/self/key", "/v1/jobs/self/commit"):
        with pytest.raises(ApiError) as err:
            call(daemon.socket, "POST", path, {"output_sha256": "00" * 32})
        assert err.value.status == 403


def test_past_its_deadline_a_job_is_killed(
    client: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require("swtpm", "swtpm_setup")
    daemon = Daemon(
        Path(tmp_path_factory.mktemp("jobs-deadline")),
        jobs_config(None, deadline_seconds=2, pool_size=1),
    )
    daemon.start()
    try:
        user = User(daemon)
        job = user.submit({"op": "sleep", "seconds": 30})
        status = user.wait(job)
        assert status["state"] == "failed"
        assert status["error"]["code"] == "job-deadline"
        assert _aborted(daemon, job)["keys_released"] is True
    finally:
        _cleanup(client, daemon)


def test_a_daemon_killed_mid_job_leaves_no_job_container(
    client: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    require("swtpm", "swtpm_setup")
    daemon = Daemon(Path(tmp_path_factory.mktemp("jobs-kill")), jobs_config(None, pool_size=1))
    daemon.start()
    try:
        user = User(daemon)
        job = user.submit({"op": "sleep", "seconds": 60})
        deadline = time.monotonic() + 30
        while call(daemon.socket, "GET", f"/v1/jobs/{job}")["state"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        before = {c.id for c in _job_containers(client, daemon)}
        assert before
        daemon.stop(signal.SIGKILL)
        assert {c.id for c in _job_containers(client, daemon)} == before  # left behind
        daemon.start()
        after = {c.id for c in _job_containers(client, daemon)}
        assert not after & before  # every one of them removed; only fresh warm ones
        aborted = _aborted(daemon, job)
        assert aborted["reason"] == "job-interrupted"
        assert aborted["checked_gone"]["container"] == "inspect-404"
        with pytest.raises(ApiError) as err:  # the new run does not know it: the log does
            call(daemon.socket, "GET", f"/v1/jobs/{job}")
        assert err.value.status == 404
    finally:
        _cleanup(client, daemon)
