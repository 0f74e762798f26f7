"""`embassy audit` on the command line: verify first, write the page only after, precise
refusals."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from embassy.cli import main
from tests.fakes import FakeTpm
from tests.unit.audit.conftest import AUTHORITY, RichLog, load_vector, write
from tests.unit.conftest import MEASUREMENT, trust_flags
from tests.unit.test_vectors import VECTOR_DIR


def _vector_args(name: str, tmp: Path) -> list[str]:
    v = load_vector(name)
    identity = write(tmp / f"{name}-identity.json", base64.b64decode(v.inputs["identity_b64"]))
    segments = [write(tmp / f"{name}-segment-{i}.json", data) for i, data in enumerate(v.segments)]
    complete = []
    if "evidence_b64" in v.inputs:  # fresh evidence over the vector's nonce
        evidence = write(tmp / f"{name}-evidence.json", base64.b64decode(v.inputs["evidence_b64"]))
        complete = ["--complete", "--evidence", evidence, "--nonce", v.spec["nonce"]]
    return [
        *segments,
        *complete,
        "--identity",
        identity,
        "--swtpm-ca",
        str(VECTOR_DIR / v.spec["swtpm_ca"]),
        "--ak-ca",
        str(VECTOR_DIR / v.spec["ak_ca"]),
        "--allow-software-tpm",
        "--expect-measurement",
        v.spec["expected_measurement"],
    ]


def test_a_good_log_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report.html"
    assert main(["audit", *_vector_args("good-log-two-boots", tmp_path), "--out", str(out)]) == 0
    page = out.read_text()
    assert page.startswith("<!doctype html>")
    assert 'id="statements"' in page
    err = capsys.readouterr().err
    assert "audit: verified entries seq" in err
    assert "(inclusion only)" in err
    complete = tmp_path / "complete.html"
    assert (
        main(["audit", *_vector_args("good-log-complete", tmp_path), "--out", str(complete)]) == 0
    )
    assert "(complete)" in capsys.readouterr().err
    assert "may go on after" not in complete.read_text()


@pytest.mark.parametrize(
    "vector",
    [
        "bad-log-statement-changed",
        "bad-log-dropped-middle",
        "bad-log-reordered",
        "bad-log-statement-other-key",
        "bad-log-truncated-presented-as-complete",
    ],
)
def test_a_tampered_log_is_refused_and_nothing_is_written(
    vector: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expect = json.loads((VECTOR_DIR / f"{vector}.json").read_text())["expect"]
    out = tmp_path / "report.html"
    before = tmp_path / "kept.html"
    before.write_text("an earlier report")
    assert main(["audit", *_vector_args(vector, tmp_path), "--out", str(out)]) == 1
    assert main(["audit", *_vector_args(vector, tmp_path), "--out", str(before)]) == 1
    err = capsys.readouterr().err
    assert f"embassy: {expect['error']}:" in err, err
    assert expect["message"] in err
    assert not out.exists()
    assert before.read_text() == "an earlier report"


def test_flag_mistakes_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [*_vector_args("good-log", tmp_path), "--out", str(tmp_path / "r.html")]
    assert main(["audit", *args, "--readings", str(tmp_path)]) == 2
    assert "--readings needs --authority-key" in capsys.readouterr().err
    assert main(["audit", *args, "--complete"]) == 2
    assert "--complete needs --evidence FILE and --nonce HEX" in capsys.readouterr().err
    assert main(["audit", *args, "--nonce", "00"]) == 2
    assert not (tmp_path / "r.html").exists()


def test_an_authority_sees_its_readings(
    rich: RichLog, tpm: FakeTpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "authority.pem"
    key.write_bytes(
        rich.authority_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    readings = tmp_path / "readings"
    readings.mkdir()
    (readings / "kept.json").write_bytes(rich.reading_envelope)
    (readings / "stray.b64").write_bytes(base64.b64encode(rich.reading_envelope + b" "))
    out = tmp_path / "report.html"
    args = [
        write(tmp_path / "log.json", rich.segment),
        "--identity",
        write(tmp_path / "identity.json", rich.identity_doc),
        *trust_flags(tpm, tmp_path),
        "--allow-software-tpm",
        "--expect-measurement",
        MEASUREMENT.digest.hex(),
        "--authority-key",
        str(key),
        "--readings",
        str(readings),
        "--out",
        str(out),
    ]
    assert main(["audit", *args]) == 0, capsys.readouterr().err
    page = out.read_text()
    assert "Decrypted readings" in page
    assert "1500000" in page
    assert AUTHORITY in page
    assert "Reading stray.b64 is not a meter-reading statement" in page
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".html") == ["report.html"]
