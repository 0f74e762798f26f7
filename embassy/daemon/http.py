"""HTTP/1.1 + JSON over a Unix socket: the daemon's only listener.

This is the one place where an :class:`EmbassyError` becomes an HTTP status. Every error
reply is ``{"error": {"code": ..., "message": ...}}``. A handler failure never takes the
server down: an unexpected exception is logged and answered with a 500 that carries no
internal detail.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import socketserver
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from embassy.errors import (
    ActivationError,
    ConflictError,
    EmbassyError,
    ForbiddenError,
    InstructionSignatureError,
    MethodNotAllowedError,
    NotFoundError,
    NotOwnerError,
    PayloadTooLargeError,
    PolicyError,
    RequestError,
    SealError,
    StorageError,
    TpmError,
    VerificationError,
    WireFormatError,
    WorkloadError,
)
from embassy.wire.codec import canonical_json

_LOG = logging.getLogger(__name__)

# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[EmbassyError], int], ...] = (
    (NotFoundError, 404),
    (MethodNotAllowedError, 405),
    (PayloadTooLargeError, 413),
    (ForbiddenError, 403),
    (InstructionSignatureError, 403),
    (NotOwnerError, 403),
    (PolicyError, 403),
    (ConflictError, 409),
    (RequestError, 400),
    (WireFormatError, 400),
    (ActivationError, 422),
    (VerificationError, 422),
    (TpmError, 503),
    (SealError, 503),
    (WorkloadError, 503),
    (StorageError, 500),
)


def status_for(error: EmbassyError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[Request], Response]


def error_response(error: EmbassyError) -> Response:
    return Response(status_for(error), {"error": {"code": error.code, "message": error.message}})


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: UnixHttpServer

    def setup(self) -> None:
        super().setup()
        # A slow or stalled client must not hold a worker thread forever.
        self.connection.settimeout(self.server.timeout_seconds)

    def _reply(self, response: Response) -> None:
        data = canonical_json(response.body)
        self.send_response(response.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise RequestError("chunked bodies are not accepted; send Content-Length")
        length_text = self.headers.get("Content-Length", "0")
        if not length_text.isdigit():
            self.close_connection = True
            raise RequestError(f"bad Content-Length {length_text!r}")
        length = int(length_text)
        if length > self.server.max_body_bytes:
            # Do not read it: close the connection instead of draining a huge body.
            self.close_connection = True
            raise PayloadTooLargeError(
                f"body of {length} bytes exceeds the limit of {self.server.max_body_bytes}"
            )
        return self.rfile.read(length)

    def _handle(self) -> None:
        try:
            body = self._read_body()
            url = urlsplit(self.path)
            request = Request(self.command, url.path, parse_qs(url.query), body)
            response = self.server.handler(request)
        except EmbassyError as exc:
            response = error_response(exc)
        except Exception:
            _LOG.exception("unhandled error in %s %s", self.command, self.path)
            response = Response(
                500, {"error": {"code": "internal", "message": "internal error (see daemon log)"}}
            )
        self._reply(response)
        _LOG.info("%s %s -> %d", self.command, urlsplit(self.path).path, response.status)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, format: str, *args: Any) -> None:
        _LOG.debug("http: " + format, *args)


class UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(
        self, path: Path, handler: Handler, *, max_body_bytes: int, timeout_seconds: int
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.timeout_seconds = timeout_seconds
        self.socket_path = path
        _remove_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        old = os.umask(0o177)  # the socket is born owner-only, no window before chmod
        try:
            super().__init__(str(path), _RequestHandler)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket left by a dead daemon; refuse if another daemon still answers."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StorageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise StorageError(f"another daemon is already serving on {path}")
