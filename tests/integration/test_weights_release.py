"""Encrypted weights end to end: the real daemon, swtpm, example workload and key broker.

The example image carries the model encrypted only. The workload cannot embed anything
until the broker, judging the embassy's real evidence by its Rego policy, releases the key
to the embassy, which hands it to the workload it launched. Each denial has its own reason
and a logged, signed decision; a replayed release request is refused.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from embassy.log.segment import parse_segment
from embassy.verify.identity import verify_identity_document
from embassy.verify.segment import verify_segment
from embassy.wire.codec import canonical_json
from tests.integration.conftest import (
    SEALED_SERVICE_GID,
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    published_port,
    remove_embassy_containers,
    require,
    wait_for_http,
)
from tests.integration.model_broker import (
    MODEL_KEY,
    ModelBroker,
    broker_env,
    free_port,
    gateway,
    image_digest,
    load_model,
    measurement,
    wait_for_model,
)

RELEASED = "urn:embassy:predicate:weights-key-released:v1"
DENIED = "urn:embassy:predicate:weights-key-denied:v1"


class Setup:
    def __init__(self, daemon: Daemon, client: Any, broker: ModelBroker, port: int) -> None:
        self.daemon, self.client, self.broker, self.port = daemon, client, broker, port
        self.image = image_digest(client, SEALED_SERVICE_IMAGE)
        self.measurement = measurement(daemon)

    def allowing(self, **changes: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {"images": [self.image], "measurements": [self.measurement]}
        fields.update(changes)
        return self.broker.data(**fields)

    def embed_status(self) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/embed",
            data=json.dumps({"envelope": {}, "input": ""}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def statements(self) -> list[Any]:
        from embassy.client import call

        doc = call(self.daemon.socket, "GET", "/v1/identity")
        identity = verify_identity_document(
            canonical_json(doc), self.daemon.trust(insecure_any_measurement=True)
        )
        segment = parse_segment(call(self.daemon.socket, "GET", "/v1/log?from=0")["segment"])
        verified = verify_segment(segment, identity.segment_keys, allow_software_tpm=True)
        return [s.statement for s in verified.statements]


@pytest.fixture
def setup(daemon_factory: type[Daemon], tmp_path: Path) -> Iterator[Setup]:
    require("docker")
    client = docker.from_env()
    ensure_sealed_service_image(client)
    assert MODEL_KEY.exists(), "examples/sealed_service/build.sh makes the model owner's key"
    broker_port = free_port()
    daemon = daemon_factory(
        f'workload:\n  image: {SEALED_SERVICE_IMAGE}\n  ports: ["127.0.0.1:0:8080/tcp"]\n'
        + broker_env(broker_port)
        + f'socket_group: "{SEALED_SERVICE_GID}"\n'
    )
    daemon.start()
    broker = ModelBroker(tmp_path / "owner", daemon, gateway(client, daemon), broker_port)
    broker.root.mkdir()
    broker.init()
    try:
        port = published_port(client, embassy_id(daemon))
        wait_for_http(port)
        yield Setup(daemon, client, broker, port)
    finally:
        broker.stop()
        remove_embassy_containers(client, embassy_id(daemon))
        client.close()


def test_the_model_loads_only_once_the_broker_releases_its_key(setup: Setup) -> None:
    # No broker yet: the encrypted model is useless to the workload.
    assert wait_for_model(setup.port, state="waiting", timeout=30)["state"] == "waiting"
    status, reply = setup.embed_status()
    assert (status, reply["error"]["code"]) == (503, "model-not-released")

    # Each denial, with its own reason, logged and signed; the model stays sealed away.
    cases = [
        ("image-not-allowed", setup.allowing(images=["sha256:" + "00" * 32])),
        ("measurement-not-allowed", setup.allowing(measurements=["00" * 32])),
        ("model-not-for-tenant", setup.allowing(tenants={"acme": [], "globex": ["minilm-l6"]})),
        ("not-sealed", setup.allowing(require_sealed=True)),
    ]
    for reason, data in cases:
        setup.broker.serve(data)
        status = load_model(setup.port)
        assert status["state"] == "denied", status
        assert status["last_release"] == {"decision": "deny", "reason": reason}
    assert setup.embed_status()[0] == 503

    # Granted: the key reaches the embassy, then the workload, which decrypts the model.
    setup.broker.serve(setup.allowing())
    status = load_model(setup.port)
    assert status["state"] == "loaded", status
    assert status["encrypted"] is True
    assert setup.embed_status()[0] != 503  # now it is a (bad) request to a loaded model

    decisions = setup.broker.decisions()  # `broker log --verify`: chained and signed
    assert [d["reason"] for d in decisions] == [r for r, _ in cases] + [None]
    assert [d["decision"] for d in decisions] == ["deny"] * len(cases) + ["allow"]
    assert {d["embassy_keyid"] for d in decisions} == {decisions[0]["embassy_keyid"]}

    statements = setup.statements()
    released = [s for s in statements if s.predicate_type == RELEASED]
    denied = [s for s in statements if s.predicate_type == DENIED]
    assert len(released) == 1
    assert released[0].body["model_id"] == "minilm-l6"
    assert released[0].body["decision_id"] == decisions[-1]["decision_id"]
    assert released[0].body["workload"]["image_digest"] == setup.image
    assert [s.body["reason"] for s in denied] == [r for r, _ in cases]
    # The key itself is nowhere in the embassy's log or data.
    key = bytes.fromhex(Path(MODEL_KEY).read_text().strip())
    for path in setup.daemon.data_dir.rglob("*"):
        if path.is_file() and not path.is_socket():
            assert key not in path.read_bytes()
            assert key.hex().encode() not in path.read_bytes()


_REPLAY = """
import json, sys, urllib.request
from workload_sdk.client import EmbassyClient
from examples.sealed_service.model_slot import broker_url
url = broker_url(sys.argv[1])
def post(path, body):
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
_, nonce = post("/v1/nonce", {})
client = EmbassyClient("/run/embassy/embassy.sock")
request = client.weights_request(model_id="minilm-l6", key_id="k1", tenant="acme",
                                 operation="decrypt-for-load", nonce=nonce["nonce"])
first = post("/v1/release", request)
second = post("/v1/release", request)
print(json.dumps({"first": first, "second": second}))
"""


def test_a_replayed_release_request_is_refused(setup: Setup) -> None:
    setup.broker.serve(setup.allowing())
    wait_for_model(setup.port)
    [workload] = setup.client.containers.list(
        filters={
            "label": [f"org.embassy.id={embassy_id(setup.daemon)}", "org.embassy.role=workload"]
        }
    )
    code, out = workload.exec_run(
        ["python3", "-c", _REPLAY, f"http://gateway:{setup.broker.port}"],
        workdir="/app",
        user="10001:10001",
    )
    assert code == 0, out.decode()
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["first"][0] == 200
    assert result["first"][1]["type"] == "embassy-weights-release"
    status, denial = result["second"]
    assert status == 403
    assert denial["reason"] == "nonce-replayed"
    reasons = [d["reason"] for d in setup.broker.decisions()]
    assert reasons[-2:] == [None, "nonce-replayed"]


def test_the_wrong_key_cannot_load_the_model(setup: Setup, tmp_path: Path) -> None:
    """A broker that holds another key for the model releases it; the workload's decrypt
    fails on the first chunk's tag and nothing is loaded."""
    wrong = tmp_path / "wrong.key"
    wrong.write_text("ab" * 32)
    wrong.chmod(0o600)
    setup.broker.stop()
    other = ModelBroker(tmp_path / "other", setup.daemon, setup.broker.host, setup.broker.port)
    other.key_file = wrong
    other.root.mkdir()
    other.init()
    other.serve(setup.allowing())
    try:
        status = load_model(setup.port)
    finally:
        other.stop()
    assert status["state"] == "error", status
    assert "wrong key" in status["error"] or "key" in status["error"], status
    assert setup.embed_status()[0] == 503
