"""Numbers in requests are ASCII decimal of bounded length: anything else is a 400."""

from __future__ import annotations

import pytest

from embassy.daemon.api import Api
from embassy.daemon.http import Request, ascii_decimal
from embassy.errors import RequestError
from tests.unit.daemon.httpkit import FakeService


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0), ("7", 7), ("0012", 12), ("9" * 18, 10**18 - 1)]
)
def test_ascii_decimal_reads_plain_digits(text: str, value: int) -> None:
    assert ascii_decimal(text) == value


@pytest.mark.parametrize(
    "text",
    [
        "",
        "9" * 19,
        "9" * 5000,
        "\u00b2",  # superscript two: str.isdigit() says yes
        "\u0663",  # Arabic-Indic three: int() reads it
        "\uff11",  # fullwidth one
        "1\u0663",
        "-1",
        "+1",
        " 1",
        "1 ",
        "1_000",
        "1\n",
        "0x1",
    ],
)
def test_ascii_decimal_refuses_everything_else(text: str) -> None:
    assert ascii_decimal(text) is None


@pytest.mark.parametrize("text", ["\u0663", "\u00b2", "9" * 5000, "9" * 19, "1_0", " 1"])
def test_the_api_refuses_a_non_ascii_or_huge_from(text: str) -> None:
    with pytest.raises(RequestError, match="'from'"):
        Api(FakeService())(Request("GET", "/v1/log", {"from": [text]}, b""))


@pytest.mark.parametrize("nonce", ["ab " * 16, "ab\n" * 16, " " + "ab" * 16, "\u0663" * 32])
def test_the_api_refuses_a_nonce_that_is_not_plain_hex(nonce: str) -> None:
    with pytest.raises(RequestError, match="nonce"):
        Api(FakeService())(Request("GET", "/v1/evidence", {"nonce": [nonce]}, b""))


def test_a_404_does_not_echo_the_path() -> None:
    with pytest.raises(RequestError) as info:
        Api(FakeService())(Request("GET", "/AAAA" * 100, {}, b""))
    assert "AAAA" not in str(info.value)


@pytest.mark.parametrize("log_from", [-1, "7", 1.5, True, 10**30])
def test_the_api_refuses_a_close_with_a_bad_log_position(log_from: object) -> None:
    body = {"session": "00" * 16, "token": "AA==", "output_sha256": None, "log_from": log_from}
    import json

    with pytest.raises(Exception) as excinfo:
        Api(FakeService())(Request("POST", "/v1/sessions/close", {}, json.dumps(body).encode()))
    assert getattr(excinfo.value, "code", None) in ("bad-request", "malformed")
