"""A broker over FakeTpm embassies: its keys, the example policy with test data, a SQLite
store, and helpers that make release requests the way the embassy does."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from embassy.broker.policy import RegoPolicy
from embassy.broker.release import Broker, issue_nonce
from embassy.broker.store import SqliteStore
from embassy.daemon.runtime import Embassy
from embassy.payload.envelope import HpkePrivateKey
from embassy.sessions.manager import SessionManager
from embassy.weights.release import KeyRequest, ReleaseRequest
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid
from tests.fakes import FAKE_IMAGE_DIGEST, FakeTpm, MemorySeal
from tests.unit.conftest import BOOT_PCRS, MEASUREMENT, EmbassyFactory, policy_for
from tests.unit.verify.conftest import sealed_workload, start_with_workload

ROOT = Path(__file__).resolve().parents[3]
POLICY_REGO = ROOT / "examples" / "broker" / "policy.rego"
MODEL = "minilm-l6"
KEY_ID = "k1"
TENANT = "acme"
WEIGHTS_KEY = bytes(range(100, 132))


def broker_data(**changes: Any) -> dict[str, Any]:
    """The example data document, allowing the fake workload's image and measurement."""
    data = json.loads((ROOT / "examples" / "broker" / "data.json").read_text())
    model = data["broker"]["models"][MODEL]
    model["image_digests"] = [FAKE_IMAGE_DIGEST]
    model["measurements"] = [MEASUREMENT.digest.hex()]
    data["broker"].update(changes)
    return data


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class BrokerEnv:
    tmp: Path
    tpm: FakeTpm
    make_embassy: EmbassyFactory
    clock: Clock = field(default_factory=Clock)
    store: SqliteStore | None = None
    brokers: list[Broker] = field(default_factory=list)

    def broker(
        self,
        data: dict[str, Any] | None = None,
        *,
        policy_text: str | None = None,
        keys: dict[tuple[str, str], bytes] | None = None,
        store: Any = None,
        **trust: Any,
    ) -> Broker:
        if self.store is None:
            self.store = SqliteStore(self.tmp / "decisions.db")
        text = POLICY_REGO.read_text() if policy_text is None else policy_text
        broker = Broker(
            signing_key=Ed25519PrivateKey.generate(),
            keys={(MODEL, KEY_ID): WEIGHTS_KEY} if keys is None else keys,
            policy=RegoPolicy(text, broker_data() if data is None else data, timeout_s=1.0),
            trust=policy_for(self.tpm, **trust),
            store=self.store if store is None else store,
            clock=self.clock,
        )
        self.brokers.append(broker)
        return broker

    def embassy(
        self, name: str = "embassy", tpm: FakeTpm | None = None, master: bytes | None = None
    ) -> Embassy:
        """An embassy with a workload (on the test TPM unless ``tpm``); another ``master``
        secret gives it keys of its own (every test embassy's keys derive from it)."""
        tpm = tpm or self.tpm
        if master is not None and not (self.tmp / name).exists():
            (self.tmp / name).mkdir(mode=0o700)
            (self.tmp / name / "master.sealed").write_bytes(tpm.seal(master, BOOT_PCRS))
        return start_with_workload(self.make_embassy, tpm, name)

    def close(self) -> None:
        for broker in self.brokers:
            broker.policy.close()  # type: ignore[attr-defined]
        if self.store is not None:
            self.store.close()


def session_manager(embassy: Embassy) -> SessionManager:
    """Seals and unseals the embassy's workload as the daemon would (MemorySeal)."""
    return SessionManager(
        log=embassy.log,
        seal=MemorySeal(),
        workload=sealed_workload(embassy).identity,
        token_key=bytes(32),
    )


@pytest.fixture
def env(tmp_path: Path, tpm: FakeTpm, make_embassy: EmbassyFactory) -> Iterator[BrokerEnv]:
    e = BrokerEnv(tmp_path, tpm, make_embassy)
    yield e
    e.close()


def key_request(
    embassy: Embassy,
    nonce: bytes,
    *,
    model_id: str = MODEL,
    key_id: str = KEY_ID,
    tenant: str = TENANT,
) -> KeyRequest:
    return KeyRequest(
        model_id=model_id,
        key_id=key_id,
        tenant=tenant,
        operation="decrypt-for-load",
        nonce=nonce,
        embassy_keyid=keyid(embassy.keys.signing.public_key()),
    )


def release_request(
    embassy: Embassy,
    broker: Broker,
    *,
    nonce: bytes | None = None,
    identity: dict[str, Any] | None = None,
    evidence_nonce: bytes | None = None,
    **request: Any,
) -> ReleaseRequest:
    """What the embassy answers to ``POST /v1/weights/request``: the key request, its
    identity document and evidence over the request's evidence nonce."""
    if nonce is None:
        nonce, _ = issue_nonce(broker)
    req = key_request(embassy, nonce, **request)
    evidence = embassy.evidence(evidence_nonce or req.evidence_nonce())
    return ReleaseRequest(
        req,
        canonical_json(copy.deepcopy(identity or embassy.identity_document())),
        canonical_json(evidence),
    )


def private_keys(embassy: Embassy) -> dict[str, HpkePrivateKey]:
    return {"x25519": embassy.keys.hpke_x25519, "mlkem768-x25519": embassy.keys.hpke_hybrid}
