"""An example sealed workload: an HTTP service that computes over a user's sealed input.

Runs in the workload container as ``python3 /app/app.py`` (Debian bookworm's python3 and
python3-cryptography; ``workload_sdk`` sits next to this file in ``/app``). Routes:

- ``GET /health``: the service is up, and whether its embassy answers.
- ``POST /infer``: a sealed request, in one of two forms:

  * JSON ``{"envelope": {...}, "input": "<base64 of the encrypted stream>"}``;
  * the encrypted stream itself as the body (``Content-Length`` required, at most
    ``MAX_INPUT_BYTES``), with the envelope as base64 of its JSON in the
    ``X-Embassy-Envelope`` header. The body is spooled to local disk as it arrives
    (``workload_sdk.spool``: the ciphertext only, O(chunk) memory), never held whole in
    memory.

  The service first receives the WHOLE encrypted input, and only then opens a session (the
  embassy seals the workload, then unwraps the input key): the seal takes the workload's
  network link down, so this very connection is paused until the unseal, and a body read
  after the seal would never arrive (the session would run into its deadline). Sealed, it
  decrypts and authenticates the stream from memory (JSON form) or from the spool (raw
  form), computes its output, and finishes the session with the output, which the embassy
  certifies by its SHA-256 in the unseal statement. Only then, unsealed, does it write its
  answer on the paused connection: ``{"output", "seal_statement", "unseal_statement",
  "output_sha256", "session"}`` (bytes as base64). Any failure after the session opened
  closes it certifying nothing.
- ``POST /embed``: a sealed request to the model (all-MiniLM-L6-v2, a numpy forward pass;
  present when the image carries the model, see ``build.sh``): JSON ``{"envelope",
  "input", "actions"?}``, the input a UTF-8 prompt; the whole body is read before the
  seal, as above. ``actions`` (base64) is relayed to the embassy untouched: the
  authorities' instructions sealed under the payload's action key.
  While sealed, the hidden states of the layers named by ``CAPTURE_LAYERS`` (default
  ``6``, the last) are written as activation files for the embassy to meter. The output is
  canonical JSON ``{"dim","embedding_f32le","model","tokens"}`` (the normalised sentence
  embedding as base64 of little-endian float32). It answers as ``/infer`` does, plus
  ``readings`` (meter readings asked for by read instructions, base64).
- ``POST /baseline``: BENCHMARKS ONLY, not a production path. The same computation over a
  PLAINTEXT body (``Content-Length`` required), with no embassy involved: no session, no
  seal, no decryption. It answers ``{"output"}`` (base64), the bytes ``/infer`` would give
  for the same plaintext. ``benchmarks/protocol.py`` times it against ``/infer`` to show
  what the protocol adds to a request.

The computation is a placeholder for the model: canonical JSON of the plaintext's length,
SHA-256, whitespace-separated word count and its first 200 characters upper-cased.

Environment: ``EMBASSY_SOCKET`` (default ``/run/embassy/embassy.sock``), ``PORT`` (8080),
``SESSION_DEADLINE_SECONDS`` (300), ``MAX_JSON_BODY_BYTES`` (64 MiB), ``MAX_INPUT_BYTES``
(the raw form's cap, 4 GiB), ``SPOOL_DIR`` (where the raw form's ciphertext is spooled;
default ``TMPDIR``, else ``/tmp``: the container's own disk), ``MODEL_DIR``
(``/app/model``), ``CAPTURE_LAYERS`` (comma-separated layer indexes, ``6``).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import hashlib
import io
import json
import logging
import os
import sys
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, BinaryIO, cast

from examples.sealed_service.model_slot import ModelSlot, from_environment
from workload_sdk.client import EmbassyClient, Result
from workload_sdk.errors import (
    EmbassyError,
    PayloadRejected,
    SealFailed,
    Unavailable,
)
from workload_sdk.spool import SpoolError, spool_input
from workload_sdk.stream import StreamError

_LOG = logging.getLogger("sealed_service")
PREVIEW_CHARS = 200
ENVELOPE_HEADER = "X-Embassy-Envelope"
MAX_ENVELOPE_HEADER = 16 * 1024
CONNECTION_TIMEOUT = 600.0
BASELINE_CHUNK = 64 * 1024  # the stream's default chunk size: /infer's unit of work
DEFAULT_MAX_INPUT = 4 * 1024 * 1024 * 1024
# A spool failure as the caller sees it: (HTTP status, error code).
SPOOL_ERRORS = {
    "too-large": (413, "payload-too-large"),
    "short-input": (400, "incomplete-body"),
    "no-space": (507, "insufficient-storage"),
    "storage": (500, "spool-failed"),
}


class RequestProblem(Exception):
    """The caller's request is unusable; refused before any session is opened."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# ---------------------------------------------------------------------------------------
# The computation (the model arrives later): one pass, O(1) memory.


class Summary:
    """Deterministic facts about the plaintext, fed chunk by chunk."""

    def __init__(self) -> None:
        self._size = 0
        self._sha256 = hashlib.sha256()
        self._words = 0
        self._in_word = False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._preview = ""

    def update(self, chunk: bytes) -> None:
        if not chunk:
            return
        self._size += len(chunk)
        self._sha256.update(chunk)
        self._words += len(chunk.split())
        if self._in_word and not chunk[:1].isspace():
            self._words -= 1  # a word cut by the chunk boundary was counted twice
        self._in_word = not chunk[-1:].isspace()
        if len(self._preview) < PREVIEW_CHARS:
            # 4 bytes per character at most: no need to decode further than that.
            self._preview += self._decoder.decode(chunk[: 4 * PREVIEW_CHARS])

    def output(self) -> bytes:
        """The output bytes: canonical JSON (sorted keys, no spaces, UTF-8)."""
        preview = (self._preview + self._decoder.decode(b"", final=True))[:PREVIEW_CHARS]
        value = {
            "bytes": self._size,
            "sha256": self._sha256.hexdigest(),
            "words": self._words,
            "upper_preview": preview.upper(),
        }
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def summarize(plaintext: bytes) -> bytes:
    """:class:`Summary` of bytes in memory (what a user can recompute to compare)."""
    summary = Summary()
    summary.update(plaintext)
    return summary.output()


# ---------------------------------------------------------------------------------------
# The sealed request


def run_sealed(
    client: EmbassyClient, envelope: Mapping[str, Any], src: BinaryIO, deadline_seconds: int
) -> tuple[bytes, Result, str]:
    """Open a session, decrypt ``src`` through :class:`Summary`, finish with its output.

    ``src`` must hold the whole input already (in memory or spooled): once the session is
    open, the workload's network is paused and nothing more can arrive.
    """
    with client.open(envelope, deadline_seconds=deadline_seconds) as session:
        summary = Summary()
        for chunk in session.decrypt(src):
            summary.update(chunk)
        # The stream authenticated to its last chunk: only now is the output trustworthy.
        output = summary.output()
        result = session.finish(output)
    return output, result, session.session_id


MODEL_NAME = "all-MiniLM-L6-v2"
MAX_PROMPT_BYTES = 64 * 1024


def run_embed(
    client: EmbassyClient,
    model: Any,
    request: Mapping[str, Any],
    deadline_seconds: int,
    layers: tuple[int, ...],
) -> tuple[bytes, Result, str, tuple[bytes, ...]]:
    """A sealed prompt through the model, its chosen layers written for the embassy.

    ``request`` is the whole JSON body, received before this is called: the seal pauses the
    connection it came on.
    """
    from examples.minilm.model import MiniLM  # numpy only on this route

    assert isinstance(model, MiniLM)
    envelope = request["envelope"]
    actions = None if request.get("actions") is None else _b64decode(request["actions"], "actions")
    src = io.BytesIO(_b64decode(request.get("input"), "input"))
    with client.open(envelope, deadline_seconds=deadline_seconds, actions=actions) as session:
        prompt = b"".join(session.decrypt(src))
        if len(prompt) > MAX_PROMPT_BYTES:
            raise RequestProblem(413, "payload-too-large", "the prompt is over 64 KiB")
        try:
            text = prompt.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestProblem(400, "bad-request", "the prompt is not UTF-8") from None
        writer = session.activations()

        def capture(name: str, array: Any) -> None:
            writer.write(name, array)

        ids = model.encode(text)
        hidden = model.forward(ids, capture, layers)
        embedding = model.pool(hidden)
        value = {
            "dim": int(embedding.shape[0]),
            "embedding_f32le": _b64(embedding.astype("<f4").tobytes()),
            "model": MODEL_NAME,
            "tokens": len(ids),
        }
        output = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
        result = session.finish(output)
    return output, result, session.session_id, session.readings


def _embassy_status(error: EmbassyError) -> int:
    if isinstance(error, PayloadRejected):
        return error.status if error.status is not None and 400 <= error.status < 500 else 400
    if isinstance(error, SealFailed | Unavailable):
        return 503
    return 502  # the embassy refused what the service asked: the service's fault, upstream


class _BodyReader(io.RawIOBase):
    """Exactly ``length`` bytes of the request body, read through ``rfile`` on demand."""

    def __init__(self, rfile: BinaryIO, length: int) -> None:
        super().__init__()
        self._rfile = rfile
        self.remaining = length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.remaining == 0 or len(view) == 0:
            return 0
        data = self._rfile.read(min(len(view), self.remaining))
        if not data:
            raise ConnectionError(f"request body ended {self.remaining} bytes early")
        view[: len(data)] = data
        self.remaining -= len(data)
        return len(data)


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _b64decode(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise RequestProblem(400, "bad-request", f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestProblem(400, "bad-request", f"{what} is not valid base64") from None


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        raise RequestProblem(400, "bad-request", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise RequestProblem(400, "bad-request", f"{what} must be a JSON object")
    return value


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sealed-service/1"
    server: Service

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(CONNECTION_TIMEOUT)

    def log_message(self, format: str, *args: Any) -> None:
        _LOG.info("%s " + format, self.address_string(), *args)

    def _reply(self, status: int, body: Mapping[str, Any]) -> None:
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, **extra: Any) -> None:
        try:
            self._reply(status, {"error": {"code": code, "message": message, **extra}})
        except (ConnectionError, TimeoutError) as exc:
            # E.g. a client that sent a short body and hung up: nobody is left to tell.
            _LOG.warning("could not send the error %s (%s): %s", status, code, exc)

    def do_GET(self) -> None:
        if self.path == "/model":
            self._reply(200, self.server.model.status())
            return
        if self.path != "/health":
            self._error(404, "not-found", f"no route {self.path!r}")
            return
        try:
            embassy = self.server.client.health()
        except EmbassyError as exc:
            self._reply(503, {"status": "degraded", "embassy": exc.to_json()})
            return
        self._reply(200, {"status": "ok", "embassy": embassy})

    def do_POST(self) -> None:
        if self.path == "/model/load":
            # Ask the broker again now (e.g. after its policy changed); its decision as JSON.
            self.close_connection = True  # no body is read
            self._reply(200, self.server.model.load())
            return
        if self.path not in ("/infer", "/baseline", "/embed"):
            self.close_connection = True  # the body is not read
            self._error(404, "not-found", f"no route {self.path!r}")
            return
        try:
            if self.path == "/baseline":
                self._baseline()
            elif self.path == "/embed":
                self._embed()
            else:
                self._infer()
        except RequestProblem as exc:
            self.close_connection = True
            self._error(exc.status, exc.code, exc.message)
        except SpoolError as exc:
            # Refused before any session was opened: the payload is not spent.
            self.close_connection = True
            status, code = SPOOL_ERRORS.get(exc.reason, (500, "spool-failed"))
            self._error(status, code, exc.message)
        except StreamError as exc:
            self.close_connection = True
            self._error(400, "bad-stream", exc.message, reason=exc.reason)
        except EmbassyError as exc:
            self.close_connection = True
            self._error(_embassy_status(exc), exc.code, exc.message, source="embassy")
        except (ConnectionError, TimeoutError) as exc:
            _LOG.warning("request body lost: %s", exc)
            self.close_connection = True
        except Exception:
            _LOG.exception("unexpected failure in %s", self.path)
            self.close_connection = True
            self._error(500, "internal", "internal error")

    def _content_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise RequestProblem(411, "length-required", "send Content-Length, not chunked")
        text = self.headers.get("Content-Length")
        if text is None or not text.isdigit():
            raise RequestProblem(411, "length-required", "a Content-Length is required")
        return int(text)

    def _baseline(self) -> None:
        """The benchmarks' baseline: :class:`Summary` of a plaintext body, no embassy.

        Not a production path: the input arrives in the clear and nothing is sealed or
        certified. It reads the body in chunks of the stream's size, as ``/infer`` does.
        """
        length = self._content_length()
        body = _BodyReader(cast(BinaryIO, self.rfile), length)
        summary = Summary()
        buffer = bytearray(BASELINE_CHUNK)
        view = memoryview(buffer)
        while body.remaining:
            n = body.readinto(view)
            summary.update(bytes(view[:n]))
        self._reply(200, {"output": _b64(summary.output())})

    def _embed(self) -> None:
        length = self._content_length()
        model = self.server.model.get()
        if model is None:
            if self.server.model.encrypted:
                raise RequestProblem(
                    503,
                    "model-not-released",
                    "the model is encrypted and its key was not released (GET /model says why)",
                )
            raise RequestProblem(404, "no-model", "this image carries no model")
        if length > self.server.max_json_body:
            raise RequestProblem(413, "payload-too-large", "JSON body too large")
        # The whole body before run_embed opens the session (which pauses this connection).
        request = _json_object(self._read_body(length), "request body")
        if not isinstance(request.get("envelope"), dict):
            raise RequestProblem(400, "bad-request", "'envelope' must be a JSON object")
        output, result, session_id, readings = run_embed(
            self.server.client,
            model,
            request,
            self.server.deadline_seconds,
            self.server.layers,
        )
        self._reply(
            200,
            {
                "output": _b64(output),
                "session": session_id,
                "readings": [_b64(r) for r in readings],
                **result.to_json(),
                "result": result.bundle(output),
            },
        )

    def _read_body(self, length: int) -> bytes:
        """The whole body of ``length`` bytes (already capped by the caller) in memory."""
        data = self.rfile.read(length)
        if len(data) != length:
            raise RequestProblem(
                400, "incomplete-body", f"the body ended after {len(data)} of its {length} bytes"
            )
        return data

    def _infer(self) -> None:
        length = self._content_length()
        header = self.headers.get(ENVELOPE_HEADER)
        src: BinaryIO
        if header is not None:
            if len(header) > MAX_ENVELOPE_HEADER:
                raise RequestProblem(431, "bad-request", f"{ENVELOPE_HEADER} is too large")
            envelope = _json_object(_b64decode(header, ENVELOPE_HEADER), ENVELOPE_HEADER)
            # The whole body, to disk, before the session: once sealed, this connection is
            # paused and would deliver nothing more. Exactly Content-Length bytes are read
            # (a short body is refused unsealed); data after the stream's last chunk fails
            # authentication, so an over-long stream is no use either.
            src = cast(
                BinaryIO,
                spool_input(
                    self.rfile,
                    length,
                    max_bytes=self.server.max_input_bytes,
                    directory=self.server.spool_dir,
                ),
            )
        else:
            if length > self.server.max_json_body:
                raise RequestProblem(
                    413,
                    "payload-too-large",
                    f"JSON body over {self.server.max_json_body} bytes: send the stream raw "
                    f"with {ENVELOPE_HEADER}",
                )
            # The whole body in memory (at most max_json_body) before the session.
            request = _json_object(self._read_body(length), "request body")
            if not isinstance(request.get("envelope"), dict):
                raise RequestProblem(400, "bad-request", "'envelope' must be a JSON object")
            envelope = request["envelope"]
            src = io.BytesIO(_b64decode(request.get("input"), "input"))
        with src:  # the spool's disk space is freed as soon as the session is over
            output, result, session_id = run_sealed(
                self.server.client, envelope, src, self.server.deadline_seconds
            )
        # Unsealed again: the answer goes out on the connection the seal paused.
        self._reply(
            200,
            {
                "output": _b64(output),
                "session": session_id,
                **result.to_json(),
                "result": result.bundle(output),
            },
        )


class Service(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        client: EmbassyClient,
        *,
        deadline_seconds: int = 300,
        max_json_body: int = 64 * 1024 * 1024,
        max_input_bytes: int = DEFAULT_MAX_INPUT,
        spool_dir: str | None = None,
        model: ModelSlot | None = None,
        layers: tuple[int, ...] = (6,),
    ) -> None:
        super().__init__(address, Handler)
        self.client = client
        self.deadline_seconds = deadline_seconds
        self.max_json_body = max_json_body
        self.max_input_bytes = max_input_bytes
        self.spool_dir = spool_dir
        # No model directory at all: a slot that says so (GET /model: "absent").
        self.model = (
            model
            if model is not None
            else ModelSlot("/nonexistent", client, broker="", model_id="", key_id="", tenant="")
        )
        self.layers = layers


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    client = EmbassyClient(os.environ.get("EMBASSY_SOCKET", "/run/embassy/embassy.sock"))
    service = Service(
        ("", int(os.environ.get("PORT", "8080"))),
        client,
        deadline_seconds=int(os.environ.get("SESSION_DEADLINE_SECONDS", "300")),
        max_json_body=int(os.environ.get("MAX_JSON_BODY_BYTES", str(64 * 1024 * 1024))),
        max_input_bytes=int(os.environ.get("MAX_INPUT_BYTES", str(DEFAULT_MAX_INPUT))),
        spool_dir=os.environ.get("SPOOL_DIR") or None,
        model=from_environment(os.environ.get("MODEL_DIR", "/app/model"), client),
        layers=tuple(int(i) for i in os.environ.get("CAPTURE_LAYERS", "6").split(",") if i),
    )
    _LOG.info("listening on port %d, embassy at %s", service.server_address[1], client.socket_path)
    service.model.load_in_background()
    try:
        service.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        service.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
