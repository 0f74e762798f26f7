"""The workload SDK's client against a fake embassy on a real Unix socket.

The fake speaks the socket API of docs/protocol.md §3 (HTTP/1.1 + JSON, error bodies
``{"error": {"code", "message"}}``) from a thread; each test scripts its answers and reads
back exactly what the client sent.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import json
import shutil
import socket
import socketserver
import tempfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.unit.workload_sdk.answers import (
    ENVELOPE,
    INPUT_KEY,
    PAYLOAD_ID,
    SEAL,
    SEAL_SEQ,
    SESSION,
    TOKEN,
    UNSEAL,
)
from workload_sdk.client import EmbassyClient, Result
from workload_sdk.errors import (
    EmbassyError,
    NotSealed,
    PayloadRejected,
    SealFailed,
    SessionError,
    Unavailable,
    error_from_response,
)

Reply = tuple[int, Any]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _error(status: int, code: str, message: str) -> Reply:
    return status, {"error": {"code": code, "message": message}}


class FakeEmbassy:
    """Routes of the embassy's socket; ``replies`` overrides a route's answer."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, Any]] = []
        self.replies: dict[str, Reply | Callable[[Any], Reply]] = {}

    def answer(self, method: str, path: str, body: Any) -> Reply:
        self.requests.append((method, path, body))
        scripted = self.replies.get(path)
        if scripted is not None:
            return scripted(body) if callable(scripted) else scripted
        if (method, path) == ("GET", "/v1/health"):
            return 200, {"status": "ok", "tpm_mode": "software"}
        if (method, path) == ("POST", "/v1/sessions"):
            return 201, {
                "session": SESSION,
                "token": TOKEN,
                "deadline_unix": 1_700_000_060,
                "input_key": _b64(INPUT_KEY),
                "statement": _b64(SEAL),
            }
        if (method, path) == ("GET", f"/v1/log?from={SEAL_SEQ}"):
            return 200, {"v": 1, "type": "embassy-log-segment", "segment": {"fake": "segment"}}
        if (method, path) == ("POST", "/v1/sessions/close"):
            if body.get("session") != SESSION:
                return _error(404, "not-found", "no such session")
            if body.get("token") != TOKEN:
                return _error(403, "forbidden", "wrong token")
            if body.get("log_from") == SEAL_SEQ and not self.close_without_log:
                return 200, {"statement": _b64(UNSEAL), "segment": {"fake": "segment"}}
            return 200, {"statement": _b64(UNSEAL)}
        return _error(404, "not-found", f"no route {path!r}")

    close_without_log = False  # an embassy from before the close carried the log segment

    def closes(self) -> list[Any]:
        return [body for _, path, body in self.requests if path == "/v1/sessions/close"]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        status, reply = self.server.fake.answer(self.command, self.path, body)
        data = reply if isinstance(reply, bytes) else json.dumps(reply).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = _serve
    do_POST = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.UnixStreamServer):
    def __init__(self, path: str, fake: FakeEmbassy) -> None:
        super().__init__(path, _Handler)
        self.fake = fake


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to ~108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="sdk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fake(sock_dir: Path) -> Iterator[FakeEmbassy]:
    embassy = FakeEmbassy()
    server = _Server(str(sock_dir / "embassy.sock"), embassy)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield embassy
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.fixture
def client(sock_dir: Path, fake: FakeEmbassy) -> EmbassyClient:
    return EmbassyClient(str(sock_dir / "embassy.sock"), timeout=5)


def test_open_and_finish_send_the_documented_json(client: EmbassyClient, fake: FakeEmbassy) -> None:
    output = b'{"answer":42}'
    with client.open(ENVELOPE, deadline_seconds=60) as session:
        assert session.session_id == SESSION
        assert session.input_key == INPUT_KEY
        assert session.seal_statement == SEAL
        assert session.deadline_unix == 1_700_000_060
        assert session.payload_id == PAYLOAD_ID
        result = session.finish(output)
    assert fake.requests[0] == (
        "POST",
        "/v1/sessions",
        {"payload": ENVELOPE, "deadline_seconds": 60},
    )
    digest = hashlib.sha256(output).digest()
    assert fake.closes() == [
        {"session": SESSION, "token": TOKEN, "output_sha256": digest.hex(), "log_from": SEAL_SEQ}
    ]
    assert not [p for _, p, _ in fake.requests if p.startswith("/v1/log")], "one round trip"
    assert result == Result(SEAL, UNSEAL, digest, {"fake": "segment"})
    assert result.bundle(output)["log"] == {"fake": "segment"}
    with pytest.raises(ValueError, match="not the output"):
        result.bundle(b"another output")
    assert result.to_json() == {
        "seal_statement": _b64(SEAL),
        "unseal_statement": _b64(UNSEAL),
        "output_sha256": digest.hex(),
    }
    assert session.closed
    assert bytes(session._key) == bytes(32), "the key is zeroed in place"
    with pytest.raises(SessionError, match="wiped"):
        _ = session.input_key


def test_finish_with_a_precomputed_digest(client: EmbassyClient, fake: FakeEmbassy) -> None:
    digest = hashlib.sha256(b"big output, hashed while streaming").digest()
    with client.open(ENVELOPE) as session:
        result = session.finish(output_sha256=digest)
    assert result.output_sha256 == digest
    assert fake.requests[0][2]["deadline_seconds"] == 300
    assert fake.closes() == [
        {"session": SESSION, "token": TOKEN, "output_sha256": digest.hex(), "log_from": SEAL_SEQ}
    ]


def test_finish_fetches_the_log_from_an_embassy_that_does_not_send_it(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    fake.close_without_log = True
    with client.open(ENVELOPE) as session:
        result = session.finish(b"out")
    assert result.log == {"fake": "segment"}
    assert [p for _, p, _ in fake.requests][-1] == f"/v1/log?from={SEAL_SEQ}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"output": b"x", "output_sha256": bytes(32)}, "exactly one"),
        ({"output_sha256": bytes(31)}, "32 bytes"),
    ],
)
def test_finish_refuses_bad_arguments_without_closing(
    client: EmbassyClient, fake: FakeEmbassy, kwargs: dict[str, Any], message: str
) -> None:
    with client.open(ENVELOPE) as session:
        with pytest.raises(ValueError, match=message):
            session.finish(**kwargs)
        assert fake.closes() == []
        assert session.input_key == INPUT_KEY
        session.finish(b"")
    assert len(fake.closes()) == 1


def test_finish_twice_is_refused(client: EmbassyClient, fake: FakeEmbassy) -> None:
    with client.open(ENVELOPE) as session:
        session.finish(b"once")
        with pytest.raises(SessionError, match="already closed") as info:
            session.finish(b"twice")
        assert info.value.code == "closed"
    assert len(fake.closes()) == 1


def test_decrypt_yields_the_plaintext_of_the_users_stream(client: EmbassyClient) -> None:
    stream = pytest.importorskip("workload_sdk.stream")
    plaintext = b"sealed words " * 20_000
    sealed = stream.encrypt_bytes(INPUT_KEY, PAYLOAD_ID, plaintext, chunk_size=4096)
    with client.open(ENVELOPE) as session:
        chunks = list(session.decrypt(io.BytesIO(sealed)))
        session.finish(b"done")
    assert len(chunks) > 1
    assert b"".join(chunks) == plaintext


def test_a_stream_for_another_payload_fails_and_closes_certifying_nothing(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    stream = pytest.importorskip("workload_sdk.stream")
    sealed = stream.encrypt_bytes(INPUT_KEY, bytes(16), b"other payload")
    with pytest.raises(stream.StreamError, match="expected"), client.open(ENVELOPE) as session:
        list(session.decrypt(io.BytesIO(sealed)))
    assert fake.closes() == [{"session": SESSION, "token": TOKEN, "output_sha256": None}]


def test_an_exception_in_the_block_closes_with_no_output_and_is_reraised(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    class Boom(Exception):
        pass

    with pytest.raises(Boom), client.open(ENVELOPE) as session:
        raise Boom
    assert fake.closes() == [{"session": SESSION, "token": TOKEN, "output_sha256": None}]
    assert session.closed
    assert bytes(session._key) == bytes(32)


def test_leaving_the_block_without_finish_closes_with_no_output(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    with client.open(ENVELOPE) as session:
        pass
    assert fake.closes() == [{"session": SESSION, "token": TOKEN, "output_sha256": None}]
    assert session.close() is None, "closing again is a no-op"
    assert len(fake.closes()) == 1


def test_close_returns_the_unseal_statement(client: EmbassyClient, fake: FakeEmbassy) -> None:
    session = client.open(ENVELOPE)
    assert session.close() == UNSEAL
    assert fake.closes() == [{"session": SESSION, "token": TOKEN, "output_sha256": None}]
    with pytest.raises(SessionError):
        session.decrypt(io.BytesIO(b""))


def test_a_failed_close_does_not_hide_the_original_exception(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    fake.replies["/v1/sessions/close"] = _error(409, "conflict", "session was aborted")
    with (
        pytest.raises(RuntimeError, match="inference crashed") as info,
        client.open(ENVELOPE),
    ):
        raise RuntimeError("inference crashed")
    notes = getattr(info.value, "__notes__", [])
    assert any("session was aborted" in note for note in notes), notes


def test_a_failed_close_on_a_clean_exit_raises(client: EmbassyClient, fake: FakeEmbassy) -> None:
    fake.replies["/v1/sessions/close"] = _error(409, "conflict", "past its deadline")
    with pytest.raises(SessionError, match="past its deadline"), client.open(ENVELOPE):
        pass


def test_the_key_and_token_are_not_in_repr_or_str(client: EmbassyClient) -> None:
    with client.open(ENVELOPE) as session:
        for text in (repr(session), str(session), f"{session}"):
            assert SESSION in text
            for secret in (INPUT_KEY.hex(), _b64(INPUT_KEY), repr(INPUT_KEY), TOKEN):
                assert secret not in text
        assert not hasattr(session, "__dict__")
        session.finish(b"")


@pytest.mark.parametrize(
    ("status", "code", "exception"),
    [
        (400, "payload-expired", PayloadRejected),
        (409, "payload-replayed", PayloadRejected),
        (400, "wrong-embassy", PayloadRejected),
        (400, "unsupported-suite", PayloadRejected),
        (422, "bad-payload", PayloadRejected),
        (400, "malformed", PayloadRejected),
        (503, "seal-failed", SealFailed),
        (403, "forbidden", SessionError),
        (404, "not-found", SessionError),
        (409, "conflict", SessionError),
        (503, "tpm-error", Unavailable),
        (500, "internal", Unavailable),
        (400, "bad-request", EmbassyError),
        (403, "policy-refused", EmbassyError),
        (404, "some-future-code", SessionError),
        (418, "some-future-code", EmbassyError),
    ],
)
def test_each_error_code_maps_to_its_exception_with_the_embassys_reason(
    client: EmbassyClient, fake: FakeEmbassy, status: int, code: str, exception: type[Exception]
) -> None:
    message = f"the embassy says {code}"
    fake.replies["/v1/sessions"] = _error(status, code, message)
    with pytest.raises(EmbassyError) as info:
        client.open(ENVELOPE)
    error = info.value
    assert type(error) is exception
    assert (error.status, error.code, error.message) == (status, code, message)
    assert message in str(error)
    assert error.to_json() == {"code": code, "message": message}
    assert fake.closes() == []


def test_not_sealed_is_seal_failed() -> None:
    assert NotSealed is SealFailed


def test_an_error_reply_without_the_embassys_body_falls_back_on_status(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    fake.replies["/v1/health"] = (502, b"<html>bad gateway</html>")
    with pytest.raises(Unavailable) as info:
        client.health()
    assert (info.value.status, info.value.code) == (502, "http-502")
    assert isinstance(error_from_response(409, {"error": "flat"}), SessionError)


def test_an_error_on_close_maps_too(client: EmbassyClient, fake: FakeEmbassy) -> None:
    fake.replies["/v1/sessions/close"] = _error(403, "forbidden", "token does not match")
    session = client.open(ENVELOPE)
    with pytest.raises(SessionError, match="token does not match") as info:
        session.finish(b"out")
    assert info.value.status == 403
    assert not session.closed, "the session is still open on the embassy: it may be retried"
    with pytest.raises(SessionError, match="wiped"):
        _ = session.input_key
    del fake.replies["/v1/sessions/close"]
    assert session.finish(b"out").unseal_statement == UNSEAL


def test_an_unusable_open_reply_closes_the_session_it_opened(
    client: EmbassyClient, fake: FakeEmbassy
) -> None:
    fake.replies["/v1/sessions"] = (
        201,
        {
            "session": SESSION,
            "token": TOKEN,
            "deadline_unix": 1,
            "input_key": "!!",
            "statement": "",
        },
    )
    with pytest.raises(EmbassyError, match="input_key is not base64") as info:
        client.open(ENVELOPE)
    assert info.value.code == "bad-response"
    assert fake.closes() == [{"session": SESSION, "token": TOKEN, "output_sha256": None}]


@pytest.mark.parametrize(
    "envelope",
    [
        {k: v for k, v in ENVELOPE.items() if k != "payload_id"},
        {**ENVELOPE, "payload_id": "zz" * 16},
        {**ENVELOPE, "payload_id": "00" * 15},
    ],
)
def test_an_envelope_without_a_usable_payload_id_is_refused_before_sealing(
    client: EmbassyClient, fake: FakeEmbassy, envelope: dict[str, Any]
) -> None:
    with pytest.raises(PayloadRejected) as info:
        client.open(envelope)
    assert (info.value.code, info.value.status) == ("malformed", None)
    assert fake.requests == []


def test_health(client: EmbassyClient, fake: FakeEmbassy) -> None:
    assert client.health()["status"] == "ok"
    assert fake.requests == [("GET", "/v1/health", None)]


def test_cannot_connect_is_unavailable(sock_dir: Path) -> None:
    client = EmbassyClient(str(sock_dir / "absent.sock"), timeout=1)
    with pytest.raises(Unavailable, match="cannot connect") as info:
        client.open(ENVELOPE)
    assert (info.value.code, info.value.status) == ("unavailable", None)


def test_a_connection_dropped_without_an_answer_is_unavailable(sock_dir: Path) -> None:
    path = sock_dir / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def drop() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)

        thread = threading.Thread(target=drop)
        thread.start()
        try:
            with pytest.raises(Unavailable, match="no answer") as info:
                EmbassyClient(str(path), timeout=5).health()
        finally:
            thread.join()
    assert info.value.code == "no-answer"


# ---------------------------------------------------------------------------------------
# The example service (examples/sealed_service/app.py) on the same fake embassy


@pytest.fixture
def service(client: EmbassyClient) -> Iterator[tuple[str, int]]:
    app = pytest.importorskip("examples.sealed_service.app")
    server = app.Service(("127.0.0.1", 0), client, deadline_seconds=60)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address
    server.shutdown()
    thread.join()
    server.server_close()


def _post(address: tuple[str, int], body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.request("POST", "/infer", body=body, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("form", ["json", "raw"])
def test_the_example_service_answers_a_sealed_request(
    service: tuple[str, int], fake: FakeEmbassy, form: str
) -> None:
    stream = pytest.importorskip("workload_sdk.stream")
    from examples.sealed_service.app import summarize

    plaintext = ("héllo sealed wörld " * 5000).encode()
    sealed = stream.encrypt_bytes(INPUT_KEY, PAYLOAD_ID, plaintext, chunk_size=1024)
    if form == "json":
        body = json.dumps({"envelope": ENVELOPE, "input": _b64(sealed)}).encode()
        headers = {"Content-Type": "application/json"}
    else:
        body = sealed
        headers = {"X-Embassy-Envelope": _b64(json.dumps(ENVELOPE).encode())}
    status, reply = _post(service, body, headers)
    assert status == 200, reply
    output = base64.b64decode(reply["output"])
    assert output == summarize(plaintext)
    summary = json.loads(output)
    assert summary == {
        "bytes": len(plaintext),
        "sha256": hashlib.sha256(plaintext).hexdigest(),
        "words": 3 * 5000,
        "upper_preview": ("HÉLLO SEALED WÖRLD " * 20)[:200],
    }
    digest = hashlib.sha256(output).hexdigest()
    assert fake.closes() == [
        {"session": SESSION, "token": TOKEN, "output_sha256": digest, "log_from": SEAL_SEQ}
    ]
    assert reply["seal_statement"] == _b64(SEAL)
    assert reply["unseal_statement"] == _b64(UNSEAL)
    assert (reply["session"], reply["output_sha256"]) == (SESSION, digest)


def test_the_example_service_relays_the_embassys_refusal(
    service: tuple[str, int], fake: FakeEmbassy
) -> None:
    fake.replies["/v1/sessions"] = _error(409, "payload-replayed", "payload already opened")
    body = json.dumps({"envelope": ENVELOPE, "input": ""}).encode()
    status, reply = _post(service, body, {})
    assert status == 409
    assert reply["error"]["code"] == "payload-replayed"
    assert reply["error"]["message"] == "payload already opened"


def test_the_example_service_refuses_a_forged_stream_certifying_nothing(
    service: tuple[str, int], fake: FakeEmbassy
) -> None:
    stream = pytest.importorskip("workload_sdk.stream")
    sealed = bytearray(stream.encrypt_bytes(INPUT_KEY, PAYLOAD_ID, b"x" * 5000, chunk_size=1024))
    sealed[-1] ^= 1
    headers = {"X-Embassy-Envelope": _b64(json.dumps(ENVELOPE).encode())}
    status, reply = _post(service, bytes(sealed), headers)
    assert status == 400
    assert reply["error"]["code"] == "bad-stream"
    assert fake.closes() == [{"session": SESSION, "token": TOKEN, "output_sha256": None}]


def test_the_example_service_refuses_a_bad_request_before_sealing(
    service: tuple[str, int], fake: FakeEmbassy
) -> None:
    status, reply = _post(service, b'{"envelope": {}, "input": "!!"}', {})
    assert (status, reply["error"]["code"]) == (400, "bad-request")
    assert fake.requests == []
