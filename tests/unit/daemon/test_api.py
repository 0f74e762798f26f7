"""Routing and error mapping of the socket API, without a socket."""

from __future__ import annotations

from typing import Any

import pytest

from embassy.daemon.api import Api
from embassy.daemon.http import Request, error_response, status_for
from embassy.errors import (
    ConflictError,
    EmbassyError,
    LogIntegrityError,
    NotFoundError,
    PayloadTooLargeError,
    RequestError,
    StorageError,
    TamperError,
    TpmError,
    WireFormatError,
)
from embassy.wire.codec import b64encode


class _Service:
    def __init__(self) -> None:
        self.nonces: list[bytes] = []
        self.activated: list[tuple[bytes, bytes]] = []
        self.chains: list[list[bytes]] = []

    def health(self) -> dict[str, Any]:
        return {"status": "ok"}

    def identity_document(self) -> dict[str, Any]:
        return {"v": 1}

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        self.nonces.append(nonce)
        return {"nonce": nonce.hex()}

    def log_segment(self, from_seq: int) -> dict[str, Any]:
        return {"from": from_seq}

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        self.activated.append((blob, secret))
        return b"s3cret"

    def install_ak_chain(self, chain: list[bytes], peer: object) -> dict[str, Any]:
        self.chains.append(chain)
        return {"installed": len(chain)}


def _get(path: str, query: dict[str, list[str]] | None = None) -> Request:
    return Request("GET", path, query or {}, b"")


def test_routes_reach_the_service() -> None:
    service = _Service()
    api = Api(service)
    assert api(_get("/v1/health")).body == {"status": "ok"}
    assert api(_get("/v1/evidence", {"nonce": ["ab" * 16]})).body == {"nonce": "ab" * 16}
    assert service.nonces == [bytes([0xAB]) * 16]
    assert api(_get("/v1/log", {"from": ["7"]})).body == {"from": 7}
    blob = b"\x00\x20" + bytes(32) + b"\x00\x01x"
    body = b'{"credential_blob":"%s","encrypted_secret":"%s"}' % (
        b64encode(blob).encode(),
        b64encode(bytes(256)).encode(),
    )
    assert api(Request("POST", "/v1/attestation/activate-credential", {}, body)).body == {
        "secret": b64encode(b"s3cret")
    }
    assert service.activated == [(blob, bytes(256))]
    chain = b'{"ak_certificates":["%s","%s"]}' % (
        b64encode(b"leaf").encode(),
        b64encode(b"ca").encode(),
    )
    assert api(Request("POST", "/v1/attestation/ak-certificate", {}, chain)).body == {
        "installed": 2
    }
    assert service.chains == [[b"leaf", b"ca"]]


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (_get("/v1/nope"), NotFoundError),
        (Request("POST", "/v1/health", {}, b""), RequestError),
        (_get("/v1/evidence", {"nonce": ["ab" * 15]}), RequestError),
        (_get("/v1/evidence", {"nonce": ["ab" * 65]}), RequestError),
        (_get("/v1/evidence", {"nonce": ["ab" * 16, "cd" * 16]}), RequestError),
        (_get("/v1/log", {"from": ["x"]}), RequestError),
        (Request("POST", "/v1/attestation/activate-credential", {}, b'{"a":1}'), WireFormatError),
        (
            Request(
                "POST",
                "/v1/attestation/activate-credential",
                {},
                b'{"credential_blob":"","credential_blob":""}',
            ),
            WireFormatError,
        ),
    ],
)
def test_bad_requests_raise_precise_errors(request_: Request, error: type[EmbassyError]) -> None:
    service = _Service()
    with pytest.raises(error):
        Api(service)(request_)
    assert service.nonces == []


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (b'{"ak_certificates":[]}', RequestError, "at least one"),
        (b'{"ak_certificates":"AAAA"}', WireFormatError, "expected list"),
        (b'{"ak_certificates":["AAAA"],"x":1}', WireFormatError, "x"),
        (b'{"ak_certificates":["not base64!"]}', WireFormatError, r"ak_certificates\[0\]"),
        (b'{"ak_certificates":[1]}', WireFormatError, r"ak_certificates\[0\]"),
        (b'{"ak_certificates":["AAAA","AAAA","AAAA","AAAA","AAAA"]}', WireFormatError, "more"),
    ],
)
def test_bad_ak_chains_are_refused_before_the_service(
    body: bytes, error: type[EmbassyError], message: str
) -> None:
    service = _Service()
    with pytest.raises(error, match=message):
        Api(service)(Request("POST", "/v1/attestation/ak-certificate", {}, body))
    assert service.chains == []


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (NotFoundError("x"), 404),
        (PayloadTooLargeError("x"), 413),
        (ConflictError("x"), 409),
        (RequestError("x"), 400),
        (WireFormatError("x"), 400),
        (LogIntegrityError("x"), 422),
        (TpmError("x"), 503),
        (TamperError("x"), 500),
        (StorageError("x"), 500),
        (EmbassyError("x"), 500),
    ],
)
def test_one_place_maps_errors_to_statuses(error: EmbassyError, status: int) -> None:
    assert status_for(error) == status
    response = error_response(error)
    assert response.body == {"error": {"code": error.code, "message": "x"}}
