from __future__ import annotations

from pathlib import Path

import pytest

from embassy.cli import EXIT_CONNECT, exit_code_for, main
from embassy.client import ConnectError
from embassy.errors import (
    ConfigError,
    EmbassyError,
    PcrMismatchError,
    RequestError,
    TamperError,
    TpmError,
    WireFormatError,
)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (PcrMismatchError("x"), 1),
        (ConfigError("x"), 2),
        (WireFormatError("x"), 3),
        (TpmError("x"), 4),
        (TamperError("x"), 5),
        (RequestError("x"), 6),
        (ConnectError("x"), EXIT_CONNECT),
    ],
)
def test_exit_codes(error: EmbassyError, code: int) -> None:
    assert exit_code_for(error) == code


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_measure_is_deterministic(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["measure"]) == 0
    first = capsys.readouterr().out
    assert main(["measure"]) == 0
    assert capsys.readouterr().out == first
    assert len(first.strip()) == 64


def test_verify_reports_malformed_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "identity.json"
    doc.write_bytes(b'{"v": 1, "v": 2}')
    assert (
        main(
            [
                "verify",
                "identity",
                str(doc),
                "--insecure-skip-ek-ca",
                "--insecure-any-measurement",
                "--json",
            ]
        )
        == 3
    )
    out = capsys.readouterr()
    assert '"code": "malformed"' in out.out
    assert "duplicate JSON key" in out.err


def test_verify_missing_file_and_bad_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["verify", "identity", str(tmp_path / "nope.json")]) == 2
    doc = tmp_path / "d.json"
    doc.write_text("{}")
    assert main(["verify", "identity", str(doc), "--expect-pcr", "4=zz"]) == 2
    assert "--expect-pcr 4" in capsys.readouterr().err


def test_identity_without_daemon_exits_7(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["identity", "--socket", str(tmp_path / "none.sock")]) == EXIT_CONNECT
    assert "cannot connect" in capsys.readouterr().err
