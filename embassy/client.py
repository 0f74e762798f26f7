"""A minimal client for the daemon's Unix-socket API (used by the CLI and the tests)."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

from embassy.errors import EmbassyError, RequestError
from embassy.wire.codec import JsonObject, canonical_json, parse_json_object


class ConnectError(EmbassyError):
    code = "cannot-connect"


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self._path))
        except OSError as exc:
            sock.close()
            raise ConnectError(f"cannot connect to {self._path}: {exc.strerror}") from None
        self.sock = sock


class ApiError(RequestError):
    """The daemon answered with an error; ``status`` and ``code`` are its own."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


def call(
    socket_path: Path, method: str, path: str, body: JsonObject | None = None, timeout: float = 30.0
) -> JsonObject:
    """One request; returns the JSON body or raises :class:`ApiError`/``ConnectError``."""
    conn = _UnixConnection(socket_path, timeout)
    try:
        data = None if body is None else canonical_json(body)
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ConnectError(f"request to {socket_path} failed: {exc}") from None
    finally:
        conn.close()
    obj = parse_json_object(raw, "daemon response")
    if response.status >= 400:
        err = obj.get("error", {})
        raise ApiError(
            response.status, str(err.get("code", "unknown")), str(err.get("message", raw[:200]))
        )
    return obj
