"""The registrar against real daemons and their swtpms: credential activation for real.

An attacker with a TPM of its own tries to get an AK certificate for its AK beside another
TPM's EK certificate; the registrar's credential activation refuses it. Without an AK
certificate the verifier refuses the identity offline, and accepts it with one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from embassy.attest.chain import load_pem_bundle
from embassy.cli import main
from embassy.client import ApiError
from embassy.errors import EmbassyError
from embassy.registrar.ca import load_ca
from embassy.registrar.cli import SocketAttester
from embassy.registrar.enroll import EkTrust, enroll
from embassy.verify.identity import identity_tpm_unverified
from embassy.wire.codec import b64decode, b64encode, canonical_json
from embassy.wire.dsse import parse_envelope
from tests.integration.conftest import REGISTRAR_PASSPHRASE, Daemon


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "EMBASSY_REGISTRAR_PASSPHRASE": REGISTRAR_PASSPHRASE.decode(),
    }
    return subprocess.run(
        [sys.executable, "-m", "embassy", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def _identity(daemon: Daemon, out: Path) -> Path:
    assert (
        main(["identity", "--socket", str(daemon.socket), "--no-activate", "--out", str(out)]) == 0
    )
    return out


def _verify(doc: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return _cli(
        "verify",
        "identity",
        str(doc),
        "--allow-software-tpm",
        "--insecure-any-measurement",
        "--json",
        *flags,
    )


def test_registrar_cli_certifies_the_ak_and_the_verifier_needs_it(
    daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    daemon = daemon_factory()
    daemon.enroll_on_start = False
    daemon.start()
    swtpm_ca = ["--swtpm-ca", str(daemon.ca_pem())]
    registrar = tmp_path / "registrar"

    # Before enrolment: offline, nothing ties the AK to the EK.
    uncertified = _verify(_identity(daemon, tmp_path / "before.json"), *swtpm_ca)
    assert uncertified.returncode == 1
    assert "ak-not-certified" in uncertified.stderr
    # A live activation the verifier runs itself stands in for the certificate.
    live = _verify(tmp_path / "before.json", *swtpm_ca, "--activate", str(daemon.socket))
    assert live.returncode == 0, live.stderr
    assert "ak-live-activation" in json.loads(live.stdout)["checks"]

    init = _cli("registrar", "init", "--dir", str(registrar), "--json")
    assert init.returncode == 0, init.stderr
    assert (registrar / "registrar-ca.key").stat().st_mode & 0o077 == 0
    assert b"ENCRYPTED PRIVATE KEY" in (registrar / "registrar-ca.key").read_bytes()
    # A software TPM is certified only when the registrar is told it may be.
    refused = _cli(
        "registrar", "enroll", "--dir", str(registrar), "--socket", str(daemon.socket), *swtpm_ca
    )
    assert refused.returncode == 1
    assert "software-tpm" in refused.stderr
    enrolled = _cli(
        "registrar",
        "enroll",
        "--dir",
        str(registrar),
        "--socket",
        str(daemon.socket),
        *swtpm_ca,
        "--allow-software-tpm",
        "--json",
        "--out",
        str(tmp_path / "ak.pem"),
    )
    assert enrolled.returncode == 0, enrolled.stderr
    assert json.loads(enrolled.stdout)["tpm_kind"] == "software"

    doc = _identity(daemon, tmp_path / "after.json")
    ak_ca = ["--ak-ca", str(registrar / "registrar-ca.pem")]
    ok = _verify(doc, *swtpm_ca, *ak_ca)
    assert ok.returncode == 0, ok.stderr
    assert {"ak-certificate", "ek-certificate", "tpm-kind"} <= set(json.loads(ok.stdout)["checks"])
    # The swtpm's CA named as a hardware maker's: its model says swtpm, a contradiction.
    hardware = _verify(doc, "--ek-ca", str(daemon.ca_pem()), *ak_ca)
    assert hardware.returncode == 1
    assert "names a software TPM" in hardware.stderr
    # The chain survives a restart of the daemon (same TPM, same AK).
    daemon.stop()
    daemon.start()
    again = _verify(_identity(daemon, tmp_path / "restarted.json"), *swtpm_ca, *ak_ca)
    assert again.returncode == 0, again.stderr


class _Impostor:
    """The attacker's embassy B, claiming A's EK and EK certificate beside B's own AK."""

    def __init__(self, victim: Daemon, attacker: Daemon) -> None:
        self._victim, self._attacker = (
            SocketAttester(victim.socket),
            SocketAttester(attacker.socket),
        )

    def identity_document(self) -> dict[str, Any]:
        doc = self._attacker.identity_document()
        _, ek, ek_cert = identity_tpm_unverified(self._victim.identity_document())
        # Rewrite the claimed EK inside B's identity statement, as modified software on B
        # would write it (B signs whatever it likes; the TPM is what it cannot forge).
        entries = doc["segment"]["entries"]
        entry = json.loads(b64decode(entries[-1], "entry"))
        statement = json.loads(parse_envelope(b64decode(entry["data"], "data")).payload)
        statement["predicate"]["tpm"]["ek_public"] = b64encode(ek)
        statement["predicate"]["tpm"]["ek_certificate"] = b64encode(ek_cert)
        env = json.loads(b64decode(entry["data"], "data"))
        env["payload"] = b64encode(canonical_json(statement))
        entry["data"] = b64encode(canonical_json(env))
        entries[-1] = b64encode(canonical_json(entry))
        return doc

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        return self._attacker.activate_credential(credential_blob, encrypted_secret)


def test_registrar_refuses_an_ak_beside_another_tpms_ek(daemon_factory: type[Daemon]) -> None:
    victim, attacker = daemon_factory(), daemon_factory()
    victim.start()
    attacker.enroll_on_start = False
    attacker.start()
    issuer = load_ca(victim.registrar_dir, REGISTRAR_PASSPHRASE)
    trust = EkTrust(
        (),
        tuple(load_pem_bundle(victim.ca_pem().read_bytes())),
        allow_software_tpm=True,
    )
    with pytest.raises(EmbassyError):
        enroll(
            _Impostor(victim, attacker),
            issuer,
            trust,
            now=datetime.now(UTC),
            lifetime=timedelta(days=1),
        )
    # And the victim's genuine chain is refused by the attacker's daemon: another AK.
    victim_chain = [
        b64decode(c, "chain")
        for c in SocketAttester(victim.socket).identity_document()["ak_certificates"]
    ]
    with pytest.raises(ApiError) as refused:
        SocketAttester(attacker.socket).install_ak_chain(victim_chain)
    assert refused.value.status == 422
    assert refused.value.code == "key-binding"
    assert SocketAttester(attacker.socket).identity_document()["ak_certificates"] == []


def test_relayed_enrolment_through_files(daemon_factory: type[Daemon], tmp_path: Path) -> None:
    """The registrar is elsewhere: challenge and answer travel as files the host carries."""
    daemon = daemon_factory()
    daemon.enroll_on_start = False
    daemon.start()
    registrar, swtpm_ca = tmp_path / "registrar", ["--swtpm-ca", str(daemon.ca_pem())]
    assert _cli("registrar", "init", "--dir", str(registrar)).returncode == 0
    doc = _identity(daemon, tmp_path / "identity.json")
    challenge, answer, cert = tmp_path / "c.json", tmp_path / "a.json", tmp_path / "ak.pem"
    made = _cli(
        "registrar", "challenge", "--dir", str(registrar), "--identity", str(doc),
        *swtpm_ca, "--allow-software-tpm", "--out", str(challenge),
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    # The host never sees the secret: only the TPM's answer recovers it.
    pending = list((registrar / "pending").iterdir())
    assert len(pending) == 1
    assert pending[0].stat().st_mode & 0o077 == 0
    secret = json.loads(pending[0].read_bytes())["secret"]
    assert secret not in challenge.read_text()

    answered = _cli(
        "registrar", "answer", "--socket", str(daemon.socket), "--challenge", str(challenge),
        "--out", str(answer),
    )  # fmt: skip
    assert answered.returncode == 0, answered.stderr
    # A forged answer (the host guessing) is refused, and it used the challenge up.
    forged = json.loads(answer.read_bytes())
    forged["secret"] = b64encode(bytes(32))
    forged_path = tmp_path / "forged.json"
    forged_path.write_text(json.dumps(forged))
    issue = ["registrar", "issue", "--dir", str(registrar), *swtpm_ca, "--allow-software-tpm"]
    refused = _cli(*issue, "--answer", str(forged_path), "--out", str(cert))
    assert refused.returncode == 1
    assert "did not recover the credential" in refused.stderr
    replayed = _cli(*issue, "--answer", str(answer), "--out", str(cert))
    assert replayed.returncode != 0
    assert "no open challenge" in replayed.stderr

    # Again, honestly this time.
    assert _cli(
        "registrar", "challenge", "--dir", str(registrar), "--identity", str(doc),
        *swtpm_ca, "--allow-software-tpm", "--out", str(challenge),
    ).returncode == 0  # fmt: skip
    assert _cli(
        "registrar", "answer", "--socket", str(daemon.socket), "--challenge", str(challenge),
        "--out", str(answer),
    ).returncode == 0  # fmt: skip
    issued = _cli(*issue, "--answer", str(answer), "--out", str(cert))
    assert issued.returncode == 0, issued.stderr
    installed = _cli("registrar", "install", "--socket", str(daemon.socket), "--chain", str(cert))
    assert installed.returncode == 0, installed.stderr
    ok = _verify(
        _identity(daemon, tmp_path / "after.json"),
        *swtpm_ca,
        "--ak-ca",
        str(registrar / "registrar-ca.pem"),
    )
    assert ok.returncode == 0, ok.stderr
    assert "ak-certificate" in json.loads(ok.stdout)["checks"]
