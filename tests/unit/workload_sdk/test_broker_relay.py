"""The workload SDK's whole relay, over real sockets: the embassy (in-process, FakeTpm, a
fake workload) on its Unix socket, and the real key broker (the example Rego policy) on
loopback TCP or its own Unix socket. The SDK carries the bytes; both ends decide."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.broker.policy import RegoPolicy
from embassy.broker.release import Broker
from embassy.broker.service import BrokerService
from embassy.broker.store import SqliteStore
from embassy.daemon.api import Api
from embassy.daemon.runtime import Embassy
from embassy.wire.statement import WEIGHTS_KEY_DENIED_V1, WEIGHTS_KEY_RELEASED_V1
from tests.fakes import FAKE_IMAGE_DIGEST, FakeTpm
from tests.unit.conftest import MEASUREMENT, EmbassyFactory, policy_for
from tests.unit.daemon.httpkit import running, short_dir
from tests.unit.verify.conftest import sealed_workload, start_with_workload
from workload_sdk.broker import BrokerError, KeyDenied, release_weights_key
from workload_sdk.client import EmbassyClient
from workload_sdk.errors import WeightsKeyRefused

ROOT = Path(__file__).resolve().parents[3]
KEY = bytes(range(200, 232))


def _data() -> dict[str, Any]:
    data = json.loads((ROOT / "examples" / "broker" / "data.json").read_text())
    model = data["broker"]["models"]["minilm-l6"]
    model["image_digests"] = [FAKE_IMAGE_DIGEST]
    model["measurements"] = [MEASUREMENT.digest.hex()]
    data["broker"]["require_sealed"] = False  # the relay is run here before any session
    return data


@pytest.fixture
def embassy(make_embassy: EmbassyFactory, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch) -> Embassy:
    embassy = start_with_workload(make_embassy, tpm)
    monkeypatch.setattr(sealed_workload(embassy), "own_processes", True)
    return embassy


@pytest.fixture
def sockets() -> Iterator[Path]:
    with short_dir() as directory:
        yield directory


@pytest.fixture
def client(embassy: Embassy, sockets: Path) -> Iterator[EmbassyClient]:
    api = Api(embassy)
    with running(sockets / "e.sock", api, routes=api.routes, max_body_bytes=1 << 20):
        yield EmbassyClient(str(sockets / "e.sock"), timeout=10)


@pytest.fixture
def broker(tpm: FakeTpm, tmp_path: Path, sockets: Path) -> Iterator[BrokerService]:
    store = SqliteStore(tmp_path / "decisions.db")
    policy = RegoPolicy((ROOT / "examples" / "broker" / "policy.rego").read_text(), _data())
    core = Broker(
        signing_key=Ed25519PrivateKey.generate(),
        keys={("minilm-l6", "k1"): KEY},
        policy=policy,
        trust=policy_for(tpm),
        store=store,
    )
    try:
        with BrokerService(core, tcp=("127.0.0.1", 0), unix=sockets / "b.sock") as service:
            yield service
    finally:
        policy.close()
        store.close()


def _url(service: BrokerService) -> str:
    assert service.tcp_address is not None
    host, port = service.tcp_address
    return f"http://{host}:{port}"


def _kinds(embassy: Embassy) -> list[str]:
    from embassy.log.entry import EntryType, parse_entry
    from embassy.wire.statement import parse_statement

    kinds = []
    for line in (embassy.config.data_dir / "log.jsonl").read_bytes().splitlines():
        entry = parse_entry(line)
        if entry.type is EntryType.STATEMENT:
            payload = base64.b64decode(json.loads(entry.data)["payload"])
            kinds.append(parse_statement(payload).predicate_type)
    return kinds


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_the_relay_brings_the_key(
    embassy: Embassy, client: EmbassyClient, broker: BrokerService, over: str
) -> None:
    url = _url(broker) if over == "tcp" else f"unix://{broker.unix_path}"
    key = release_weights_key(client, url, "minilm-l6", "k1", "acme")
    assert isinstance(key, bytearray)
    assert bytes(key) == KEY
    assert broker.counts == {"allow": 1, "deny": 0}
    assert _kinds(embassy).count(WEIGHTS_KEY_RELEASED_V1) == 1
    assert embassy.weights.pending() == 0


def test_a_denial_carries_the_brokers_reason_and_is_stated(
    embassy: Embassy, client: EmbassyClient, broker: BrokerService
) -> None:
    with pytest.raises(KeyDenied) as denied:
        release_weights_key(client, _url(broker), "minilm-l6", "k1", "globex")
    assert denied.value.code == denied.value.reason == "model-not-for-tenant"
    assert denied.value.status == 403
    assert denied.value.statement is not None
    assert _kinds(embassy).count(WEIGHTS_KEY_DENIED_V1) == 1
    assert WEIGHTS_KEY_RELEASED_V1 not in _kinds(embassy)
    assert embassy.weights.pending() == 0  # the denial answered the request


def test_a_key_the_broker_does_not_hold_is_denied(
    client: EmbassyClient, broker: BrokerService
) -> None:
    with pytest.raises(KeyDenied) as denied:
        release_weights_key(client, _url(broker), "minilm-l6", "k9", "acme")
    assert denied.value.reason != ""
    assert denied.value.decision_id is not None


def test_the_embassy_refusing_is_the_embassys_error(
    embassy: Embassy,
    client: EmbassyClient,
    broker: BrokerService,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The embassy forgets its requests at once (as after a restart): the release finds none.
    monkeypatch.setattr(embassy.weights, "_ttl", -1.0)
    with pytest.raises(WeightsKeyRefused) as refused:
        release_weights_key(client, _url(broker), "minilm-l6", "k1", "acme")
    assert refused.value.code == "weights-request-unknown"
    assert WEIGHTS_KEY_RELEASED_V1 not in _kinds(embassy)


def test_an_unreachable_broker_and_a_bad_url(client: EmbassyClient, sockets: Path) -> None:
    with pytest.raises(BrokerError) as error:
        release_weights_key(client, f"unix://{sockets}/nobody.sock", "minilm-l6", "k1", "acme")
    assert error.value.code == "broker-unavailable"
    for url in ("ftp://broker/", "file:///etc/passwd", "http://user:pw@broker/", "broker:80"):
        with pytest.raises(ValueError, match="broker URL"):
            release_weights_key(client, url, "minilm-l6", "k1", "acme")


def test_the_relay_needs_only_the_standard_library() -> None:
    import subprocess
    import sys

    code = (
        "import sys, workload_sdk.broker; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('embassy', 'cryptography', 'numpy')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
