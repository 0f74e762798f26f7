"""The example service receives the whole encrypted input before it asks for the seal.

The seal pauses every flow of the workload (its only link goes down), so a body read after
``client.open()`` would never arrive. Here the service runs in-process against a scripted
embassy (an ``EmbassyClient`` whose ``request`` answers locally, with the real ``Session``
on top); a request's body is sent in two parts with a pause between, and the session must
not open before the second part is in. At the moment of the seal, the raw form's
ciphertext must sit whole in the spool; afterwards the spool directory is empty.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.unit.workload_sdk.answers import ENVELOPE, INPUT_KEY, PAYLOAD_ID, SEAL, SESSION, UNSEAL
from workload_sdk.client import EmbassyClient
from workload_sdk.stream import encrypt_bytes

app = pytest.importorskip("examples.sealed_service.app")

PLAINTEXT = b"sealed words arrive whole " * 20_000  # 520 kB: several stream chunks


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _spooled(directory: Path) -> list[int]:
    """Sizes of this process's open files that live (unlinked) in ``directory``."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{directory}/"):
                sizes.append(os.fstat(int(fd)).st_size)
        except OSError:
            continue  # the listing's own descriptor, or one closed meanwhile
    return sizes


class ScriptedEmbassy(EmbassyClient):
    """The embassy's answers, given locally; records what happened, in order."""

    def __init__(self, spool_dir: Path) -> None:
        super().__init__("/nonexistent/embassy.sock", timeout=5)
        self.spool_dir = spool_dir
        self.events: list[str] = []
        self.spooled_at_seal: list[int] | None = None
        self.lock = threading.Lock()

    def request(
        self, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        with self.lock:
            if path == "/v1/sessions":
                self.events.append("open")
                self.spooled_at_seal = _spooled(self.spool_dir)
                return {
                    "session": SESSION,
                    "token": "t",
                    "deadline_unix": 1_700_000_060,
                    "input_key": _b64(INPUT_KEY),
                    "statement": _b64(SEAL),
                }
            if path == "/v1/sessions/close":
                assert body is not None
                self.events.append(f"close:{body['output_sha256']}")
                return {"statement": _b64(UNSEAL)}
            if path.startswith("/v1/log"):
                self.events.append("log")
                return {"segment": None}
            raise AssertionError(f"unexpected {method} {path}")

    def opened(self) -> bool:
        with self.lock:
            return "open" in self.events


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "spool"
    directory.mkdir()
    yield directory
    assert list(directory.iterdir()) == []


@pytest.fixture
def embassy(spool_dir: Path) -> ScriptedEmbassy:
    return ScriptedEmbassy(spool_dir)


@pytest.fixture
def service(embassy: ScriptedEmbassy, spool_dir: Path) -> Iterator[tuple[str, int]]:
    server = app.Service(
        ("127.0.0.1", 0),
        embassy,
        deadline_seconds=60,
        max_input_bytes=1 << 20,
        spool_dir=str(spool_dir),
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield server.server_address
    server.shutdown()
    thread.join()
    server.server_close()
    assert _spooled(spool_dir) == [], "the spool file is still open"


def _request(form: str) -> tuple[bytes, dict[str, str]]:
    sealed = encrypt_bytes(INPUT_KEY, PAYLOAD_ID, PLAINTEXT, chunk_size=65536)
    if form == "json":
        body = json.dumps({"envelope": ENVELOPE, "input": _b64(sealed)}).encode()
        return body, {"Content-Type": "application/json"}
    return sealed, {"X-Embassy-Envelope": _b64(json.dumps(ENVELOPE).encode())}


def _send(
    address: tuple[str, int],
    headers: dict[str, str],
    parts: list[bytes],
    length: int,
    *,
    between: Any = None,
    shut: bool = False,
) -> tuple[int, Any]:
    """POST /infer with ``Content-Length: length``, the body in ``parts``."""
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        conn.putrequest("POST", "/infer")
        for name, value in {**headers, "Content-Length": str(length)}.items():
            conn.putheader(name, value)
        conn.endheaders()
        for i, part in enumerate(parts):
            if i and between is not None:
                between()
            conn.send(part)
        if shut:
            assert conn.sock is not None
            conn.sock.shutdown(2 - 1)  # SHUT_WR: the body ends here; the answer can come
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("form", ["raw", "json"])
def test_the_session_opens_only_once_the_whole_body_is_in(
    service: tuple[str, int], embassy: ScriptedEmbassy, form: str
) -> None:
    body, headers = _request(form)
    half = len(body) // 2

    def pause() -> None:
        time.sleep(0.3)
        assert not embassy.opened(), "the session opened before the body had arrived"

    status, reply = _send(service, headers, [body[:half], body[half:]], len(body), between=pause)
    assert status == 200, reply
    output = base64.b64decode(reply["output"])
    assert output == app.summarize(PLAINTEXT)
    # Sealed, finished, then answered: the answer needs the link the seal took down.
    assert embassy.events == ["open", f"close:{hashlib.sha256(output).hexdigest()}", "log"]
    # At the seal, the raw form's ciphertext was on disk, whole; the JSON form's in memory.
    assert embassy.spooled_at_seal == ([len(body)] if form == "raw" else [])


def test_a_short_raw_body_is_refused_without_a_session(
    service: tuple[str, int], embassy: ScriptedEmbassy
) -> None:
    body, headers = _request("raw")
    status, reply = _send(service, headers, [body[:-1]], len(body), shut=True)
    assert (status, reply["error"]["code"]) == (400, "incomplete-body"), reply
    assert (
        reply["error"]["message"]
        == f"the input ended after {len(body) - 1} of its {len(body)} bytes"
    )
    assert embassy.events == []


def test_a_short_json_body_is_refused_without_a_session(
    service: tuple[str, int], embassy: ScriptedEmbassy
) -> None:
    body, headers = _request("json")
    status, reply = _send(service, headers, [body[:-1]], len(body), shut=True)
    assert (status, reply["error"]["code"]) == (400, "incomplete-body"), reply
    assert embassy.events == []


def test_a_raw_body_over_the_cap_is_refused_before_it_is_read(
    service: tuple[str, int], embassy: ScriptedEmbassy
) -> None:
    _, headers = _request("raw")
    # Nothing of the body is sent: the answer comes from Content-Length alone.
    status, reply = _send(service, headers, [], (1 << 20) + 1)
    assert (status, reply["error"]["code"]) == (413, "payload-too-large"), reply
    assert (
        reply["error"]["message"]
        == f"the input is {(1 << 20) + 1} bytes, over the cap of {1 << 20}"
    )
    assert embassy.events == []


def test_a_spool_that_cannot_be_made_is_a_precise_error_without_a_session(
    embassy: ScriptedEmbassy, tmp_path: Path
) -> None:
    server = app.Service(
        ("127.0.0.1", 0), embassy, spool_dir=str(tmp_path / "missing"), max_input_bytes=1 << 20
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        body, headers = _request("raw")
        status, reply = _send(server.server_address, headers, [body], len(body))
    finally:
        server.shutdown()
        thread.join()
        server.server_close()
    assert (status, reply["error"]["code"]) == (500, "spool-failed"), reply
    assert "cannot open the spool directory" in reply["error"]["message"]
    assert embassy.events == []


def test_a_forged_spooled_stream_closes_the_session_certifying_nothing(
    service: tuple[str, int], embassy: ScriptedEmbassy
) -> None:
    body, headers = _request("raw")
    forged = body[:-1] + bytes([body[-1] ^ 1])
    status, reply = _send(service, headers, [forged], len(forged))
    assert (status, reply["error"]["code"]) == (400, "bad-stream"), reply
    assert embassy.events == ["open", "close:None"]
