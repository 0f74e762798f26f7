"""Hostile raw requests against the real server and Api on a Unix socket.

Every answer must be a JSON error with the expected 4xx status (never a 5xx, never an
HTML page), and the server must still answer /v1/health afterwards. The review that
replaced http.server found 4,237 5xx answers under such a fuzz.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.config import HttpLimits
from tests.unit.daemon.httpkit import exchange, parse_replies, running, short_dir

H = b"Host: x\r\n"
GET_HEALTH = b"GET /v1/health HTTP/1.1\r\n" + H + b"\r\n"
ACTIVATE = b"POST /v1/attestation/activate-credential HTTP/1.1\r\n" + H
SESSIONS = b"POST /v1/sessions HTTP/1.1\r\n" + H


def _get(target: bytes, headers: bytes = b"") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + H + headers + b"\r\n"


def _post(head: bytes, body: bytes) -> bytes:
    return head + b"Content-Length: %d\r\n\r\n%b" % (len(body), body)


def _length(value: bytes, body: bytes = b"{}") -> bytes:
    return ACTIVATE + b"Content-Length: " + value + b"\r\n\r\n" + body


# (id, raw request, the status of each answer in order)
CASES: list[tuple[str, bytes, tuple[int, ...]]] = [
    # request lines
    ("garbage-line", b"GARBAGE\r\n\r\n", (400,)),
    ("blank-lines-only", b"\r\n\r\n", (400,)),
    ("many-crlfs", b"\r\n" * 20000, (400,)),
    ("double-space", b"GET  /v1/health HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    ("lowercase-version", b"GET /v1/health http/1.1\r\n" + H + b"\r\n", (400,)),
    ("method-only", b"GET\r\n\r\n", (400,)),
    ("http-0.9", b"GET /v1/health\r\n\r\n", (400,)),
    ("http-2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", (400,)),
    ("http-1.2", b"GET /v1/health HTTP/1.2\r\n" + H + b"\r\n", (400,)),
    ("http-3.0", b"GET /v1/health HTTP/3.0\r\n" + H + b"\r\n", (400,)),
    ("absolute-form", _get(b"http://x/v1/health"), (400,)),
    ("no-host", b"GET /v1/health HTTP/1.1\r\n\r\n", (400,)),
    ("two-hosts", _get(b"/v1/health", H), (400,)),
    # bytes that are not HTTP
    ("nul-in-path", _get(b"/v1/\x00health"), (400,)),
    ("nul-in-header", _get(b"/v1/health", b"X-A: a\x00b\r\n"), (400,)),
    ("non-ascii-path", _get("/v1/h\u00e9alth".encode()), (400,)),
    ("non-ascii-method", "G\u00c9T /v1/health HTTP/1.1\r\n".encode() + H + b"\r\n", (400,)),
    ("non-ascii-header-name", _get(b"/v1/health", "X-\u00e9: 1\r\n".encode()), (400,)),
    ("raw-arabic-digit-in-query", _get("/v1/log?from=\u0663".encode()), (400,)),
    ("cr-in-header-value", _get(b"/v1/health", b"X-A: a\rb\r\n"), (400,)),
    ("header-without-colon", _get(b"/v1/health", b"NoColonHere\r\n"), (400,)),
    ("space-before-colon", _length(b"2")[:-6] + b" : 2\r\n\r\n{}", (400,)),
    ("continuation-first", b"GET /v1/health HTTP/1.1\r\n folded\r\n" + H + b"\r\n", (400,)),
    # Content-Length
    ("superscript-length", _length("\u00b2".encode()), (400,)),
    ("arabic-indic-length", _length("\u0663".encode()), (400,)),
    ("fullwidth-length", _length("\uff12".encode()), (400,)),
    ("5000-digit-length", _length(b"9" * 5000), (400,)),
    ("19-digit-length", _length(b"1" * 19), (400,)),
    ("negative-length", _length(b"-2"), (400,)),
    ("plus-length", _length(b"+2"), (400,)),
    ("hex-length", _length(b"0x2"), (400,)),
    ("spaced-length", _length(b"1 0"), (400,)),
    ("empty-length", _length(b""), (400,)),
    ("underscore-length", _length(b"1_0"), (400,)),
    ("duplicate-length", ACTIVATE + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", (400,)),
    ("list-length", _length(b"2, 2"), (400,)),
    ("conflicting-length", ACTIVATE + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", (400,)),
    ("no-length-on-post", ACTIVATE + b"\r\n{}", (411,)),
    ("length-over-limit", _length(b"999999999"), (413,)),
    (
        "expect-continue-over-limit",
        ACTIVATE + b"Expect: 100-continue\r\n" + b"Content-Length: 99999\r\n\r\n",
        (413,),
    ),
    ("chunked", ACTIVATE + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", (400,)),
    ("gzip-coding", ACTIVATE + b"Transfer-Encoding: gzip\r\n\r\n", (400,)),
    (
        "chunked-and-length",
        ACTIVATE + b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}",
        (400,),
    ),
    ("body-cut-short", _length(b"10", b"{}"), (400,)),
    # sizes
    ("huge-header", _get(b"/v1/health", b"X-A: " + b"a" * 20000 + b"\r\n"), (431,)),
    ("many-headers", _get(b"/v1/health", b"X-A: a\r\n" * 3000), (431,)),
    ("huge-uri", _get(b"/" + b"a" * 20000), (414,)),
    ("long-uri-small-head", _get(b"/" + b"a" * 9000), (414,)),
    (
        "too-many-query-fields",
        _get(b"/v1/log?" + b"&".join(b"a%d=1" % i for i in range(40))),
        (400,),
    ),
    # methods
    ("unknown-method", b"BREW /v1/health HTTP/1.1\r\n" + H + b"\r\n", (405,)),
    ("lowercase-method", b"get /v1/health HTTP/1.1\r\n" + H + b"\r\n", (405,)),
    ("delete", b"DELETE /v1/identity HTTP/1.1\r\n" + H + b"\r\n", (405,)),
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    ("connect", b"CONNECT x:443 HTTP/1.1\r\n" + H + b"\r\n", (400,)),
    (
        "wrong-method-for-route",
        b"POST /v1/health HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n",
        (405,),
    ),
    # numbers and query text the Api reads
    ("unicode-digit-from", _get(b"/v1/log?from=%D9%A3"), (400,)),
    ("superscript-from", _get(b"/v1/log?from=%C2%B2"), (400,)),
    ("5000-digit-from", _get(b"/v1/log?from=" + b"9" * 5000), (400,)),
    ("19-digit-from", _get(b"/v1/log?from=" + b"1" * 19), (400,)),
    ("negative-from", _get(b"/v1/log?from=-1"), (400,)),
    ("plus-from", _get(b"/v1/log?from=%2B1"), (400,)),
    ("spaced-from", _get(b"/v1/log?from=%201"), (400,)),
    ("twice-from", _get(b"/v1/log?from=1&from=2"), (400,)),
    ("not-utf8-query", _get(b"/v1/evidence?nonce=%ff%fe"), (400,)),
    ("spaced-nonce", _get(b"/v1/evidence?nonce=" + b"ab%20" * 16), (400,)),
    ("unknown-route", _get(b"/v1/nope"), (404,)),
    ("bare-lf-lines", b"GET /v1/nope HTTP/1.1\nHost: x\n\n", (404,)),
    # bodies
    ("json-5000-digit-int", _post(SESSIONS, b'{"deadline_seconds":' + b"9" * 5000 + b"}"), (400,)),
    ("json-21-digit-int", _post(SESSIONS, b'{"deadline_seconds":' + b"1" * 21 + b"}"), (400,)),
    ("json-u64-overflow", _post(SESSIONS, b'{"deadline_seconds":18446744073709551616}'), (400,)),
    ("json-nan", _post(SESSIONS, b'{"deadline_seconds":NaN}'), (400,)),
    ("json-not-utf8", _post(SESSIONS, b'{"deadline_seconds":"\xff"}'), (400,)),
    ("json-deep", _post(SESSIONS, b"[" * 3000 + b"]" * 3000), (400,)),
    ("json-duplicate-key", _post(ACTIVATE, b'{"credential_blob":"","credential_blob":""}'), (400,)),
    ("body-longer-than-length", _length(b"2", b"{}GARBAGE\r\n\r\n"), (400, 400)),
    # several requests on one connection
    (
        "pipelined",
        _get(b"/v1/nope") + _get(b"/v1/other") + _get(b"/v1/log?from=x"),
        (404, 404, 400),
    ),
    ("pipelined-then-garbage", _get(b"/v1/nope") + b"\x16\x03\x01\x00\xa5\x01\x00", (404, 400)),
    ("tls-client-hello", b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32), (400,)),
]


@pytest.fixture(scope="module")
def socket_path() -> Iterator[Path]:
    with short_dir() as directory:
        path = directory / "e.sock"
        limits = HttpLimits(backlog=16, workers=4, max_connections=64)
        with running(path, limits=limits, max_body_bytes=64 * 1024, timeout_seconds=5):
            yield path


def test_the_table_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize(
    ("request_bytes", "statuses"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_hostile_request_gets_json_4xx_and_the_server_keeps_serving(
    socket_path: Path, request_bytes: bytes, statuses: tuple[int, ...]
) -> None:
    replies = parse_replies(exchange(socket_path, request_bytes))
    assert [r.status for r in replies] == list(statuses)
    for reply in replies:
        assert reply.headers["content-type"] == "application/json"
        body = json.loads(reply.body)
        assert set(body) == {"error"}
        assert isinstance(body["error"]["code"], str)
        assert isinstance(body["error"]["message"], str)
        assert body["error"]["message"]
        # Nothing the client sent comes back: the hostile payloads are long or odd.
        assert b"aaaa" not in reply.body
        assert b"9999" not in reply.body
    health = parse_replies(exchange(socket_path, GET_HEALTH))
    assert [(r.status, json.loads(r.body)) for r in health] == [(200, {"status": "ok"})]


def test_head_is_refused_without_a_body(socket_path: Path) -> None:
    data = exchange(socket_path, b"HEAD /v1/health HTTP/1.1\r\n" + H + b"\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 405 ")
    assert b"Content-Type: application/json" in head
    assert rest == b""
