"""A minimal client for the daemon's Unix-socket API (used by the CLI and the tests).

The connection is the workload SDK's (``workload_sdk.transport``, standard library only, so
``embassy verify`` loads no daemon dependency through it): a busy daemon whose listen
backlog is full is waited for, up to the call's timeout, instead of reported unreachable.
"""

from __future__ import annotations

import http.client
from pathlib import Path

from embassy.errors import EmbassyError, RequestError
from embassy.wire.codec import JsonObject, canonical_json, parse_json_object
from workload_sdk.transport import UnixHTTPConnection


class ConnectError(EmbassyError):
    code = "cannot-connect"


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
    conn = UnixHTTPConnection(str(socket_path), timeout, host="localhost")
    try:
        try:
            conn.connect()
        except OSError as exc:
            raise ConnectError(f"cannot connect to {socket_path}: {exc.strerror or exc}") from None
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
