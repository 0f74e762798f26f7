"""The HTTP server on a real Unix socket: capacity, timeouts, peers, the socket file, logs."""

from __future__ import annotations

import grp
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.client import ApiError, call
from embassy.config import HttpLimits
from embassy.daemon import http
from embassy.daemon.http import Peer, Request, Response, UnixHttpServer
from embassy.daemon.http_server import start_time
from embassy.errors import ConfigError, RateLimitedError, StorageError
from tests.unit.daemon.httpkit import (
    exchange,
    parse_replies,
    read_all,
    running,
    short_dir,
)
from workload_sdk.client import EmbassyClient
from workload_sdk.errors import Unavailable

HEALTH = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture
def directory() -> Iterator[Path]:
    with short_dir() as path:
        yield path


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def _connect(path: Path, timeout: float = 10) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


def _read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response off a kept-alive connection (framed by Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed before a response"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers["content-length"])
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response"
        rest += chunk
    assert len(rest) == length, "more bytes than one response"
    return int(lines[0].split(" ")[1]), headers, rest


# -- peer and socket file ------------------------------------------------------------------


def test_the_handler_sees_the_peers_pid_uid_and_gid(directory: Path) -> None:
    seen: list[Peer | None] = []

    def handler(request: Request) -> Response:
        seen.append(request.peer)
        return Response(200, {"ok": True})

    with running(directory / "s", handler):
        assert call(directory / "s", "GET", "/x") == {"ok": True}
    assert seen == [Peer(os.getpid(), os.getuid(), os.getgid(), start_time(os.getpid()))]


def test_the_socket_is_owner_only_without_a_group(directory: Path) -> None:
    with running(directory / "s"):
        st = (directory / "s").lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    assert not (directory / "s").exists()  # removed at close


@pytest.mark.parametrize("by", ["gid", "name"])
def test_the_socket_is_group_accessible_with_socket_group(directory: Path, by: str) -> None:
    gid = os.getgid()
    group = str(gid) if by == "gid" else grp.getgrgid(gid).gr_name
    with running(directory / "s", socket_group=group):
        st = (directory / "s").lstat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid
        assert call(directory / "s", "GET", "/v1/health") == {"status": "ok"}


def test_an_unknown_group_is_a_config_error_before_any_socket(directory: Path) -> None:
    with pytest.raises(ConfigError, match="socket_group"):
        UnixHttpServer(
            directory / "s",
            lambda r: Response(200),
            max_body_bytes=1024,
            timeout_seconds=1,
            socket_group="no-such-group-embassy",
        )
    assert not (directory / "s").exists()


def test_a_dead_socket_is_replaced(directory: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(directory / "s"))  # bound, never listening: nobody answers
    with running(directory / "s"):
        assert call(directory / "s", "GET", "/v1/health") == {"status": "ok"}


def test_a_live_daemon_or_a_non_socket_is_not_replaced(directory: Path) -> None:
    with running(directory / "s"), pytest.raises(StorageError, match="already serving"):
        UnixHttpServer(
            directory / "s", lambda r: Response(200), max_body_bytes=1024, timeout_seconds=1
        )
    (directory / "f").write_text("not a socket")
    with pytest.raises(StorageError, match="not a socket"):
        UnixHttpServer(
            directory / "f", lambda r: Response(200), max_body_bytes=1024, timeout_seconds=1
        )
    assert (directory / "f").read_text() == "not a socket"


def test_a_live_daemon_with_a_full_backlog_is_not_replaced(directory: Path) -> None:
    path = directory / "s"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as busy:
        busy.bind(str(path))
        busy.listen(0)
        fillers = []
        try:
            while True:  # fill the backlog: the next connect gets EAGAIN
                filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                filler.setblocking(False)
                fillers.append(filler)
                filler.connect(str(path))
        except BlockingIOError:
            pass
        try:
            with pytest.raises(StorageError, match="refusing to replace"):
                UnixHttpServer(
                    path, lambda r: Response(200), max_body_bytes=1024, timeout_seconds=1
                )
            assert path.exists()
        finally:
            for filler in fillers:
                filler.close()


# -- connections ---------------------------------------------------------------------------


def test_keep_alive_serves_two_requests_on_one_connection(directory: Path) -> None:
    with running(directory / "s"), _connect(directory / "s") as sock:
        sock.sendall(HEALTH)
        first = _read_reply(sock)
        sock.sendall(b"GET /v1/log?from=7 HTTP/1.1\r\nHost: x\r\n\r\n")
        second = _read_reply(sock)
    assert (first[0], json.loads(first[2])) == (200, {"status": "ok"})
    assert (second[0], json.loads(second[2])) == (200, {"from": 7})
    assert "connection" not in first[1]


def test_an_idle_keep_alive_connection_holds_no_worker(directory: Path) -> None:
    limits = HttpLimits(backlog=4, workers=1, max_connections=8)
    with (
        running(directory / "s", limits=limits, timeout_seconds=5) as server,
        _connect(directory / "s") as idle,
    ):
        idle.sendall(HEALTH)
        assert _read_reply(idle)[0] == 200
        # The only worker is free while `idle` stays open.
        started = time.monotonic()
        assert call(directory / "s", "GET", "/v1/health", timeout=3) == {"status": "ok"}
        assert time.monotonic() - started < 1
        _wait_for(lambda: server.held_connections == 1)


def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(directory: Path) -> None:
    with running(directory / "s", idle_timeout_seconds=0.3) as server:
        with _connect(directory / "s") as sock:
            sock.sendall(HEALTH)
            assert _read_reply(sock)[0] == 200
            assert sock.recv(1) == b""  # closed, silently
        _wait_for(lambda: server.held_connections == 0)


def test_a_stalled_request_gets_408_and_frees_the_worker(directory: Path) -> None:
    limits = HttpLimits(backlog=4, workers=1, max_connections=8)
    with running(directory / "s", limits=limits, timeout_seconds=1):
        with _connect(directory / "s") as slow:
            slow.sendall(b"GET /v1/health HTTP/1.1\r\nHo")  # half a request, then nothing
            started = time.monotonic()
            replies = parse_replies(read_all(slow))
            waited = time.monotonic() - started
        assert [r.status for r in replies] == [408]
        assert json.loads(replies[0].body)["error"]["code"] == "request-timeout"
        assert 0.8 < waited < 3
        assert call(directory / "s", "GET", "/v1/health", timeout=3) == {"status": "ok"}


def test_a_connection_that_sends_nothing_gets_408(directory: Path) -> None:
    with running(directory / "s", timeout_seconds=0.5) as server, _connect(directory / "s") as mute:
        replies = parse_replies(read_all(mute))
        assert [r.status for r in replies] == [408]
        _wait_for(lambda: server.held_connections == 0)


def test_a_body_over_the_limit_is_refused_without_being_read(directory: Path) -> None:
    with running(directory / "s", max_body_bytes=1024, timeout_seconds=5):
        with _connect(directory / "s") as sock:
            sock.sendall(
                b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n"
            )  # the headers only: the server must answer without waiting for the body
            started = time.monotonic()
            replies = parse_replies(read_all(sock))
        assert time.monotonic() - started < 2
    assert [r.status for r in replies] == [413]
    assert json.loads(replies[0].body)["error"]["code"] == "payload-too-large"
    assert replies[0].headers["connection"] == "close"


def test_32_concurrent_clients_all_get_200_from_4_slow_workers(directory: Path) -> None:
    active = 0
    most = 0
    lock = threading.Lock()

    def slow(request: Request) -> Response:
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        time.sleep(0.02)
        with lock:
            active -= 1
        return Response(200, {"ok": True})

    limits = HttpLimits(backlog=2, workers=4, max_connections=64)
    results: list[object] = []

    def client(n: int) -> None:
        for _ in range(4):
            try:
                if n % 2:
                    results.append(call(directory / "s", "GET", "/x", timeout=30))
                else:
                    results.append(EmbassyClient(str(directory / "s"), timeout=30).health())
            except Exception as exc:  # collected, asserted below
                results.append(exc)

    with running(directory / "s", slow, limits=limits, timeout_seconds=5):
        threads = [threading.Thread(target=client, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results == [{"ok": True}] * 128
    assert most == 4  # the pool was used, and never exceeded


def test_beyond_max_connections_the_answer_is_503_json(directory: Path) -> None:
    limits = HttpLimits(backlog=8, workers=1, max_connections=2)
    with running(directory / "s", limits=limits, timeout_seconds=5) as server:
        held = [_connect(directory / "s"), _connect(directory / "s")]
        try:
            _wait_for(lambda: server.held_connections == 2)
            replies = parse_replies(exchange(directory / "s", HEALTH))
            assert [r.status for r in replies] == [503]
            assert replies[0].headers["content-type"] == "application/json"
            assert replies[0].headers["retry-after"] == "1"
            assert json.loads(replies[0].body)["error"]["code"] == "busy"
            with pytest.raises(Unavailable) as info:
                EmbassyClient(str(directory / "s"), timeout=5).health()
            assert (info.value.status, info.value.code) == (503, "busy")
        finally:
            for sock in held:
                sock.close()
        _wait_for(lambda: server.held_connections == 0)
        assert call(directory / "s", "GET", "/v1/health") == {"status": "ok"}


# -- handler failures and the status table -------------------------------------------------


def test_a_handler_crash_is_a_generic_500_and_the_server_survives(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def crash(request: Request) -> Response:
        if request.path == "/crash":
            raise KeyError("secret-" + request.body.decode())
        return Response(200, {"ok": True})

    caplog.set_level(logging.DEBUG)
    with running(directory / "s", crash, routes=["/crash"]):
        with pytest.raises(ApiError) as info:
            call(directory / "s", "POST", "/crash", {"x": "BODYBYTES"})
        assert (info.value.status, info.value.code) == (500, "internal")
        assert "secret" not in str(info.value)
        assert call(directory / "s", "GET", "/fine") == {"ok": True}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "KeyError" in logged  # where it failed is in the log...
    assert "BODYBYTES" not in logged  # ...but not the message built from the client's bytes
    assert "POST /crash -> 500" in logged


def test_a_failure_in_the_protocol_layer_is_a_500_and_the_server_survives(
    directory: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(text: str) -> dict[str, list[str]]:
        raise RuntimeError("query was " + text)

    caplog.set_level(logging.DEBUG)
    with running(directory / "s"):
        monkeypatch.setattr(http, "parse_query", broken)
        request = b"GET /v1/log?from=QUERYBYTES HTTP/1.1\r\nHost: x\r\n\r\n"
        replies = parse_replies(exchange(directory / "s", request))
        monkeypatch.undo()
        assert [r.status for r in replies] == [500]
        assert json.loads(replies[0].body)["error"]["code"] == "internal"
        assert call(directory / "s", "GET", "/v1/health") == {"status": "ok"}
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "RuntimeError" in logged
    assert "QUERYBYTES" not in logged


def test_rate_limited_is_429_with_retry_after(directory: Path) -> None:
    def limited(request: Request) -> Response:
        raise RateLimitedError("one quote at a time")

    with running(directory / "s", limited):
        replies = parse_replies(exchange(directory / "s", HEALTH))
    assert [r.status for r in replies] == [429]
    assert replies[0].headers["retry-after"] == "1"
    assert json.loads(replies[0].body) == {
        "error": {"code": "rate-limited", "message": "one quote at a time"}
    }


# -- logs ----------------------------------------------------------------------------------


def test_the_log_never_carries_the_clients_bytes(
    directory: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    a = b"A" * 4096
    with running(directory / "s") as _:
        for request in (
            b"GET /" + a + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/log?from=" + a + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-A: " + a + b"\r\n\r\n",
            b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 4096\r\n\r\n" + a,
            b"AAAA" + a + b" / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /" + a * 4 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            replies = parse_replies(exchange(directory / "s", request))
            assert replies
            assert all(r.status < 500 for r in replies)
            assert all(b"AAAA" not in r.body for r in replies)
    assert caplog.records
    for record in caplog.records:
        assert "AAAA" not in record.getMessage()
        assert "AAAA" not in repr(record.args)
    messages = [r.getMessage() for r in caplog.records]
    assert "GET unmatched -> 404" in "\n".join(messages)
    assert "GET /v1/log -> 400" in "\n".join(messages)
    assert "other unmatched -> 405" in "\n".join(messages)


def test_a_peer_is_the_process_that_connected_not_a_later_owner_of_its_pid() -> None:
    from embassy.daemon.http_server import same_process

    me = Peer(os.getpid(), os.getuid(), os.getgid(), start_time(os.getpid()))
    assert me.started is not None
    assert same_process(me)
    assert not same_process(Peer(me.pid, me.uid, me.gid, me.started + 1))  # pid reused
    assert not same_process(Peer(me.pid, me.uid, me.gid, None))
    assert not same_process(Peer(0, 0, 0, 0))
