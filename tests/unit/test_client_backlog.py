"""Both clients wait for a busy embassy (a full listen backlog) instead of failing.

With a timeout set, connect() on an AF_UNIX socket whose backlog is full fails at once with
EAGAIN: the review that replaced http.server saw 202 of 320 requests from 16 clients fail
as "daemon unreachable" that way. Here a raw listener stops accepting, its backlog is
filled, and a client must wait until it accepts again.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embassy.client import ConnectError, call
from tests.unit.daemon.httpkit import short_dir
from workload_sdk.client import EmbassyClient
from workload_sdk.errors import Unavailable
from workload_sdk.transport import connect_unix

REPLY = (
    b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
)
FILL = b"FILL"


@pytest.fixture
def directory() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def _fill_backlog(path: Path) -> list[socket.socket]:
    """Connect until the kernel refuses with EAGAIN; each filler says it is one."""
    fillers = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(str(path))
        except BlockingIOError:
            sock.close()
            return fillers
        sock.sendall(FILL)
        fillers.append(sock)
        assert len(fillers) < 64, "the backlog never filled"


def _serve_later(listener: socket.socket, go: threading.Event, served: list[bytes]) -> None:
    """Accept nothing until ``go``; then drop the fillers and answer the first real request."""
    go.wait()
    listener.settimeout(10)
    while not served:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            data = conn.recv(65536)
            if data.startswith(FILL):
                continue
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(REPLY)
            served.append(data)


def _call_embassy(path: Path) -> object:
    return call(path, "GET", "/v1/health", timeout=20)


def _call_sdk(path: Path) -> object:
    return EmbassyClient(str(path), timeout=20).health()


@pytest.mark.parametrize("client", [_call_embassy, _call_sdk], ids=["embassy", "workload_sdk"])
def test_a_client_waits_for_a_full_backlog_and_succeeds_once_accepted(
    directory: Path, client: Callable[[Path], object]
) -> None:
    path = directory / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        fillers = _fill_backlog(path)
        try:
            # The backlog really is full: a plain connect with a timeout fails at once.
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as plain:
                plain.settimeout(5)
                with pytest.raises(BlockingIOError):
                    plain.connect(str(path))

            go = threading.Event()
            served: list[bytes] = []
            server = threading.Thread(target=_serve_later, args=(listener, go, served))
            server.start()
            result: list[object] = []
            caller = threading.Thread(target=lambda: result.append(client(path)))
            caller.start()
            time.sleep(0.5)
            assert caller.is_alive()  # waiting, not failed
            assert not result
            go.set()
            caller.join(20)
            server.join(20)
        finally:
            for sock in fillers:
                sock.close()
    assert result == [{"ok": True}]
    assert served[0].startswith(b"GET /v1/health HTTP/1.1\r\n")


def test_a_socket_nobody_listens_on_yet_is_waited_for(directory: Path) -> None:
    path = directory / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))  # the file exists; connect gets ECONNREFUSED until listen()
        served: list[bytes] = []
        go = threading.Event()
        server = threading.Thread(target=_serve_later, args=(listener, go, served))
        server.start()
        timer = threading.Timer(0.4, lambda: (listener.listen(4), go.set()))
        timer.start()
        started = time.monotonic()
        try:
            assert _call_sdk(path) == {"ok": True}
        finally:
            timer.join()
            go.set()
            server.join(20)
        assert time.monotonic() - started >= 0.35


def test_a_full_backlog_that_never_drains_fails_after_the_timeout(directory: Path) -> None:
    path = directory / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        fillers = _fill_backlog(path)
        try:
            started = time.monotonic()
            with pytest.raises(BlockingIOError):
                connect_unix(str(path), 0.5)
            assert 0.45 < time.monotonic() - started < 2
            with pytest.raises(ConnectError, match="cannot connect"):
                call(path, "GET", "/v1/health", timeout=0.3)
            with pytest.raises(Unavailable, match="cannot connect") as info:
                EmbassyClient(str(path), timeout=0.3).health()
            assert info.value.code == "unavailable"
        finally:
            for sock in fillers:
                sock.close()


def test_an_absent_socket_fails_at_once(directory: Path) -> None:
    started = time.monotonic()
    with pytest.raises(FileNotFoundError):
        connect_unix(str(directory / "absent"), 10)
    with pytest.raises(ConnectError):
        call(directory / "absent", "GET", "/v1/health", timeout=10)
    assert time.monotonic() - started < 1
