"""The verifier from the user's side, against the real daemon, swtpm and Docker: the workload
pinned by its image ID, a result bounded by the user's own evidence, a truncated log shown
as complete, and a result from another workload, each refused with its own reason."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.cli import main
from embassy.client import call
from embassy.wire.codec import canonical_json
from tests.integration.conftest import (
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    published_port,
    remove_embassy_containers,
    require,
    wait_for_http,
)
from tests.integration.test_protocol import WORKLOAD, User, _post

pytestmark = pytest.mark.integration
docker = pytest.importorskip("docker")


@pytest.fixture
def client() -> Iterator[object]:
    require("docker")
    client = docker.from_env()
    ensure_sealed_service_image(client)
    yield client
    client.close()


def _up(client: object, daemon: Daemon) -> int:
    daemon.start()
    port = published_port(client, embassy_id(daemon))
    wait_for_http(port)
    return port


def _evidence(daemon: Daemon, path: Path) -> str:
    nonce = secrets.token_hex(32)
    path.write_bytes(canonical_json(call(daemon.socket, "GET", f"/v1/evidence?nonce={nonce}")))
    return nonce


def _result(user: User, port: int, path: Path) -> str:
    envelope, stream = user.seal(b"count these words")
    status, reply = _post(port, envelope, stream)
    assert status == 200, reply
    path.write_text(json.dumps(reply["result"]))
    return str(envelope["payload_id"])


def test_pins_window_completeness_and_another_workload(
    daemon_factory: type[Daemon],
    client: object,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = daemon_factory(WORKLOAD)
    try:
        port = _up(client, daemon)
        user = User(daemon, tmp_path)
        image_id = client.images.get(SEALED_SERVICE_IMAGE).id  # type: ignore[attr-defined]
        launch = user.binding["launch_digest"].hex()
        pins = ["--expect-image-digest", image_id, "--expect-launch-digest", launch]

        # The identity reports the workload, and its pins hold (the image ID from Docker).
        assert main(["verify", "identity", str(user.doc), *user.policy()[2:], *pins]) == 0
        out = capsys.readouterr().out
        assert f"image digest {image_id}" in out
        assert "ok    workload-image" in out
        wrong = ["--expect-image-digest", "sha256:" + "00" * 32]
        assert main(["verify", "identity", str(user.doc), *user.policy()[2:], *wrong]) == 1
        assert "workload-mismatch: workload image digest is" in capsys.readouterr().err

        # A result bounded by the user's own evidence before sending and after receiving.
        before, after, result = tmp_path / "b.json", tmp_path / "a.json", tmp_path / "r.json"
        nonce_before = _evidence(daemon, before)
        payload = _result(user, port, result)
        nonce_after = _evidence(daemon, after)
        window = ["--before", str(before), "--before-nonce", nonce_before]
        window += ["--after", str(after), "--after-nonce", nonce_after]
        args = ["verify", "result", str(result), "--payload-id", payload, *user.policy()]
        assert main([*args, *pins, *window]) == 0
        out = capsys.readouterr().out
        for line in ("ok    identity-workload", "ok    no-restart", "ok    deadline"):
            assert line in out
        assert "the whole session lies between your two nonces" in out
        # The same window, for machines.
        assert main([*args, *pins, *window, "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        seen = report["window"]
        assert seen["before"]["nonce"] == nonce_before
        assert seen["after"]["nonce"] == nonce_after
        tpm_ms = [seen[k]["tpm"]["clock"] for k in ("before", "seal", "unseal", "after")]
        assert tpm_ms == sorted(tpm_ms)
        assert seen["bounded_tpm_ms"] == tpm_ms[3] - tpm_ms[0] >= seen["sealed_tpm_ms"] >= 0
        assert report["payload_id"] == payload
        # The evidence swapped: the "before" quote came after the seal.
        swapped = ["--before", str(after), "--before-nonce", nonce_after]
        assert main([*args, *swapped]) == 1
        assert "outside-time-window" in capsys.readouterr().err

        # A log segment fetched, then the log grows: shown complete, it is refused.
        segment = tmp_path / "segment.json"
        segment.write_bytes(canonical_json(call(daemon.socket, "GET", "/v1/log?from=0")))
        policy = user.policy()
        assert main(["verify", "log", str(segment), *policy]) == 0
        assert "entries after that are not proven absent" in capsys.readouterr().out
        _result(user, port, tmp_path / "r2.json")
        fresh = tmp_path / "fresh.json"
        nonce = _evidence(daemon, fresh)
        complete = ["--complete", "--evidence", str(fresh), "--nonce", nonce]
        assert main(["verify", "log", str(segment), *policy, *complete]) == 1
        assert "log-incomplete: the log has entries after seq" in capsys.readouterr().err

        # Restarted with another workload configuration: its result is not the identity's.
        daemon.stop()
        remove_embassy_containers(client, embassy_id(daemon))
        daemon.config_extra = WORKLOAD.replace(
            "workload:\n", 'workload:\n  env: {GREETING: "another workload"}\n', 1
        )
        port = _up(client, daemon)
        (tmp_path / "other").mkdir()
        other = User(daemon, tmp_path / "other")
        assert other.binding["launch_digest"] != user.binding["launch_digest"]
        foreign = tmp_path / "foreign.json"
        _result(other, port, foreign)
        assert main(["verify", "result", str(foreign), *user.policy()]) == 1
        err = capsys.readouterr().err
        assert "workload-mismatch" in err
        assert "the result is from another workload" in err
    finally:
        remove_embassy_containers(client, embassy_id(daemon))
