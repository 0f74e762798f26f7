"""The user's commands for job results: keygen --reply, payload seal --reply-key, result open."""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path

import pytest

from embassy.cli import PASSPHRASE_ENV, main
from embassy.jobs.result import ReplyPrivateKey, make_result_bundle, wrap_result_key
from embassy.payload.envelope import PayloadEnvelope, ReplyKey, open_payload
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid
from tests.fakes import FakeTpm
from tests.unit.conftest import MEASUREMENT, EmbassyFactory, trust_flags
from tests.unit.verify.conftest import sealed_workload, start_with_workload
from workload_sdk.results import encrypt_result

BINDING = {"job": "ab" * 16, "payload_id": "cd" * 16}
OUTPUT = b"the model's answer " * 5000


def _keygen(tmp_path: Path, name: str, suite: str = "x25519") -> tuple[Path, ReplyKey]:
    key = tmp_path / name
    public = tmp_path / f"{name}.pub.json"
    argv = ["keygen", "--reply", "--suite", suite, "--out", str(key), "--public-out", str(public)]
    assert main(argv) == 0
    return key, ReplyKey.parse(public.read_bytes().strip())


def _bundle(tmp_path: Path, reply: ReplyKey, *, inline: bool = True) -> tuple[Path, Path]:
    key, wrapped = wrap_result_key(reply, BINDING)
    out = io.BytesIO()
    encrypt_result(key, io.BytesIO(OUTPUT), out)
    ciphertext = out.getvalue()
    bundle = make_result_bundle(
        job=BINDING["job"],
        wrapped_key=wrapped,
        ciphertext_sha256=hashlib.sha256(ciphertext).digest(),
        statements=[],
        log={},
        ciphertext=ciphertext if inline else None,
    )
    path, ct_path = tmp_path / "bundle.json", tmp_path / "result.enc"
    path.write_bytes(bundle.to_bytes())
    ct_path.write_bytes(ciphertext)
    return path, ct_path


@pytest.fixture(autouse=True)
def _passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PASSPHRASE_ENV, "a long passphrase")


@pytest.mark.parametrize("suite", ["x25519", "mlkem768-x25519"])
def test_keygen_reply_writes_the_key_encrypted_and_prints_the_public_half(
    tmp_path: Path, suite: str, capsys: pytest.CaptureFixture[str]
) -> None:
    key, public = _keygen(tmp_path, "me", suite)
    printed = ReplyKey.parse(capsys.readouterr().out.strip().encode())
    assert printed == public
    assert public.suite == suite
    pem = key.read_bytes()
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in pem
    assert b"BEGIN PRIVATE KEY" not in pem
    assert key.stat().st_mode & 0o777 == 0o600
    assert ReplyPrivateKey.from_pem(pem, b"a long passphrase").public == public
    assert main(["keygen", "--reply", "--out", str(key)]) == 2, "never over an existing key"


def test_keygen_reply_refuses_to_write_a_key_in_the_clear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(PASSPHRASE_ENV)
    assert main(["keygen", "--reply", "--out", str(tmp_path / "k")]) == 2
    assert "never written in the clear" in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
    assert main(["keygen", "--suite", "x25519", "--out", str(tmp_path / "k")]) == 2


@pytest.mark.parametrize("inline", [True, False])
def test_result_open_decrypts_with_the_users_key(tmp_path: Path, inline: bool) -> None:
    key, public = _keygen(tmp_path, "me")
    bundle, ct = _bundle(tmp_path, public, inline=inline)
    out = tmp_path / "answer.txt"
    argv = ["result", "open", "--key", str(key), "--bundle", str(bundle), "--out", str(out)]
    assert main([*argv, *([] if inline else ["--ciphertext", str(ct)])]) == 0
    assert out.read_bytes() == OUTPUT
    assert out.stat().st_mode & 0o777 == 0o600


def test_result_open_to_stdout(tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    key, public = _keygen(tmp_path, "me")
    bundle, _ = _bundle(tmp_path, public)
    capsysbinary.readouterr()
    assert main(["result", "open", "--key", str(key), "--bundle", str(bundle), "--out", "-"]) == 0
    assert capsysbinary.readouterr().out == OUTPUT


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_result_open_with_another_users_key_fails_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, alice = _keygen(tmp_path, "alice")
    bob_key, _ = _keygen(tmp_path, "bob")
    bundle, _ = _bundle(tmp_path, alice)
    out = tmp_path / "answer.txt"
    argv = ["result", "open", "--key", str(bob_key), "--bundle", str(bundle), "--out", str(out)]
    assert main(argv) == 1
    assert "result-wrong-reply-key" in capsys.readouterr().err
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_result_open_of_a_tampered_ciphertext_leaves_no_partial_plaintext(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, public = _keygen(tmp_path, "me")
    bundle, ct = _bundle(tmp_path, public, inline=False)
    data = bytearray(ct.read_bytes())
    data[-1] ^= 1  # the last chunk: every chunk before it authenticates and is written
    ct.write_bytes(bytes(data))
    obj = json.loads(bundle.read_bytes())
    obj["ciphertext_sha256"] = hashlib.sha256(data).hexdigest()  # the host fixes the digest
    bundle.write_bytes(canonical_json(obj))
    out = tmp_path / "answer.txt"
    argv = ["result", "open", "--key", str(key), "--bundle", str(bundle), "--out", str(out)]
    assert main([*argv, "--ciphertext", str(ct)]) == 1
    assert "result-tampered" in capsys.readouterr().err
    assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_result_open_with_a_wrong_passphrase_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key, public = _keygen(tmp_path, "me")
    bundle, _ = _bundle(tmp_path, public)
    monkeypatch.setenv(PASSPHRASE_ENV, "another passphrase")
    out = tmp_path / "answer.txt"
    argv = ["result", "open", "--key", str(key), "--bundle", str(bundle), "--out", str(out)]
    assert main(argv) == 2
    assert not out.exists()


def test_result_open_of_a_malformed_bundle_exits_3(tmp_path: Path) -> None:
    key, _ = _keygen(tmp_path, "me")
    bundle = tmp_path / "bundle.json"
    bundle.write_bytes(b'{"v":1,"type":"embassy-job-result"}')
    argv = ["result", "open", "--key", str(key), "--bundle", str(bundle), "--out", "-"]
    assert main(argv) == 3


def test_payload_seal_binds_the_reply_key(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    embassy = start_with_workload(make_embassy, tpm)
    launch_digest = sealed_workload(embassy).identity.launch_digest
    doc = tmp_path / "identity.json"
    doc.write_bytes(canonical_json(embassy.identity_document()))
    (tmp_path / "ca.pem").write_bytes(tpm.ca_pem())
    plain = tmp_path / "input.txt"
    plain.write_bytes(b"my data")
    _, public = _keygen(tmp_path, "me", "mlkem768-x25519")
    env = tmp_path / "envelope.json"
    argv = [
        "payload",
        "seal",
        "--identity",
        str(doc),
        "--in",
        str(plain),
        "--out",
        str(tmp_path / "input.enc"),
        "--envelope",
        str(env),
        "--expect-measurement",
        MEASUREMENT.digest.hex(),
        *trust_flags(tpm, tmp_path),
        "--allow-software-tpm",
    ]
    bad = tmp_path / "bad.json"
    bad.write_bytes(b'{"suite":"x25519"}')
    assert main([*argv, "--reply-key", str(bad)]) == 3
    assert not env.exists()

    assert main([*argv, "--reply-key", str(tmp_path / "me.pub.json")]) == 0
    envelope = PayloadEnvelope.parse(env.read_bytes())
    assert envelope.reply_key == public
    open_payload(
        envelope,
        private_keys={
            "x25519": embassy.keys.hpke_x25519,
            "mlkem768-x25519": embassy.keys.hpke_hybrid,
        },
        own_keyid=keyid(embassy.keys.signing.public_key()),
        own_measurement=MEASUREMENT.digest,
        own_launch_digest=launch_digest,
        now=time.time(),
    )
