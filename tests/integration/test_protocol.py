"""The sealed-request protocol end to end, as a user lives it.

A user verifies the embassy's identity, seals an input to it, sends it to the example
workload's HTTP port (published on loopback), gets the output and its statements back, and
verifies them offline. Every hostile variant fails with its own reason.
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.cli import main
from embassy.daemon.keys import derive_keys
from embassy.payload.envelope import seal_input
from embassy.verify.identity import verify_identity_document
from tests.integration.conftest import (
    SEALED_SERVICE_ACCESS,
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    published_port,
    remove_embassy_containers,
    require,
    wait_for_http,
)

pytestmark = pytest.mark.integration
docker = pytest.importorskip("docker")

WORKLOAD = f"""
workload:
  image: {SEALED_SERVICE_IMAGE}
  ports: ["127.0.0.1:0:8080/tcp"]
{SEALED_SERVICE_ACCESS}"""


class User:
    def __init__(self, daemon: Daemon, tmp: Path) -> None:
        self.daemon, self.tmp = daemon, tmp
        self.doc = tmp / "identity.json"
        assert main(["identity", "--socket", str(daemon.socket), "--out", str(self.doc)]) == 0
        self.ca = daemon.ca_pem()
        identity = verify_identity_document(
            self.doc.read_bytes(),
            daemon.trust(insecure_any_measurement=True),
        )
        self.keys = identity.keys
        self.measurement = identity.measurement.digest.hex()
        assert identity.workload is not None
        self.binding = {
            "measurement": identity.measurement.digest,
            "launch_digest": identity.workload.launch_digest,
        }

    def policy(self) -> list[str]:
        return [
            "--identity",
            str(self.doc),
            *self.daemon.trust_flags(),
            "--allow-software-tpm",
            "--expect-measurement",
            self.measurement,
        ]

    def seal(
        self, data: bytes, keys: dict[str, Any] | None = None, **kw: Any
    ) -> tuple[dict[str, Any], bytes]:
        out = io.BytesIO()
        envelope, _ = seal_input(keys or self.keys, io.BytesIO(data), out, **{**self.binding, **kw})
        return envelope.to_json(), out.getvalue()


def _post(port: int, envelope: dict[str, Any], stream: bytes) -> tuple[int, dict[str, Any]]:
    body = json.dumps({"envelope": envelope, "input": base64.b64encode(stream).decode()}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/infer", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture
def world(daemon_factory: type[Daemon], tmp_path: Path) -> Iterator[tuple[User, int]]:
    require("docker")
    client = docker.from_env()
    ensure_sealed_service_image(client)
    daemon = daemon_factory(WORKLOAD)
    daemon.start()
    try:
        port = published_port(client, embassy_id(daemon))
        wait_for_http(port)
        yield User(daemon, tmp_path), port
    finally:
        remove_embassy_containers(client, embassy_id(daemon))
        client.close()


def test_a_sealed_request_verifies_and_every_forgery_fails(
    world: tuple[User, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    user, port = world
    secret_input = b"the quick brown fox " * 5000  # 100 kB: several stream chunks
    envelope, stream = user.seal(secret_input)
    status, reply = _post(port, envelope, stream)
    assert status == 200, reply
    output = base64.b64decode(reply["output"])
    assert json.loads(output)["words"] == 20_000
    bundle = tmp_path / "result.json"
    bundle.write_text(json.dumps(reply["result"]))
    assert (
        main(
            [
                "verify",
                "result",
                str(bundle),
                "--payload-id",
                envelope["payload_id"],
                *user.policy(),
            ]
        )
        == 0
    )

    forged = dict(reply["result"])
    forged["output"] = base64.b64encode(output.replace(b"20000", b"20001")).decode()
    bundle.write_text(json.dumps(forged))
    assert main(["verify", "result", str(bundle), *user.policy()]) == 1
    assert "result-mismatch" in capsys.readouterr().err

    bundle.write_text(json.dumps(reply["result"]))
    assert main(["verify", "result", str(bundle), "--payload-id", "00" * 16, *user.policy()]) == 1
    assert "not yours" in capsys.readouterr().err

    # The same payload again: refused, durably.
    status, again = _post(port, envelope, stream)
    assert (status, again["error"]["code"]) == (409, "payload-replayed"), again


def test_expired_and_foreign_payloads_are_refused(world: tuple[User, int]) -> None:
    user, port = world
    envelope, stream = user.seal(b"x", now=time.time() - 7200, ttl_seconds=60)
    status, reply = _post(port, envelope, stream)
    assert (status, reply["error"]["code"]) == (400, "payload-expired"), reply

    other = derive_keys(secrets.token_bytes(32)).public_json()
    envelope, stream = user.seal(b"x", keys=other)
    status, reply = _post(port, envelope, stream)
    assert (status, reply["error"]["code"]) == (400, "wrong-embassy"), reply

    # Wrapped to another embassy's key while claiming this one: it does not open.
    envelope, stream = user.seal(b"x", keys={**other, "signing": user.keys["signing"]})
    status, reply = _post(port, envelope, stream)
    assert (status, reply["error"]["code"]) == (400, "bad-payload"), reply

    # Sealed for another embassy measurement (code, config) or another workload, on the
    # same keys: each refused with its own code, before anything is unwrapped.
    envelope, stream = user.seal(b"x", measurement=bytes(32))
    status, reply = _post(port, envelope, stream)
    assert (status, reply["error"]["code"]) == (400, "payload-wrong-measurement"), reply
    envelope, stream = user.seal(b"x", launch_digest=bytes(32))
    status, reply = _post(port, envelope, stream)
    assert (status, reply["error"]["code"]) == (400, "payload-wrong-workload"), reply

    # After all that, the workload is unsealed and serves a good request.
    envelope, stream = user.seal(b"still works", suite="x25519")
    assert _post(port, envelope, stream)[0] == 200
