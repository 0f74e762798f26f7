"""The key broker's HTTP service (docs/protocol.md, "Key broker").

``POST /v1/nonce`` -> ``{"nonce": "<hex>", "expires_unix": N}``; ``POST /v1/release`` (a
release request) -> 200 and a release, 403 and a denial (both signed), or 400 for a request
that does not parse (logged as a ``malformed-request`` denial when its key request parses,
so it has a digest); ``GET /v1/broker`` -> the broker's public key and policy digest.
Bodies are bounded; every answer is JSON. A stdlib threaded server, on loopback TCP and/or
a Unix socket; :meth:`BrokerService.stop` stops accepting and waits for the threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from embassy.broker.release import Broker, Outcome, decide, deny_malformed, issue_nonce
from embassy.errors import EmbassyError, WireFormatError
from embassy.weights.release import (
    MAX_MESSAGE_BYTES,
    broker_keyid,
    parse_key_request,
    parse_release_request,
)
from embassy.wire.codec import b64encode, parse_json_object

_LOG = logging.getLogger(__name__)

MAX_BODY_BYTES = MAX_MESSAGE_BYTES
SOCKET_TIMEOUT_S = 30.0


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class _Handler(BaseHTTPRequestHandler):
    server_version = "embassy-broker"
    sys_version = ""
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT_S
    service: BrokerService  # set on the subclass made per service

    def log_message(self, format: str, *args: Any) -> None:
        _LOG.debug("broker http: " + format, *args)

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> bytes | None:
        """The request body, or None after answering 411/413/400."""
        length_text = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._send(411, _error("length-required", "send a Content-Length, not chunks"))
            return None
        try:
            length = int(length_text) if length_text is not None else 0
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._send(400, _error("bad-request", "Content-Length: not a length"))
            return None
        if length > self.service.max_body:
            self.close_connection = True
            self._send(
                413,
                _error("payload-too-large", f"bodies are at most {self.service.max_body} bytes"),
            )
            return None
        return self.rfile.read(length)

    def do_GET(self) -> None:
        if self.path == "/v1/broker":
            self._send(200, self.service.describe())
        elif self.path in ("/v1/nonce", "/v1/release"):
            self._send(405, _error("method-not-allowed", f"{self.path} takes POST"))
        else:
            self._send(404, _error("not-found", f"no route {self.path}"))

    def do_POST(self) -> None:
        try:
            self._post()
        except Exception as exc:
            _LOG.exception("broker: %s failed", self.path)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._send(500, _error("internal", f"the broker failed ({type(exc).__name__})"))

    def _post(self) -> None:
        if self.path not in ("/v1/nonce", "/v1/release"):
            self._send(
                405 if self.path == "/v1/broker" else 404,
                _error("not-found", f"no route POST {self.path}"),
            )
            return
        body = self._body()
        if body is None:
            return
        broker = self.service.broker
        if self.path == "/v1/nonce":
            nonce, expires = issue_nonce(broker)
            self._send(200, {"nonce": nonce.hex(), "expires_unix": expires})
            return
        try:
            request = parse_release_request(body)
        except WireFormatError as exc:
            self._send(400, self._malformed(body, exc))
            return
        outcome = decide(broker, request)
        self.service.record(outcome)
        self._send(200 if outcome.allowed else 403, outcome.answer.to_json())

    def _malformed(self, body: bytes, exc: WireFormatError) -> dict[str, Any]:
        answer = _error(exc.code, exc.message)
        try:
            request = parse_key_request(
                parse_json_object(body, "release request").get("request"), "release request.request"
            )
        except EmbassyError:
            return answer  # no key request, no digest: nothing to log it under
        outcome = deny_malformed(self.service.broker, request, f"{exc.code}: {exc.message}")
        self.service.record(outcome)
        answer["denial"] = outcome.answer.to_json()
        return answer


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    # Request threads are joined on close: stop() lets the requests in flight finish.
    daemon_threads = False
    block_on_close = True

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, _ = self.socket.accept()
        return sock, ("unix", 0)  # BaseHTTPRequestHandler wants a (host, port) pair


class BrokerService:
    """The broker's HTTP service on ``tcp`` (host, port) and/or a Unix socket path."""

    def __init__(
        self,
        broker: Broker,
        *,
        tcp: tuple[str, int] | None = ("127.0.0.1", 0),
        unix: Path | None = None,
        max_body: int = MAX_BODY_BYTES,
    ) -> None:
        if tcp is None and unix is None:
            raise ValueError("listen on TCP, a Unix socket, or both")
        self.broker = broker
        self.max_body = max_body
        self._lock = threading.Lock()
        self.counts = {"allow": 0, "deny": 0}
        handler = type("Handler", (_Handler,), {"service": self})
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path = unix
        if tcp is not None:
            server = ThreadingHTTPServer(tcp, handler)
            server.daemon_threads = False
            server.block_on_close = True
            self.tcp_address = server.server_address[:2]  # type: ignore[assignment]
            self._servers.append(server)
        if unix is not None:
            with contextlib.suppress(FileNotFoundError):
                if unix.is_socket():
                    unix.unlink()
            old = os.umask(0o117)
            try:
                self._servers.append(_UnixServer(str(unix), handler))
            finally:
                os.umask(old)

    def describe(self) -> dict[str, Any]:
        public = self.broker.signing_key.public_key()
        return {
            "v": 1,
            "type": "embassy-broker",
            "broker_keyid": broker_keyid(public),
            "public_key": b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)),
            "policy_sha256": self.broker.policy.sha256.hex(),
        }

    def record(self, outcome: Outcome) -> None:
        with self._lock:
            self.counts["allow" if outcome.allowed else "deny"] += 1

    def start(self) -> None:
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, name="broker-http", kwargs={"poll_interval": 0.2}
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight, close the sockets."""
        for server in self._servers:
            server.shutdown()
        for thread in self._threads:
            thread.join()
        for server in self._servers:
            server.server_close()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                self.unix_path.unlink()

    def __enter__(self) -> BrokerService:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
