"""The broker's HTTP service end to end on a loopback port (and a Unix socket)."""

from __future__ import annotations

import http.client
import json
import socket
from pathlib import Path
from typing import Any

from embassy.broker.decision_log import parse_entry, verify_decision_log
from embassy.broker.service import BrokerService
from embassy.weights.release import (
    RELEASE_TYPE,
    KeyRequest,
    ReleaseRequest,
    open_release,
    parse_denial,
    parse_release,
    verify_broker_signature,
)
from embassy.wire.codec import canonical_json
from tests.unit.broker.broker_fixtures import (
    WEIGHTS_KEY,
    BrokerEnv,
    broker_data,
    env,
    key_request,
    private_keys,
)

__all__ = ["env"]


def _call(
    address: tuple[str, int], method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_release_over_http(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    embassy = env.embassy()
    with BrokerService(broker, tcp=("127.0.0.1", 0)) as service:
        address = service.tcp_address
        assert address is not None
        status, info = _call(address, "GET", "/v1/broker")
        assert status == 200
        assert info["policy_sha256"] == broker.policy.sha256.hex()
        status, issued = _call(address, "POST", "/v1/nonce", b"")
        assert status == 200
        assert issued["expires_unix"] == int(env.clock.now) + 60
        request = key_request(embassy, bytes.fromhex(issued["nonce"]))
        body = canonical_json(
            ReleaseRequest(
                request,
                canonical_json(embassy.identity_document()),
                canonical_json(embassy.evidence(request.evidence_nonce())),
            ).to_json()
        )
        status, answer = _call(address, "POST", "/v1/release", body)
        assert status == 200, answer
        assert answer["type"] == RELEASE_TYPE
        release = parse_release(canonical_json(answer))
        verify_broker_signature(release, broker.signing_key.public_key())
        assert open_release(release, request, private_keys=private_keys(embassy)) == WEIGHTS_KEY
        # The same request again: the nonce is spent.
        status, answer = _call(address, "POST", "/v1/release", body)
        assert status == 403
        denial = parse_denial(canonical_json(answer))
        assert denial.reason == "nonce-replayed"
        verify_broker_signature(denial, broker.signing_key.public_key())
        assert service.counts == {"allow": 1, "deny": 1}


def test_malformed_requests(env: BrokerEnv) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    with BrokerService(broker, tcp=("127.0.0.1", 0), max_body=4096) as service:
        address = service.tcp_address
        assert address is not None
        # Not JSON: 400, nothing to log it under.
        status, answer = _call(address, "POST", "/v1/release", b"{not json")
        assert status == 400
        assert answer["error"]["code"] == "malformed"
        assert "denial" not in answer
        # A key request that parses, the rest not: 400, and a logged denial.
        request = KeyRequest("minilm-l6", "k1", "acme", "decrypt-for-load", bytes(32), "00" * 32)
        body = json.dumps(
            {"v": 1, "type": "embassy-weights-release-request", "request": request.to_json()}
        ).encode()
        status, answer = _call(address, "POST", "/v1/release", body)
        assert status == 400
        assert answer["denial"]["reason"] == "malformed-request"
        assert env.store is not None
        entries = env.store.decisions(0)
        verify_decision_log(entries, broker.signing_key.public_key())
        logged = parse_entry(entries[-1].entry).decision
        assert logged["reason"] == "malformed-request"
        assert logged["request_sha256"] == request.digest().hex()
        # Oversized: 413 before the body is read.
        status, answer = _call(address, "POST", "/v1/release", b"x" * 5000)
        assert status == 413
        assert answer["error"]["code"] == "payload-too-large"
        # Unknown route and wrong method: JSON errors too.
        assert _call(address, "GET", "/v1/nope")[0] == 404
        assert _call(address, "GET", "/v1/release")[0] == 405


def test_unix_socket(env: BrokerEnv, tmp_path: Path) -> None:
    broker = env.broker(broker_data(require_sealed=False))
    path = tmp_path / "broker.sock"
    service = BrokerService(broker, tcp=None, unix=path)
    service.start()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(b"POST /v1/nonce HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        data = b""
        while b"}" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.1 200")
        assert b'"nonce"' in data
    finally:
        service.stop()
    assert not path.exists()
