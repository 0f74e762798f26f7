"""HTTP/1.1 + JSON over a Unix socket: the daemon's only listener.

This is the one place where an :class:`EmbassyError` becomes an HTTP status. A sealed
workload is the likeliest client, so the protocol is read as hostile input (ADR 0008):

- h11 parses; this module adds what h11 leaves to its user: a body limit checked before the
  body is read, one strictly decimal Content-Length, no Transfer-Encoding, a bounded target
  and head, and a deadline per request;
- every reply, protocol errors included, is ``{"error": {"code", "message"}}`` JSON, and a
  message never repeats the request's bytes;
- the log gets, per request, the method (or "other"), the matched route (or "unmatched"),
  the status and the time: never the path, query, headers or body, which are bytes a sealed
  workload chooses and so a channel out of the seal;
- a handler or protocol failure never stops the server: an unexpected exception is logged
  (where, not its message) and answered 500 with no detail.

The socket, the worker pool and peer credentials are in :mod:`embassy.daemon.http_server`.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import h11

from embassy.config import HttpLimits
from embassy.daemon.http_server import (
    Connection,
    Peer,
    SocketServer,
    log_request,
    log_traceback,
)
from embassy.errors import (
    ActivationError,
    ConflictError,
    EmbassyError,
    ForbiddenError,
    InstructionSignatureError,
    JobFailedError,
    MethodNotAllowedError,
    NotFoundError,
    NotOwnerError,
    PayloadTooLargeError,
    PolicyError,
    RateLimitedError,
    RequestError,
    SealError,
    StorageError,
    TpmError,
    UnboundPayloadError,
    VerificationError,
    WireFormatError,
    WorkloadError,
    WrongMeasurementError,
    WrongWorkloadError,
)
from embassy.wire.codec import canonical_json

_LOG = logging.getLogger(__name__)

__all__ = [
    "Handler",
    "Peer",
    "Request",
    "Response",
    "UnixHttpServer",
    "ascii_decimal",
    "error_response",
    "status_for",
]

# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[EmbassyError], int], ...] = (
    (NotFoundError, 404),
    (MethodNotAllowedError, 405),
    (PayloadTooLargeError, 413),
    (RateLimitedError, 429),
    (ForbiddenError, 403),
    (InstructionSignatureError, 403),
    (NotOwnerError, 403),
    (PolicyError, 403),
    (ConflictError, 409),
    # A payload for another measurement or workload, or of the unbound version 1: 400 as
    # wrong-embassy (the request is for another embassy, not a conflict of a session's).
    (WrongMeasurementError, 400),
    (WrongWorkloadError, 400),
    (UnboundPayloadError, 400),
    (RequestError, 400),
    (WireFormatError, 400),
    (ActivationError, 422),
    (JobFailedError, 422),
    (VerificationError, 422),
    (TpmError, 503),
    (SealError, 503),
    (WorkloadError, 503),
    (StorageError, 500),
)

MAX_HEAD_BYTES = 16 * 1024
MAX_TARGET_BYTES = 8 * 1024
MAX_QUERY_FIELDS = 16
MAX_MESSAGE_CHARS = 1024
MAX_DECIMAL_DIGITS = 18  # below 2**63: no Content-Length or query number is ever huge
_HEAD_CHUNK = 8 * 1024
_BODY_CHUNK = 64 * 1024
SERVED_METHODS = frozenset({"GET", "POST"})
# Methods the log may name; any other token is logged as "other".
KNOWN_METHODS = frozenset(
    {"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "CONNECT"}
)
_DECIMAL = re.compile(f"[0-9]{{1,{MAX_DECIMAL_DIGITS}}}")
_DECIMAL_BYTES = re.compile(_DECIMAL.pattern.encode("ascii"))
_RETRY_AFTER = frozenset({429, 503})

# h11's messages that carry none of the request's bytes, as we word them.
_H11_MESSAGES = {
    "Missing mandatory Host: header": "HTTP/1.1 requires one Host header",
    "Found multiple Host: headers": "more than one Host header",
    "conflicting Content-Length headers": "more than one Content-Length",
    "bad Content-Length": "Content-Length must be 1 to 18 ASCII digits",
    "illegal request line": "malformed request line",
    "no request line received": "malformed request line",
    "continuation line at start of headers": "malformed header block",
    "peer unexpectedly closed connection": "the request ended early",
    "Only Transfer-Encoding: chunked is supported": "Transfer-Encoding is not accepted",
    "multiple Transfer-Encoding headers": "Transfer-Encoding is not accepted",
    "Illegal method characters": "malformed method",
    "Illegal target characters": "malformed request target",
}


def status_for(error: EmbassyError) -> int:
    for cls, status in _STATUS:
        if isinstance(error, cls):
            return status
    return 500


def ascii_decimal(text: str) -> int | None:
    """``text`` as an int if it is 1 to 18 ASCII digits, else None.

    Not ``str.isdigit``/``int``: those take '²' and Arabic-Indic digits, signs, spaces and
    underscores, and ``int`` raises ValueError past 4,300 digits.
    """
    return int(text) if _DECIMAL.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    # Who connected (SO_PEERCRED at accept); None where the platform cannot tell.
    peer: Peer | None = None


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: dict[str, Any] = field(default_factory=dict)
    # A body that is not JSON (GET /metrics: Prometheus' text format): sent as is, with
    # its own Content-Type, instead of ``body``.
    raw: tuple[str, bytes] | None = None


Handler = Callable[[Request], Response]


def _bounded(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE_CHARS else message[:MAX_MESSAGE_CHARS] + "…"


def error_response(error: EmbassyError) -> Response:
    return Response(
        status_for(error), {"error": {"code": error.code, "message": _bounded(error.message)}}
    )


_INTERNAL_MESSAGE = "internal error (see daemon log)"
_JSON = "application/json"


def _internal() -> Response:
    return Response(500, {"error": {"code": "internal", "message": _INTERNAL_MESSAGE}})


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


class _Refuse(Exception):
    """Answer with this error and close: the request cannot be read any further."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class _Gone(Exception):
    """The client went away (or stopped reading): close without an answer."""


@dataclass(slots=True)
class _Seen:
    """What the log may say about a request, learned as it is read."""

    method: str = "other"
    route: str = "unmatched"
    head_only: bool = False
    answered: bool = False  # response bytes went out: too late for another answer


def _bad(message: str) -> _Refuse:
    return _Refuse(400, "bad-request", message)


def _from_h11(exc: h11.RemoteProtocolError, conn: h11.Connection) -> _Refuse:
    if exc.error_status_hint == 431:
        buffered, _ = conn.trailing_data
        line_end = buffered.find(b"\n")
        if line_end < 0 or line_end > MAX_TARGET_BYTES + 32:
            return _Refuse(414, "uri-too-long", f"request line over {MAX_TARGET_BYTES} bytes")
        return _Refuse(431, "headers-too-large", f"request head over {MAX_HEAD_BYTES} bytes")
    return _bad(_H11_MESSAGES.get(str(exc), "malformed HTTP/1.1 request"))


def _next_event(conn: h11.Connection) -> object:
    """h11's next event, its protocol errors turned into this server's refusals."""
    try:
        return conn.next_event()
    except h11.RemoteProtocolError as exc:
        raise _from_h11(exc, conn) from None


def _content_length(head: bytes) -> int | None:
    """The one Content-Length of a raw request head, strictly decimal; None if absent.

    Read from the raw bytes because h11 merges repeated equal values ("5, 5" or two
    lines), which this server refuses: one message, one reading.
    """
    values = [
        line.partition(b":")[2].strip(b" \t\r")
        for line in head.split(b"\n")
        if line[:15].lower() == b"content-length:"
    ]
    if not values:
        return None
    if len(values) > 1:
        raise _bad("more than one Content-Length")
    if not _DECIMAL_BYTES.fullmatch(values[0]):
        raise _bad("Content-Length must be 1 to 18 ASCII digits")
    return int(values[0])


def parse_query(text: str) -> dict[str, list[str]]:
    try:
        return parse_qs(
            text, keep_blank_values=True, errors="strict", max_num_fields=MAX_QUERY_FIELDS
        )
    except ValueError:  # too many fields, or percent-escapes that are not UTF-8
        raise _bad(f"malformed query (at most {MAX_QUERY_FIELDS} UTF-8 fields)") from None


class UnixHttpServer(SocketServer):
    """The daemon's HTTP/1.1 server: h11 over :class:`SocketServer`'s socket and workers."""

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        max_body_bytes: int,
        timeout_seconds: float,
        limits: HttpLimits | None = None,
        socket_group: str | None = None,
        routes: Iterable[str] = (),
        idle_timeout_seconds: float | None = None,
    ) -> None:
        limits = HttpLimits() if limits is None else limits
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self._routes = frozenset(routes)
        super().__init__(
            path,
            timeout_seconds=timeout_seconds,
            backlog=limits.backlog,
            workers=limits.workers,
            max_connections=limits.max_connections,
            socket_group=socket_group,
            idle_timeout_seconds=idle_timeout_seconds,
        )

    def refusal(self, status: int, code: str, message: str) -> bytes:
        body = canonical_json({"error": {"code": code, "message": message}})
        lines = [
            f"HTTP/1.1 {status} {_phrase(status)}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if status in _RETRY_AFTER:
            lines.append("Retry-After: 1")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body

    def handle_connection(self, conn: Connection) -> bool:
        if conn.state is None:
            conn.state = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        h: h11.Connection = conn.state
        while True:
            if not self._exchange(conn, h):
                return False
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE:
                return False
            h.start_next_cycle()
            pending, ended = h.trailing_data
            if not pending:
                return not ended  # idle: wait for the next request off this thread
            # Pipelined bytes are already here: serve them on this worker.

    # -- one request and its response ----------------------------------------------------

    def _exchange(self, conn: Connection, h: h11.Connection) -> bool:
        """Read one request and answer it; False when the connection must close."""
        started = time.monotonic()
        seen = _Seen()
        try:
            request = self._read_request(conn, h, started + self.timeout_seconds, seen)
            if request is None:
                return False
            conn.fresh = False
            status = self._respond(conn, h, request, seen)
        except _Refuse as refuse:
            conn.fresh = False
            self._send_refusal(conn, refuse, seen)
            log_request(seen.method, seen.route, refuse.status, time.monotonic() - started)
            return False
        except _Gone:
            return False
        except Exception as exc:  # a failure of this layer: still answered, still serving
            log_traceback(f"http: {seen.method} {seen.route}: protocol failure", exc)
            if not seen.answered:
                self._send_refusal(conn, _Refuse(500, "internal", _INTERNAL_MESSAGE), seen)
            log_request(seen.method, seen.route, 500, time.monotonic() - started)
            return False
        log_request(seen.method, seen.route, status, time.monotonic() - started)
        return True

    def _recv(self, conn: Connection, deadline: float, size: int) -> bytes:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise self._timed_out()
        conn.sock.settimeout(remaining)
        try:
            return conn.sock.recv(size)
        except TimeoutError:
            raise self._timed_out() from None
        except OSError:
            raise _Gone from None

    def _timed_out(self) -> _Refuse:
        return _Refuse(
            408, "request-timeout", f"request not received within {self.timeout_seconds:g} s"
        )

    def _read_head(
        self, conn: Connection, h: h11.Connection, deadline: float
    ) -> tuple[h11.Request, bytes] | None:
        """The next request's head event and raw bytes; None if the client closed first."""
        head = bytearray(h.trailing_data[0])
        while True:
            event = _next_event(h)
            if event is h11.NEED_DATA:
                data = self._recv(conn, deadline, _HEAD_CHUNK)
                h.receive_data(data)
                head += data
            elif isinstance(event, h11.ConnectionClosed):
                return None
            elif isinstance(event, h11.Request):
                return event, bytes(head[: len(head) - len(h.trailing_data[0])])
            else:
                raise _bad("malformed HTTP/1.1 request")

    def _read_request(
        self, conn: Connection, h: h11.Connection, deadline: float, seen: _Seen
    ) -> Request | None:
        got = self._read_head(conn, h, deadline)
        if got is None:
            return None
        event, raw_head = got
        method = event.method.decode("ascii")  # h11 let only token characters through
        seen.method = method if method in KNOWN_METHODS else "other"
        seen.head_only = method == "HEAD"
        path, query_text = self._check_target(event, raw_head)
        seen.route = path if path in self._routes else "unmatched"
        if method not in SERVED_METHODS:
            raise _Refuse(405, "method-not-allowed", "only GET and POST are served")
        self._check_body_length(method, event, raw_head)
        query = parse_query(query_text)
        if h.client_is_waiting_for_100_continue:
            self._send(conn, h.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = self._read_body(conn, h, deadline)
        return Request(method, path, query, body, conn.peer)

    @staticmethod
    def _check_target(event: h11.Request, raw_head: bytes) -> tuple[str, str]:
        """The request's path and query text, once version, target and head are in bounds."""
        if event.http_version not in (b"1.0", b"1.1"):
            raise _bad("only HTTP/1.0 and HTTP/1.1 are served")
        if len(event.target) > MAX_TARGET_BYTES:
            raise _Refuse(414, "uri-too-long", f"request target over {MAX_TARGET_BYTES} bytes")
        if len(raw_head) > MAX_HEAD_BYTES:
            raise _Refuse(431, "headers-too-large", f"request head over {MAX_HEAD_BYTES} bytes")
        target = event.target.decode("ascii")  # h11 let only visible ASCII through
        if not target.startswith("/"):
            raise _bad("the request target must be a path")
        path, _, query_text = target.partition("?")
        return path, query_text

    def _check_body_length(self, method: str, event: h11.Request, raw_head: bytes) -> None:
        """Refuse a body that is not one strictly decimal Content-Length within the limit.

        h11 then frames the body by that same length.
        """
        if any(name == b"transfer-encoding" for name, _ in event.headers):
            raise _bad("Transfer-Encoding is not accepted; send Content-Length")
        length = _content_length(raw_head)
        if length is None:
            if method == "POST":
                raise _Refuse(411, "length-required", "a POST needs a Content-Length")
            return
        if length > self.max_body_bytes:
            # Not read: the connection closes instead of draining a body it will not use.
            raise _Refuse(
                413, "payload-too-large", f"bodies are limited to {self.max_body_bytes} bytes"
            )

    def _read_body(self, conn: Connection, h: h11.Connection, deadline: float) -> bytes:
        body = bytearray()
        while True:
            event = _next_event(h)
            if event is h11.NEED_DATA:
                h.receive_data(self._recv(conn, deadline, _BODY_CHUNK))
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise _bad("malformed request body")

    def _call(self, request: Request, seen: _Seen) -> tuple[int, bytes, str]:
        try:
            response = self.handler(request)
        except EmbassyError as exc:
            response = error_response(exc)
        except Exception as exc:
            log_traceback(f"http: {seen.method} {seen.route} failed", exc)
            response = _internal()
        if response.raw is not None and 200 <= response.status <= 599:
            return response.status, response.raw[1], response.raw[0]
        try:
            data = canonical_json(response.body)
        except (TypeError, ValueError) as exc:
            log_traceback(f"http: {seen.method} {seen.route} gave an unusable response", exc)
            return 500, canonical_json(_internal().body), _JSON
        if not 200 <= response.status <= 599:
            _LOG.error("http: %s %s answered a non-final status", seen.method, seen.route)
            return 500, canonical_json(_internal().body), _JSON
        return response.status, data, _JSON

    def _respond(self, conn: Connection, h: h11.Connection, request: Request, seen: _Seen) -> int:
        conn.busy = True
        try:
            status, data, content_type = self._call(request, seen)
        finally:
            conn.busy = False
        headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(data))),
        ]
        if status in _RETRY_AFTER:
            headers.append(("Retry-After", "1"))
        try:
            out = h.send(h11.Response(status_code=status, headers=headers, reason=_phrase(status)))
            out = (out or b"") + (h.send(h11.Data(data=data)) or b"")
            out += h.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError as exc:
            log_traceback(f"http: {seen.method} {seen.route}: cannot frame the response", exc)
            raise _Gone from None
        seen.answered = True
        self._send(conn, out)
        return status

    def _send(self, conn: Connection, data: bytes | None) -> None:
        conn.sock.settimeout(self.timeout_seconds)
        try:
            conn.sock.sendall(data or b"")
        except OSError:  # the client left or stopped reading
            raise _Gone from None

    def _send_refusal(self, conn: Connection, refuse: _Refuse, seen: _Seen) -> None:
        data = self.refusal(refuse.status, refuse.code, refuse.message)
        if seen.head_only:  # a reply to HEAD has no body, whatever it says
            data = data.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        try:
            self._send(conn, data)
            conn.sock.shutdown(socket.SHUT_WR)
        except (_Gone, OSError):
            pass
