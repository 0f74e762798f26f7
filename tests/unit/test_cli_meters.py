"""The authority's and user's metering commands, in process, against an embassy on a FakeTpm.

``keygen`` makes an authority's key, the embassy is configured with the printed entry,
``meters instruct`` signs instructions for its verified identity, ``payload seal`` seals
them into a payload's actions, the embassy carries them out (``metering.begin``, as
``open_session`` does after unwrapping the payload), and ``meters read`` opens a reading.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from embassy.cli import main
from embassy.daemon.runtime import Embassy
from embassy.metering.actions import open_actions
from embassy.metering.instruction import (
    AuthorityPolicy,
    Op,
    Polarity,
    make_instruction,
    verify_instruction,
)
from embassy.metering.reading import reply_public_bytes
from embassy.payload.envelope import PayloadEnvelope, open_payload
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import keyid, parse_envelope
from tests.fakes import FakeTpm, FakeWorkloadRuntime
from tests.unit.conftest import MEASUREMENT, trust_flags
from tests.unit.verify.conftest import WORKLOAD, sealed_workload
from workload_sdk.activations import ActivationWriter
from workload_sdk.stream import decrypt_bytes

Capture = pytest.CaptureFixture[str]


@pytest.fixture(autouse=True)
def _no_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EMBASSY_KEY_PASSPHRASE", raising=False)


def keygen(tmp_path: Path, capsys: Capture, name: str) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / f"{name}.pem"
    assert main(["keygen", "--out", str(path), "--name", name]) == 0
    return path, json.loads(capsys.readouterr().out)


def private(path: Path, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    key = load_pem_private_key(path.read_bytes(), passphrase)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def authority(entry: dict[str, Any], *capabilities: str) -> dict[str, Any]:
    return {"name": entry["name"], "ed25519": entry["ed25519"], "capabilities": list(capabilities)}


def with_workload(make_embassy: Any, tpm: FakeTpm, extra: dict[str, Any]) -> Embassy:
    """An embassy running a (fake) workload: a payload is bound to the workload it is for."""
    with FakeWorkloadRuntime():
        embassy: Embassy = make_embassy(tpm, extra={**extra, "workload": WORKLOAD})
        return embassy


class World:
    """An embassy with authorities, its identity document, and the flags that trust it."""

    def __init__(self, embassy: Embassy, tpm: FakeTpm, tmp_path: Path) -> None:
        self.embassy, self.tmp = embassy, tmp_path
        self.identity = tmp_path / "identity.json"
        self.identity.write_bytes(canonical_json(embassy.identity_document()))
        ca = tmp_path / "ca.pem"
        ca.write_bytes(tpm.ca_pem())
        self.trust = [
            "--identity",
            str(self.identity),
            *trust_flags(tpm, tmp_path),
            "--allow-software-tpm",
            "--expect-measurement",
            MEASUREMENT.digest.hex(),
        ]
        self.keyid = keyid(embassy.keys.signing.public_key())

    def instruct(self, key: Path, name: str, out: Path, *extra: str) -> int:
        argv = ["meters", "instruct", "--key", str(key), "--authority", name, "--out", str(out)]
        return main([*argv, *self.trust, *extra])

    def seal(self, *extra: str) -> tuple[int, Path, Path]:
        plain, stream, env = self.tmp / "in.txt", self.tmp / "in.enc", self.tmp / "env.json"
        plain.write_bytes(b"a secret prompt " * 1000)
        argv = ["payload", "seal", "--in", str(plain), "--out", str(stream)]
        return main([*argv, "--envelope", str(env), *self.trust, *extra]), stream, env

    def open(self, env: Path) -> tuple[PayloadEnvelope, bytes, bytes | None]:
        envelope = PayloadEnvelope.parse(env.read_bytes())
        input_key, action_key = open_payload(
            envelope,
            private_keys={
                "x25519": self.embassy.keys.hpke_x25519,
                "mlkem768-x25519": self.embassy.keys.hpke_hybrid,
            },
            own_keyid=self.keyid,
            own_measurement=MEASUREMENT.digest,
            own_launch_digest=sealed_workload(self.embassy).identity.launch_digest,
            now=time.time(),
        )
        return envelope, input_key, action_key

    def run(self, *instructions: Path) -> tuple[bytes, list[bytes]]:
        """Seal a payload with these instructions and begin its session, as open_session does."""
        actions = self.tmp / "actions.bin"
        flags = [a for path in instructions for a in ("--instruction", str(path))]
        code, _, env = self.seal(*flags, "--actions", str(actions))
        assert code == 0
        envelope, _, action_key = self.open(env)
        session = os.urandom(16)
        readings = self.embassy.metering.begin(
            session,
            payload_id=envelope.payload_id,
            action_key=action_key,
            actions=actions.read_bytes(),
        )
        return session, readings


@pytest.fixture
def aisi_key(tmp_path: Path, capsys: Capture) -> tuple[Path, dict[str, Any]]:
    return keygen(tmp_path, capsys, "aisi")


@pytest.fixture
def world(
    make_embassy: Any, tpm: FakeTpm, tmp_path: Path, aisi_key: tuple[Path, dict[str, Any]]
) -> World:
    _, entry = aisi_key
    extra = {"authorities": [authority(entry, "bio", "cyber")]}
    return World(with_workload(make_embassy, tpm, extra), tpm, tmp_path)


# -- keygen ----------------------------------------------------------------------------


def test_keygen_writes_a_private_key_once(tmp_path: Path, capsys: Capture) -> None:
    path = tmp_path / "aisi.pem"
    assert main(["keygen", "--out", str(path), "--name", "aisi"]) == 0
    out, err = capsys.readouterr()
    assert "NOT encrypted" in err
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entry = json.loads(out)
    raw = private(path).public_key().public_bytes_raw()
    assert entry == {
        "name": "aisi",
        "ed25519": base64.b64encode(raw).decode(),
        "keyid": hashlib.sha256(raw).hexdigest(),
    }
    before = path.read_bytes()
    assert main(["keygen", "--out", str(path)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aisi.pem"], "no temp file is left"

    assert main(["keygen", "--out", str(tmp_path / "other.pem")]) == 0
    assert json.loads(capsys.readouterr().out)["name"] is None
    assert main(["keygen", "--out", str(tmp_path / "no" / "such.pem")]) == 2


def test_keygen_encrypts_with_the_env_passphrase(
    world: World, tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBASSY_KEY_PASSPHRASE", "correct horse")
    path, _ = keygen(tmp_path, capsys, "locked")
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    private(path, b"correct horse")  # a standard PKCS#8 file
    out = tmp_path / "i.json"
    args = ("--op", "update", "--capability", "cyber")

    monkeypatch.setenv("EMBASSY_KEY_PASSPHRASE", "wrong")
    assert world.instruct(path, "aisi", out, *args) == 2
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.delenv("EMBASSY_KEY_PASSPHRASE")
    assert world.instruct(path, "aisi", out, *args) == 2
    assert "EMBASSY_KEY_PASSPHRASE" in capsys.readouterr().err
    monkeypatch.setenv("EMBASSY_KEY_PASSPHRASE", "")
    assert world.instruct(path, "aisi", out, *args) == 2
    assert "empty" in capsys.readouterr().err
    assert not out.exists()

    monkeypatch.setenv("EMBASSY_KEY_PASSPHRASE", "correct horse")
    assert world.instruct(path, "aisi", out, *args) == 0
    assert parse_envelope(out.read_bytes()).signatures[0].keyid == keyid(
        private(path, b"correct horse").public_key()
    )


def test_keys_that_are_not_ed25519_are_refused(
    world: World, tmp_path: Path, capsys: Capture
) -> None:
    pem = tmp_path / "p256.pem"
    pem.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()
        )
    )
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"not a key")
    for path, message in ((pem, "not an Ed25519 key"), (junk, "not a PEM")):
        assert world.instruct(path, "aisi", tmp_path / "i.json", "--op", "read") == 2
        assert message in capsys.readouterr().err


# -- meters instruct -------------------------------------------------------------------


def test_instruct_signs_for_the_verified_embassy_only(
    world: World, aisi_key: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: Capture
) -> None:
    path = aisi_key[0]
    key = private(path)
    policies = {"aisi": AuthorityPolicy("aisi", key.public_key(), frozenset({"bio", "cyber"}))}
    out = tmp_path / "write.json"
    write = ("--op", "write", "--capability", "cyber", "--polarity", "negative", "--ttl", "60")

    wrong = [*world.trust[:-1], "00" * 32]
    argv = ["meters", "instruct", "--key", str(path), "--authority", "aisi", "--out", str(out)]
    assert main([*argv, *wrong, *write]) == 1
    assert not out.exists(), "nothing is signed for an embassy that does not verify"

    assert world.instruct(path, "aisi", out, *write) == 0
    now = int(time.time())
    got = verify_instruction(out.read_bytes(), policies, own_keyid=world.keyid, now=now)
    assert (got.op, got.capabilities, got.polarity) == (Op.WRITE, ("cyber",), Polarity.NEGATIVE)
    assert now < got.expires_unix <= now + 61
    assert got.reply_key is None

    assert world.instruct(path, "aisi", out, "--op", "read") == 0
    got = verify_instruction(out.read_bytes(), policies, own_keyid=world.keyid, now=now)
    assert (got.op, got.capabilities, got.reply_key) == (Op.READ, (), reply_public_bytes(key))

    capsys.readouterr()
    stdout_argv = ["meters", "instruct", "--key", str(path), "--authority", "aisi"]
    assert main([*stdout_argv, *world.trust, "--op", "update", "--capability", "bio"]) == 0
    printed = capsys.readouterr().out.encode()
    got = verify_instruction(printed, policies, own_keyid=world.keyid, now=now)
    assert (got.op, got.capabilities) == (Op.UPDATE, ("bio",))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--op", "write", "--capability", "cyber"), "polarity is required"),
        (("--op", "update", "--capability", "bio", "--polarity", "positive"), "polarity"),
        (("--op", "write", "--capability", "a", "--capability", "b", "--polarity", "positive"),
         "exactly one"),
        (("--op", "update"), "at least one"),
        (("--op", "update", "--capability", "Not A Name"), "capability names"),
    ],
)  # fmt: skip
def test_instruct_shape_errors_are_usage_errors(
    world: World,
    aisi_key: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    capsys: Capture,
    args: tuple[str, ...],
    message: str,
) -> None:
    out = tmp_path / "i.json"
    assert world.instruct(aisi_key[0], "aisi", out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_instruct_ttl_must_be_positive(world: World, aisi_key: tuple[Path, Any]) -> None:
    assert world.instruct(aisi_key[0], "aisi", world.tmp / "i", "--op", "read", "--ttl", "0") == 2


# -- payload seal --instruction --------------------------------------------------------


def test_payload_seal_carries_instructions_to_the_embassy(
    world: World, aisi_key: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: Capture
) -> None:
    key = aisi_key[0]
    write, update = tmp_path / "write.json", tmp_path / "update.json"
    assert world.instruct(key, "aisi", write, "--op", "write", "--capability", "bio",
                          "--polarity", "positive") == 0  # fmt: skip
    assert world.instruct(key, "aisi", update, "--op", "update", "--capability", "cyber") == 0
    actions = tmp_path / "actions.bin"
    code, stream, env = world.seal(
        "--instruction", str(write), "--instruction", str(update), "--actions", str(actions)
    )
    assert code == 0
    assert "2 instruction(s)" in capsys.readouterr().err
    envelope, input_key, action_key = world.open(env)
    assert envelope.has_action_key
    assert action_key is not None
    opened = open_actions(action_key, envelope.payload_id, actions.read_bytes())
    assert opened.instructions == (write.read_bytes(), update.read_bytes())
    assert opened.unmetered_ok is False
    assert decrypt_bytes(input_key, stream.read_bytes(), expected_payload_id=envelope.payload_id)

    # The embassy accepts both: no refusal, nothing to answer.
    assert world.embassy.metering.begin(
        os.urandom(16),
        payload_id=envelope.payload_id,
        action_key=action_key,
        actions=actions.read_bytes(),
    ) == []  # fmt: skip

    code, _, env = world.seal(
        "--instruction", str(update), "--actions", str(actions), "--unmetered-ok"
    )
    assert code == 0
    envelope, _, action_key = world.open(env)
    assert action_key is not None
    assert open_actions(action_key, envelope.payload_id, actions.read_bytes()).unmetered_ok

    code, _, env = world.seal()
    assert code == 0
    assert world.open(env)[2] is None, "no instructions, no action key"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--instruction", "I"), "--instruction needs --actions"),
        (("--actions", "A"), "--actions needs at least one --instruction"),
        (("--unmetered-ok",), "--unmetered-ok applies only with --instruction"),
    ],
)
def test_payload_seal_actions_flags_go_together(
    world: World,
    aisi_key: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    capsys: Capture,
    flags: tuple[str, ...],
    message: str,
) -> None:
    instruction = tmp_path / "i.json"
    assert world.instruct(aisi_key[0], "aisi", instruction, "--op", "read") == 0
    paths = {"I": str(instruction), "A": str(tmp_path / "actions.bin")}
    code, stream, env = world.seal(*(paths.get(f, f) for f in flags))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not env.exists()
    assert not stream.exists()
    assert not (tmp_path / "actions.bin").exists()


def test_payload_seal_refuses_instructions_the_embassy_would_refuse(
    world: World, aisi_key: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: Capture
) -> None:
    other = make_instruction(
        private(aisi_key[0]),
        op=Op.READ,
        authority="aisi",
        capabilities=[],
        embassy_keyid="ab" * 32,
        expires_unix=2**40,
        reply_key=bytes(32),
    )
    expired = make_instruction(
        private(aisi_key[0]),
        op=Op.READ,
        authority="aisi",
        capabilities=[],
        embassy_keyid=world.keyid,
        expires_unix=1,
        reply_key=bytes(32),
    )
    cases = [(other, 2, "not this one"), (expired, 2, "expired"), (b"{}", 3, "malformed")]
    for data, code, message in cases:
        path = tmp_path / "i.json"
        path.write_bytes(data)
        actions = str(tmp_path / "actions.bin")
        assert world.seal("--instruction", str(path), "--actions", actions)[0] == code
        assert message in capsys.readouterr().err


# -- meters read -----------------------------------------------------------------------


def _feed(embassy: Embassy, directory: Path, session: bytes, axis: int) -> None:
    writer = ActivationWriter(directory, session)
    vector = np.zeros(8, dtype=np.float32)
    vector[axis] = 1.0
    embassy.metering.handle(writer.write("layer.6", np.stack([vector, vector])))
    assert embassy.metering.finish(session, lambda: 0) is not None


def test_meters_read_opens_a_reading_for_its_authority_only(
    make_embassy: Any, tpm: FakeTpm, tmp_path: Path, capsys: Capture
) -> None:
    aisi, aisi_entry = keygen(tmp_path, capsys, "aisi")
    rights, rights_entry = keygen(tmp_path, capsys, "rights")
    extra = {
        "authorities": [authority(aisi_entry, "bio", "cyber"), authority(rights_entry, "lyrics")]
    }
    world = World(with_workload(make_embassy, tpm, extra), tpm, tmp_path)
    acts = tmp_path / "acts"
    acts.mkdir()
    # Teach cyber one positive sample, then meter one session against it.
    teach, update = tmp_path / "teach.json", tmp_path / "update.json"
    assert world.instruct(aisi, "aisi", teach, "--op", "write", "--capability", "cyber",
                          "--polarity", "positive") == 0  # fmt: skip
    _feed(world.embassy, acts, world.run(teach)[0], 0)
    assert world.instruct(aisi, "aisi", update, "--op", "update", "--capability", "cyber") == 0
    _feed(world.embassy, acts, world.run(update)[0], 0)
    meters = world.embassy.metering.meters("aisi")
    assert meters["cyber"] > 0

    ask, other_ask = tmp_path / "read.json", tmp_path / "read2.json"
    assert world.instruct(aisi, "aisi", ask, "--op", "read") == 0
    assert world.instruct(aisi, "aisi", other_ask, "--op", "read") == 0
    _, [reading] = world.run(ask)
    as_json = tmp_path / "reading.json"
    as_json.write_bytes(reading)
    as_b64 = tmp_path / "reading.b64"
    as_b64.write_text(base64.b64encode(reading).decode() + "\n")
    capsys.readouterr()

    def read(key: Path, name: str, file: Path, *extra: str) -> int:
        argv = ["meters", "read", "--key", str(key), "--authority", name]
        return main([*argv, *world.trust, *extra, str(file)])

    for file in (as_json, as_b64):
        assert read(aisi, "aisi", file, "--instruction", str(ask)) == 0
        result = json.loads(capsys.readouterr().out)
        by_cap = {m["capability"]: m for m in result["meters"]}
        assert by_cap["cyber"]["value"] == meters["cyber"]
        assert by_cap["cyber"]["count"] == 1
        assert by_cap["bio"] == {"capability": "bio", "value": 0, "count": 0, "last_seq": None}
        assert result["authority"] == "aisi"
        assert result["formula"]
        assert result["as_of_seq"] < result["statement_seq"]
        statement_payload = parse_envelope(reading).payload
        assert (
            json.loads(statement_payload)["predicate"]["header"]["log"]["seq"]
            == (result["statement_seq"])
        )
        instruction_payload = parse_envelope(ask.read_bytes()).payload
        assert result["instruction_sha256"] == hashlib.sha256(instruction_payload).hexdigest()
    assert read(aisi, "aisi", as_json) == 0  # without --instruction: signed and decrypted
    capsys.readouterr()

    refusals = [
        ((rights, "rights", as_json), "not 'rights'"),
        ((rights, "aisi", as_json), "does not decrypt"),
        ((aisi, "aisi", as_json, "--instruction", str(other_ask)), "another instruction"),
    ]
    for args, message in refusals:
        assert read(*args) == 1
        captured = capsys.readouterr()
        assert message in captured.err
        assert not captured.out

    # A statement the embassy did not sign, and a file that is no statement at all.
    forged = json.loads(reading)
    forged["signatures"][0]["sig"] = base64.b64encode(bytes(64)).decode()
    as_json.write_text(json.dumps(forged))
    assert read(aisi, "aisi", as_json) == 1
    as_b64.write_text("not base64 ***")
    assert read(aisi, "aisi", as_b64) == 3
    # And never against an identity that does not verify.
    as_json.write_bytes(reading)
    assert read(aisi, "aisi", as_json) == 0
    capsys.readouterr()
    assert read(aisi, "aisi", as_json, "--expect-measurement", "00" * 32) == 1
    captured = capsys.readouterr()
    assert "measurement" in captured.err
    assert not captured.out
