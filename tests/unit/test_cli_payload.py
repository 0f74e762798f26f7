from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from embassy.cli import main
from embassy.daemon.runtime import Embassy
from embassy.payload.envelope import HpkePrivateKey, PayloadEnvelope, open_payload
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid
from tests.fakes import FakeTpm
from tests.unit.conftest import MEASUREMENT, EmbassyFactory, trust_flags
from tests.unit.verify.conftest import sealed_workload, start_with_workload
from workload_sdk.stream import decrypt_bytes


def test_payload_seal_wraps_to_a_verified_identity_only(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    embassy = start_with_workload(make_embassy, tpm)
    launch_digest = sealed_workload(embassy).identity.launch_digest
    doc, ca = tmp_path / "identity.json", tmp_path / "ca.pem"
    doc.write_bytes(canonical_json(embassy.identity_document()))
    ca.write_bytes(tpm.ca_pem())
    plain = tmp_path / "input.txt"
    plain.write_bytes(b"a secret prompt " * 10_000)
    stream, env = tmp_path / "input.enc", tmp_path / "envelope.json"
    argv = [
        "payload",
        "seal",
        "--identity",
        str(doc),
        "--in",
        str(plain),
        "--out",
        str(stream),
        "--envelope",
        str(env),
        *trust_flags(tpm, tmp_path),
        "--allow-software-tpm",
    ]

    assert main([*argv, "--expect-measurement", "00" * 32]) == 1
    assert not env.exists(), "nothing is sealed to an identity that does not verify"

    assert main([*argv, "--expect-measurement", MEASUREMENT.digest.hex(), "--suite", "x25519"]) == 0
    envelope = PayloadEnvelope.parse(env.read_bytes())
    assert envelope.suite == "x25519"
    # Bound to what the verified identity shows: the measurement and the workload.
    assert (envelope.measurement, envelope.launch_digest) == (MEASUREMENT.digest, launch_digest)
    private_keys: dict[str, HpkePrivateKey] = {
        "x25519": embassy.keys.hpke_x25519,
        "mlkem768-x25519": embassy.keys.hpke_hybrid,
    }
    own_keyid = keyid(embassy.keys.signing.public_key())
    key, _ = open_payload(
        envelope,
        private_keys=private_keys,
        own_keyid=own_keyid,
        own_measurement=MEASUREMENT.digest,
        own_launch_digest=launch_digest,
        now=time.time(),
    )
    assert decrypt_bytes(key, stream.read_bytes(), expected_payload_id=envelope.payload_id) == (
        plain.read_bytes()
    )
    assert json.loads(env.read_bytes())["embassy_keyid"] == keyid(embassy.keys.signing.public_key())


def test_payload_seal_reports_a_missing_input(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    embassy = start_with_workload(make_embassy, tpm)
    doc, ca = tmp_path / "identity.json", tmp_path / "ca.pem"
    doc.write_bytes(canonical_json(embassy.identity_document()))
    ca.write_bytes(tpm.ca_pem())
    code = main(
        [
            "payload",
            "seal",
            "--identity",
            str(doc),
            "--in",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
            "--envelope",
            str(tmp_path / "e"),
            *trust_flags(tpm, tmp_path),
            "--allow-software-tpm",
            "--expect-measurement",
            MEASUREMENT.digest.hex(),
        ]
    )
    assert code == 2
    assert "nope" in capsys.readouterr().err


def test_payload_seal_refuses_an_identity_without_a_workload(
    embassy: Embassy, tpm: FakeTpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A payload is bound to the workload that opens it: with none shown, nothing is sealed."""
    doc = tmp_path / "identity.json"
    doc.write_bytes(canonical_json(embassy.identity_document()))
    plain = tmp_path / "input.txt"
    plain.write_bytes(b"x")
    env = tmp_path / "e"
    argv = ["payload", "seal", "--identity", str(doc), "--in", str(plain)]
    argv += ["--out", str(tmp_path / "o"), "--envelope", str(env), *trust_flags(tpm, tmp_path)]
    argv += ["--allow-software-tpm", "--expect-measurement", MEASUREMENT.digest.hex()]
    assert main(argv) == 2
    assert "no workload" in capsys.readouterr().err
    assert not env.exists()
