"""The key broker's release latency and throughput, and the Rego evaluation's share.

Run from the repository root::

    .venv/bin/python -m benchmarks.broker [--requests N] [--json OUT]

An in-process embassy on a FakeTpm (a software TPM model, as the unit tests use; its
quotes are real ECDSA signatures, its identity and evidence documents real ones) with a
launched workload answers release requests; the broker (example policy, SQLite decision log
with its fsyncs, the service on a loopback TCP port) decides them. The requests are made
before the clock starts (a nonce from the broker, evidence over the request's own nonce),
so what is timed is the broker alone:

- ``release``: ``POST /v1/release`` on a fresh connection, one at a time: latency p50/p99;
- ``release x2``: two client threads at once (both cores): releases/s;
- ``rego``: the policy's evaluation inside those releases (timed by a wrapper), its share
  of the release's median;
- baselines in the same run: ``http``: ``GET /v1/broker``, a bare round trip of the same
  server; ``verify``: identity + evidence verification alone, in-process (no policy, log or
  HTTP); ``rego alone``: the evaluation in-process on the same input.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from benchmarks.stats import percentile
from embassy.broker.policy import PolicyOutcome, RegoPolicy
from embassy.broker.release import Broker, broker_trust, decide, issue_nonce
from embassy.broker.service import BrokerService
from embassy.broker.store import SqliteStore
from embassy.daemon.statement_log import QuoteBudget
from embassy.verify.api import Verifier
from embassy.weights.release import KeyRequest, ReleaseRequest
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.fakes import FAKE_IMAGE_DIGEST, FakeTpm  # noqa: E402
from tests.unit.conftest import MEASUREMENT, EmbassyFactory, policy_for  # noqa: E402
from tests.unit.verify.conftest import start_with_workload  # noqa: E402


class TimedPolicy:
    """The broker's policy, with each evaluation's duration recorded."""

    def __init__(self, inner: RegoPolicy) -> None:
        self._inner = inner
        self.sha256 = inner.sha256
        self.seconds: list[float] = []
        self._lock = threading.Lock()

    def evaluate(self, policy_input: Mapping[str, Any]) -> PolicyOutcome:
        started = time.perf_counter()
        outcome = self._inner.evaluate(policy_input)
        with self._lock:
            self.seconds.append(time.perf_counter() - started)
        return outcome


def _summary(samples: list[float]) -> dict[str, float]:
    return {
        "n": len(samples),
        "p50_ms": statistics.median(samples) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
    }


def _post(address: tuple[str, int], method: str, path: str, body: bytes | None) -> int:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def run(requests: int) -> dict[str, Any]:
    logging.disable(logging.WARNING)  # the per-request allow_software_tpm warnings
    with tempfile.TemporaryDirectory() as tmp_text:
        tmp = Path(tmp_text)
        tpm = FakeTpm(b"bench")
        factory = EmbassyFactory(tmp)
        embassy = start_with_workload(factory, tpm)
        embassy.log.evidence_quotes = QuoteBudget(1e9, 1e9)  # the embassy's limit is not timed
        data = json.loads((ROOT / "examples/broker/data.json").read_text())
        data["broker"]["require_sealed"] = False
        data["broker"]["models"]["minilm-l6"] = {
            "image_digests": [FAKE_IMAGE_DIGEST],
            "measurements": [MEASUREMENT.digest.hex()],
        }
        rego = RegoPolicy((ROOT / "examples/broker/policy.rego").read_text(), data)
        timed = TimedPolicy(rego)
        store = SqliteStore(tmp / "decisions.db")
        broker = Broker(
            signing_key=Ed25519PrivateKey.generate(),
            keys={("minilm-l6", "k1"): bytes(32)},
            policy=timed,
            trust=policy_for(tpm),
            store=store,
            nonce_ttl_s=3600,
        )
        identity = canonical_json(embassy.identity_document())
        own = keyid(embassy.keys.signing.public_key())

        def make() -> tuple[ReleaseRequest, bytes]:
            nonce, _ = issue_nonce(broker)
            req = KeyRequest("minilm-l6", "k1", "acme", "decrypt-for-load", nonce, own)
            rr = ReleaseRequest(
                req, identity, canonical_json(embassy.evidence(req.evidence_nonce()))
            )
            return rr, canonical_json(rr.to_json())

        total = 3 * requests
        prepared = [make() for _ in range(total)]
        verifier = Verifier(broker_trust(broker.trust))
        service = BrokerService(broker, tcp=("127.0.0.1", 0))
        service.start()
        try:
            address = service.tcp_address
            assert address is not None
            for _, body in prepared[:20]:  # warm up (and spend those nonces)
                _post(address, "POST", "/v1/release", body)
            prepared = prepared[20:]
            timed.seconds.clear()
            http_rtt = _timed(lambda: _post(address, "GET", "/v1/broker", None), requests)
            serial = prepared[:requests]
            latencies = []
            statuses = set()
            for _, body in serial:
                started = time.perf_counter()
                statuses.add(_post(address, "POST", "/v1/release", body))
                latencies.append(time.perf_counter() - started)
            rego_in_release = list(timed.seconds)
            parallel = prepared[requests : 2 * requests]
            halves = [parallel[0::2], parallel[1::2]]

            def worker(items: list[tuple[ReleaseRequest, bytes]]) -> None:
                for _, body in items:
                    statuses.add(_post(address, "POST", "/v1/release", body))

            threads = [threading.Thread(target=worker, args=(h,)) for h in halves]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            parallel_s = time.perf_counter() - started
        finally:
            service.stop()
        sample = prepared[2 * requests - 20 :]

        def verify_one(item: tuple[ReleaseRequest, bytes]) -> None:
            rr = item[0]
            ident = verifier.identity(rr.identity)
            verifier.evidence(ident, rr.evidence, rr.request.evidence_nonce())

        verify_s: list[float] = []
        for item in sample:
            started = time.perf_counter()
            verify_one(item)
            verify_s.append(time.perf_counter() - started)
        # The same input the releases gave the policy (from one more, in-process decision).
        facts = decide(broker, prepared[-1][0]).policy_input
        assert facts is not None
        rego_alone = _timed(lambda: rego.evaluate(facts), requests)
        rego.close()
        store.close()
        factory.close_all()
    release = _summary(latencies)
    rego_share = statistics.median(rego_in_release) / statistics.median(latencies)
    return {
        "requests": requests,
        "statuses": sorted(statuses),
        "release": release,
        "releases_per_s_serial": len(latencies) / sum(latencies),
        "releases_per_s_2_clients": len(parallel) / parallel_s,
        "rego_in_release": _summary(rego_in_release),
        "rego_share_of_release_p50": rego_share,
        "baseline_http_get": _summary(http_rtt),
        "baseline_verify": _summary(verify_s),
        "rego_alone": _summary(rego_alone),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    figures = run(args.requests)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
