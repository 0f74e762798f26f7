"""Shared by the HTTP server tests: a server on a real Unix socket, and a raw client."""

from __future__ import annotations

import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embassy.config import HttpLimits
from embassy.daemon.api import Api
from embassy.daemon.http import Handler, Peer, UnixHttpServer


class FakeService:
    """The socket API's service; anything but the cheap reads fails the test loudly (500)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.peers: list[Peer | None] = []

    def health(self) -> dict[str, Any]:
        self.calls.append("health")
        return {"status": "ok"}

    def identity_document(self) -> dict[str, Any]:
        return {"v": 1}

    def evidence(self, nonce: bytes) -> dict[str, Any]:
        return {"nonce": nonce.hex()}

    def log_segment(self, from_seq: int) -> dict[str, Any]:
        return {"from": from_seq}

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        raise AssertionError("a hostile request reached the TPM")

    def open_session(
        self,
        deadline_seconds: int,
        payload: dict[str, Any] | None = None,
        actions: bytes | None = None,
    ) -> dict[str, Any]:
        raise AssertionError("a hostile request opened a session")

    def close_session(
        self,
        session: bytes,
        token: bytes,
        output_sha256: bytes | None,
        log_from: int | None = None,
    ) -> dict[str, Any]:
        raise AssertionError("a hostile request closed a session")

    def seal_status(self) -> dict[str, Any]:
        return {"sealed": False}

    def authorize_session(self, peer: Peer | None) -> None:
        # The daemon's check of session routes by peer credentials: everyone passes here,
        # so the hostile bodies behind it are what the fuzz exercises.
        self.peers.append(peer)


@contextmanager
def short_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="h", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def running(
    path: Path,
    handler: Handler | None = None,
    *,
    routes: Iterable[str] | None = None,
    limits: HttpLimits | None = None,
    max_body_bytes: int = 4096,
    timeout_seconds: float = 5,
    socket_group: str | None = None,
    idle_timeout_seconds: float | None = None,
) -> Iterator[UnixHttpServer]:
    """A server on ``path`` serving from a thread; the real Api on a FakeService by default."""
    if handler is None:
        api = Api(FakeService())
        handler, routes = api, api.routes if routes is None else routes
    server = UnixHttpServer(
        path,
        handler,
        max_body_bytes=max_body_bytes,
        timeout_seconds=timeout_seconds,
        limits=limits,
        socket_group=socket_group,
        routes=routes or (),
        idle_timeout_seconds=idle_timeout_seconds,
    )
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after its data counts as EOF)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def exchange(path: Path, request: bytes, *, timeout: float = 10, half_close: bool = True) -> bytes:
    """Send raw bytes, then read until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        sock.sendall(request)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def parse_replies(data: bytes) -> list[Reply]:
    """Split a byte stream into HTTP/1.1 responses framed by Content-Length (strictly)."""
    replies = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"unterminated response head: {data[:200]!r}"
        lines = head.decode("ascii").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"repeated header {name}"
            headers[name.lower()] = value.strip()
        length = int(headers["content-length"])
        replies.append(Reply(int(status), headers, rest[:length]))
        assert len(rest) >= length, "response body cut short"
        data = rest[length:]
    return replies
