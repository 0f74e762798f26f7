"""The daemon end to end, with its own swtpm: identity, verification, restarts, bad input.

Each test drives the real `embassy serve` process over its Unix socket and checks the
result with the offline verifier (called in-process through the CLI's ``main``) and, for
quotes, with tpm2-tools' independent ``tpm2_checkquote``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from embassy.attest.marshal import parse_public
from embassy.cli import main
from embassy.client import ApiError, call
from embassy.log.entry import parse_entry
from embassy.verify.identity import identity_tpm_unverified
from embassy.wire.codec import b64decode, canonical_json
from tests.integration.conftest import Daemon, require

pytestmark = pytest.mark.integration


def _measure(daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["measure", "--config", str(daemon.config)]) == 0
    return capsys.readouterr().out.strip()


def _fetch(daemon: Daemon, path: str, out: Path) -> Path:
    out.write_bytes(canonical_json(call(daemon.socket, "GET", path)))
    return out


def _identity(daemon: Daemon, out: Path) -> Path:
    assert main(["identity", "--socket", str(daemon.socket), "--out", str(out)]) == 0
    return out


def _verify(kind: str, *args: str) -> int:
    return main(["verify", kind, *args])


def test_identity_verifies_end_to_end(
    shared_daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _identity(shared_daemon, tmp_path / "identity.json")
    trust = shared_daemon.trust_flags()
    measurement = _measure(shared_daemon, capsys)
    base = [str(doc), *trust, "--expect-measurement", measurement]

    assert _verify("identity", *base, "--allow-software-tpm", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True
    assert {"pcr-replay", "ek-certificate", "measurement", "quote-signature"} <= set(
        result["checks"]
    )

    # Fail closed: a software TPM is refused unless the auditor says otherwise.
    assert _verify("identity", *base) == 1
    assert "software-tpm" in capsys.readouterr().err
    # A measurement the auditor did not rebuild is refused.
    assert (
        _verify(
            "identity",
            str(doc),
            *trust,
            "--allow-software-tpm",
            "--expect-measurement",
            "00" * 32,
        )
        == 1
    )
    assert "measurement-mismatch" in capsys.readouterr().err


def test_evidence_is_fresh_and_passes_tpm2_checkquote(
    shared_daemon: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require("tpm2_checkquote")
    doc = _identity(shared_daemon, tmp_path / "identity.json")
    nonce = secrets.token_bytes(32)
    evidence = _fetch(shared_daemon, f"/v1/evidence?nonce={nonce.hex()}", tmp_path / "ev.json")
    policy = [
        *shared_daemon.trust_flags(),
        "--allow-software-tpm",
        "--expect-measurement",
        _measure(shared_daemon, capsys),
    ]
    assert (
        _verify("evidence", str(evidence), "--identity", str(doc), "--nonce", nonce.hex(), *policy)
        == 0
    )
    stale = secrets.token_bytes(32).hex()
    assert (
        _verify("evidence", str(evidence), "--identity", str(doc), "--nonce", stale, *policy) == 1
    )
    assert "stale-nonce" in capsys.readouterr().err

    # The independent check: tpm2-tools verifies the embassy's quote as it is.
    obj = json.loads(evidence.read_bytes())
    quote = obj["segment"]["head"]["quote"]
    ak_raw, _, _ = identity_tpm_unverified(json.loads(doc.read_bytes()))
    pem = (
        parse_public(ak_raw)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    pcrs = {int(k): bytes.fromhex(v) for k, v in quote["pcrs"].items()}
    attest = b64decode(quote["attest"], "attest")
    (tmp_path / "ak.pem").write_bytes(pem)
    (tmp_path / "sig").write_bytes(b64decode(quote["signature"], "sig"))
    (tmp_path / "pcrs").write_bytes(b"".join(pcrs[i] for i in sorted(pcrs)))
    selection = "sha256:" + ",".join(str(i) for i in sorted(pcrs))

    def checkquote(message: bytes) -> int:
        (tmp_path / "msg").write_bytes(message)
        return subprocess.run(
            [
                "tpm2_checkquote",
                "-u",
                "ak.pem",
                "-m",
                "msg",
                "-s",
                "sig",
                "-f",
                "pcrs",
                "-l",
                selection,
                "-g",
                "sha256",
                "-q",
                nonce.hex(),
            ],
            cwd=tmp_path,
            capture_output=True,
            timeout=30,
            check=False,
            env={"PATH": os.environ["PATH"]},
        ).returncode

    assert checkquote(attest) == 0
    tampered = bytearray(attest)
    tampered[-40] ^= 1
    assert checkquote(bytes(tampered)) != 0


def test_log_verifies_across_a_crash_in_one_boot(
    daemon_factory: type[Daemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = daemon_factory()
    daemon.start()
    first_head = call(daemon.socket, "GET", "/v1/health")["log_head"]
    daemon.stop(signal.SIGKILL)  # no stop statement, no checkpoint: the swtpm keeps the boot
    daemon.start()
    assert call(daemon.socket, "GET", "/v1/health")["log_head"] > first_head
    doc = _identity(daemon, tmp_path / "identity.json")
    log = _fetch(daemon, "/v1/log?from=0", tmp_path / "log.json")
    policy = [
        *daemon.trust_flags(),
        "--allow-software-tpm",
        "--expect-measurement",
        _measure(daemon, capsys),
    ]
    assert _verify("log", str(log), "--identity", str(doc), *policy, "--json") == 0
    result = json.loads(capsys.readouterr().out)
    # Both runs' identity statements are in the one segment, replayed from boot start.
    assert result["facts"][0].startswith("2 statements in entries 0..")

    # Tampering with the fetched log is caught by the verifier.
    obj = json.loads(log.read_bytes())
    del obj["segment"]["entries"][1]
    log.write_bytes(json.dumps(obj).encode())
    assert _verify("log", str(log), "--identity", str(doc), *policy) == 1
    assert "log-integrity" in capsys.readouterr().err


def test_clean_restart_is_a_new_tpm_boot_and_both_segments_verify(
    daemon_factory: type[Daemon], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = daemon_factory()
    daemon.start()
    first = _fetch(daemon, "/v1/log?from=0", tmp_path / "log1.json")
    assert daemon.stop(signal.SIGTERM) == 0
    daemon.start()
    doc = _identity(daemon, tmp_path / "identity.json")
    second = _fetch(daemon, "/v1/log?from=0", tmp_path / "log2.json")
    boots = [
        {
            parse_entry(b64decode(e, "entry")).reset_count
            for e in json.loads(p.read_bytes())["segment"]["entries"]
        }
        for p in (first, second)
    ]
    assert len(boots[0]) == len(boots[1]) == 1
    assert min(boots[1]) > max(boots[0]), "a clean stop powers the swtpm off: a new boot"
    policy = [
        *daemon.trust_flags(),
        "--allow-software-tpm",
        "--expect-measurement",
        _measure(daemon, capsys),
    ]
    assert _verify("log", str(first), str(second), "--identity", str(doc), *policy) == 0
    # Out of order, the two boots are refused.
    assert _verify("log", str(second), str(first), "--identity", str(doc), *policy) == 1


def test_daemon_refuses_to_sign_on_a_tampered_log(daemon_factory: type[Daemon]) -> None:
    daemon = daemon_factory()
    daemon.start()
    daemon.stop(signal.SIGKILL)
    log = daemon.data_dir / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    entry = json.loads(lines[0])
    entry["data"] = entry["data"][:-4] + ("AAA=" if entry["data"][-4:] != "AAA=" else "AQA=")
    lines[0] = canonical_json(entry) + b"\n"
    log.write_bytes(b"".join(lines))
    with pytest.raises(AssertionError, match="daemon exited 5"):
        daemon.start()
    assert "tamper-detected" in daemon.log_text()


def _raw(sock_path: Path, request: bytes) -> tuple[int, dict[str, object]]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = [
                int(h.split(b":")[1])
                for h in head.split(b"\r\n")
                if h.lower().startswith(b"content-length")
            ]
            if length and len(body) >= length[0]:
                break
    status = int(data.split(b" ", 2)[1])
    return status, json.loads(data.partition(b"\r\n\r\n")[2])


def _post(body: bytes) -> bytes:
    return (
        b"POST /v1/attestation/activate-credential HTTP/1.1\r\nHost: x\r\n"
        b"Content-Length: %d\r\n\r\n%b" % (len(body), body)
    )


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (b"GET /v1/nope HTTP/1.1\r\nHost: x\r\n\r\n", 404, "not-found"),
        (b"DELETE /v1/identity HTTP/1.1\r\nHost: x\r\n\r\n", 405, "method-not-allowed"),
        (b"GET /v1/evidence?nonce=zz HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad-request"),
        (b"GET /v1/evidence?nonce=00 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad-request"),
        (b"GET /v1/evidence HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad-request"),
        (b"GET /v1/log?from=-1 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad-request"),
        (_post(b"{not json"), 400, "malformed"),
        (_post(b'{"credential_blob":1,"encrypted_secret":""}'), 400, "malformed"),
        (_post(b"[]"), 400, "malformed"),
        (_post(b'{"credential_blob":"AAAA","encrypted_secret":"AAAA"}'), 400, "bad-request"),
        (
            b"POST /v1/attestation/activate-credential HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 999999999\r\n\r\n{",
            413,
            "payload-too-large",
        ),
        (
            b"POST /v1/attestation/activate-credential HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
            "bad-request",
        ),
    ],
    ids=[
        "unknown-route",
        "wrong-method",
        "nonce-not-hex",
        "nonce-too-short",
        "nonce-missing",
        "from-negative",
        "malformed-json",
        "wrong-type",
        "not-an-object",
        "bad-credential",
        "huge-body",
        "chunked",
    ],
)
def test_bad_input_gets_a_json_error_and_the_daemon_keeps_serving(
    shared_daemon: Daemon, request_bytes: bytes, status: int, code: str
) -> None:
    got_status, body = _raw(shared_daemon.socket, request_bytes)
    assert (got_status, body["error"]["code"]) == (status, code)  # type: ignore[index]
    assert body["error"]["message"]  # type: ignore[index]
    assert call(shared_daemon.socket, "GET", "/v1/health")["status"] == "ok"


def test_socket_is_owner_only_and_api_errors_surface(shared_daemon: Daemon) -> None:
    assert stat.S_IMODE(shared_daemon.socket.stat().st_mode) == 0o600
    with pytest.raises(ApiError) as info:
        call(shared_daemon.socket, "GET", "/v1/evidence?nonce=" + "00" * 65)
    assert info.value.status == 400
