"""``--json`` on every command that prints a result, in process: one JSON document on stdout
and nothing else there, the prose default unchanged, and on an error the error document
with the same exit code as without ``--json``.

The commands run against an embassy on a FakeTpm served on a real Unix socket (the daemon's
own Api and HTTP server), so ``identity`` and the registrar's socket commands talk to it as
they would to the daemon.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embassy.attest.types import TpmMode
from embassy.cli import build_parser, main
from embassy.daemon.api import Api
from embassy.wire.codec import canonical_json
from tests.fakes import FakeTpm
from tests.unit.audit.test_cli import _vector_args as audit_vector_args
from tests.unit.conftest import MEASUREMENT, EmbassyFactory
from tests.unit.daemon.httpkit import running, short_dir
from tests.unit.jobs.test_result_cli import _bundle as result_bundle
from tests.unit.test_cli_image import UKI
from tests.unit.test_cli_meters import World, authority, with_workload
from tests.unit.weights.weights_vectors import safetensors_bytes
from workload_sdk.weights import KEY_LEN

Capture = pytest.CaptureFixture[str]
HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Ctx:
    """What a case needs: the world (an embassy, its identity and trust flags), its socket,
    a fresh directory per call, and capsys to clear the output of set-up steps."""

    world: World
    socket: Path
    authority_key: Path
    tpm: FakeTpm
    tmp: Path
    capsys: Capture
    monkeypatch: pytest.MonkeyPatch
    count: int = 0

    def fresh(self) -> Path:
        self.count += 1
        path = self.tmp / f"case-{self.count}"
        path.mkdir()
        return path

    def run(self, argv: list[str]) -> None:
        """A set-up step: it must pass, and its output is not the case's."""
        assert main(argv) == 0, argv
        self.capsys.readouterr()

    @property
    def ek_flags(self) -> list[str]:
        group = "--swtpm-ca" if self.tpm.mode is TpmMode.SOFTWARE else "--ek-ca"
        return [group, str(self.tmp / "ek-ca.pem"), "--allow-software-tpm"]


def _remembering_activation(monkeypatch: pytest.MonkeyPatch) -> dict[bytes, bytes]:
    """make_credential, remembering each blob's secret for the fake activation."""
    from embassy.attest import credential
    from embassy.registrar import enroll

    real, secrets = credential.make_credential, {}

    def remembering(ek: Any, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
        blob, encrypted = real(ek, ak_name, secret)
        secrets[blob] = secret
        return blob, encrypted

    monkeypatch.setattr(credential, "make_credential", remembering)
    monkeypatch.setattr(enroll, "make_credential", remembering)
    return secrets


@pytest.fixture
def ctx(
    make_embassy: EmbassyFactory,
    tpm: FakeTpm,
    tmp_path: Path,
    capsys: Capture,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Ctx]:
    monkeypatch.delenv("EMBASSY_KEY_PASSPHRASE", raising=False)
    secrets = _remembering_activation(monkeypatch)
    monkeypatch.setenv("EMBASSY_REGISTRAR_PASSPHRASE", "registrar pass")
    monkeypatch.setenv("EMBASSY_BROKER_PASSPHRASE", "broker pass")
    key = tmp_path / "aisi.pem"
    assert main(["keygen", "--out", str(key), "--name", "aisi"]) == 0
    entry = json.loads(capsys.readouterr().out)
    embassy = with_workload(make_embassy, tpm, {"authorities": [authority(entry, "cyber")]})
    world = World(embassy, tpm, tmp_path)
    # A FakeTpm has no ActivateCredential (swtpm's tests run the real one): it answers with
    # the secret made for that blob, so the commands' output around it can be checked here.
    monkeypatch.setattr(embassy, "activate_credential", lambda blob, _: secrets[blob])
    api = Api(embassy)
    with short_dir() as directory, running(directory / "s", api, routes=api.routes):
        yield Ctx(world, directory / "s", key, tpm, tmp_path, capsys, monkeypatch)


# -- the cases: argv for a fresh run, a check of the prose, a check of the document --------


def _measure(c: Ctx) -> list[str]:
    return ["measure"]


def _measure_uki(c: Ctx) -> list[str]:
    return ["measure", "--uki", str(UKI)]


def _identity(c: Ctx) -> list[str]:
    return ["identity", "--socket", str(c.socket)]


def _verify_identity(c: Ctx) -> list[str]:
    return ["verify", "identity", str(c.world.identity), *c.world.trust[2:]]


def _audit(c: Ctx) -> list[str]:
    d = c.fresh()
    return ["audit", *audit_vector_args("good-log-two-boots", d), "--out", str(d / "r.html")]


def _payload_seal(c: Ctx) -> list[str]:
    d = c.fresh()
    (d / "in").write_bytes(b"a secret prompt " * 1000)
    argv = ["payload", "seal", "--in", str(d / "in"), "--out", str(d / "in.enc")]
    return [*argv, "--envelope", str(d / "env.json"), *c.world.trust]


def _keygen(c: Ctx) -> list[str]:
    return ["keygen", "--out", str(c.fresh() / "k.pem"), "--name", "aisi"]


def _keygen_reply(c: Ctx) -> list[str]:
    c.monkeypatch.setenv("EMBASSY_KEY_PASSPHRASE", "a reply key's passphrase")
    return ["keygen", "--reply", "--suite", "x25519", "--out", str(c.fresh() / "reply.pem")]


def _result_open(c: Ctx) -> list[str]:
    from embassy.payload.envelope import ReplyKey

    d = c.fresh()
    c.monkeypatch.setenv("EMBASSY_KEY_PASSPHRASE", "a reply key's passphrase")
    c.run(["keygen", "--reply", "--suite", "x25519", "--out", str(d / "me"),
           "--public-out", str(d / "me.pub")])  # fmt: skip
    bundle, _ = result_bundle(d, ReplyKey.parse((d / "me.pub").read_bytes().strip()))
    return ["result", "open", "--key", str(d / "me"), "--bundle", str(bundle),
            "--out", str(d / "plain")]  # fmt: skip


def _meters_instruct(c: Ctx) -> list[str]:
    argv = ["meters", "instruct", "--key", str(c.authority_key), "--authority", "aisi"]
    return [*argv, *c.world.trust, "--op", "read"]


def _meters_read(c: Ctx) -> list[str]:
    d = c.fresh()
    c.run([*_meters_instruct(c), "--out", str(d / "ask.json")])
    _, [reading] = c.world.run(d / "ask.json")
    (d / "reading.json").write_bytes(reading)
    argv = ["meters", "read", "--key", str(c.authority_key), "--authority", "aisi"]
    return [*argv, *c.world.trust, "--instruction", str(d / "ask.json"), str(d / "reading.json")]


def _registrar_init(c: Ctx) -> list[str]:
    return ["registrar", "init", "--dir", str(c.fresh() / "ca")]


def _registrar_ca(c: Ctx) -> Path:
    ca = c.fresh() / "ca"
    c.run(["registrar", "init", "--dir", str(ca)])
    return ca


def _registrar_enroll(c: Ctx) -> list[str]:
    ca = _registrar_ca(c)
    return ["registrar", "enroll", "--dir", str(ca), "--socket", str(c.socket), *c.ek_flags]


def _registrar_challenge(c: Ctx) -> list[str]:
    ca = _registrar_ca(c)
    return ["registrar", "challenge", "--dir", str(ca), "--identity", str(c.world.identity),
            "--out", str(ca.parent / "challenge.json"), *c.ek_flags]  # fmt: skip


def _registrar_answer(c: Ctx) -> list[str]:
    argv = _registrar_challenge(c)
    c.run(argv)
    d = Path(argv[argv.index("--out") + 1]).parent
    return ["registrar", "answer", "--socket", str(c.socket),
            "--challenge", str(d / "challenge.json"), "--out", str(d / "answer.json")]  # fmt: skip


def _registrar_issue(c: Ctx) -> list[str]:
    argv = _registrar_answer(c)
    c.run(argv)
    d = Path(argv[argv.index("--out") + 1]).parent
    return ["registrar", "issue", "--dir", str(d / "ca"), "--answer", str(d / "answer.json"),
            "--out", str(d / "ak.pem"), *c.ek_flags]  # fmt: skip


def _registrar_install(c: Ctx) -> list[str]:
    argv = _registrar_issue(c)
    c.run(argv)
    chain = argv[argv.index("--out") + 1]
    return ["registrar", "install", "--socket", str(c.socket), "--chain", chain]


def _broker_init(c: Ctx) -> list[str]:
    return ["broker", "init", "--dir", str(c.fresh() / "broker")]


def _broker_dir(c: Ctx) -> Path:
    directory = c.fresh() / "broker"
    c.run(["broker", "init", "--dir", str(directory)])
    return directory


def _broker_add_key(c: Ctx) -> list[str]:
    directory = _broker_dir(c)
    (directory.parent / "key").write_text("11" * KEY_LEN)
    return ["broker", "add-key", "--dir", str(directory), "--model-id", "m", "--key-id", "k",
            "--key-file", str(directory.parent / "key")]  # fmt: skip


DECISION = {
    "decision_id": "d1",
    "time_unix": 1,
    "decision": "deny",
    "reason": "nonce-unknown",
    "model_id": "m",
    "key_id": "k",
    "tenant": "t",
    "operation": "decrypt-for-load",
    "request_sha256": "00" * 32,
    "embassy_keyid": None,
    "policy_sha256": None,
    "input_sha256": None,
}


def _broker_log(c: Ctx) -> list[str]:
    from embassy.broker.keyring import load_signing_key
    from embassy.broker.store import SqliteStore

    directory = _broker_dir(c)
    signing = load_signing_key(directory, b"broker pass")
    with SqliteStore(directory / "decisions.db") as store:
        store.append_decision(DECISION, signing.sign)
    return ["broker", "log", "--dir", str(directory), "--verify"]


def _weights_keygen(c: Ctx) -> list[str]:
    return ["weights", "keygen", "--out", str(c.fresh() / "wk")]


def _model(c: Ctx) -> tuple[Path, Path]:
    d = c.fresh()
    arrays = {"w": np.arange(3000, dtype=np.float32)}
    (d / "m.safetensors").write_bytes(safetensors_bytes(arrays, {"w": "F32"}, {}))
    c.run(["weights", "keygen", "--out", str(d / "wk")])
    return d, d / "wk"


def _weights_encrypt(c: Ctx) -> list[str]:
    d, key = _model(c)
    return ["weights", "encrypt", "--in", str(d / "m.safetensors"), "--out", str(d / "m.emw"),
            "--model-id", "m", "--key-id", "k", "--key-file", str(key)]  # fmt: skip


def _weights_inspect(c: Ctx) -> list[str]:
    argv = _weights_encrypt(c)
    c.run(argv)
    return ["weights", "inspect", argv[argv.index("--out") + 1]]


def _json_line(text: str) -> dict[str, Any]:
    doc = json.loads(text)
    assert isinstance(doc, dict)
    return doc


@dataclass(frozen=True)
class Case:
    argv: Callable[[Ctx], list[str]]
    prose: Callable[[str], object]  # asserts on the default stdout
    document: Callable[[dict[str, Any]], object]  # asserts on the --json document
    ok_key: bool = True  # the document carries "ok": true (measure's is the measurement)


def _is(value: object) -> Callable[[object], bool]:
    def check(got: object) -> bool:
        assert got == value, got
        return True

    return check


CASES: dict[str, Case] = {
    "measure": Case(
        _measure,
        lambda out: HEX64.match(out.strip()),
        lambda d: d["v"] == 1 and "code" in d,
        ok_key=False,
    ),
    "measure --uki": Case(
        _measure_uki,
        lambda out: _json_line(out)["pcrs"],
        lambda d: d["pcrs"] and d["measurement"],
        ok_key=False,
    ),
    "identity": Case(
        _identity,
        lambda out: "ak_certificates" in _json_line(out),
        lambda d: d["activated"] and HEX64.match(d["ak_name"][4:]) and d["identity"]["v"],
    ),
    "verify identity": Case(
        _verify_identity,
        lambda out: out.endswith("verified\n") and out.startswith("ok    "),
        lambda d: d["checks"] and d["facts"],
    ),
    "audit": Case(
        _audit,
        _is(""),
        lambda d: d["last_seq"] >= d["first_seq"] and d["statements"] > 0 and not d["complete"],
    ),
    "payload seal": Case(
        _payload_seal,
        _is(""),
        lambda d: (
            d["measurement"] == MEASUREMENT.digest.hex()
            and d["stream_bytes"] > 16_000
            and d["envelope"]["payload_id"]
            and d["workload"]
        ),
    ),
    "keygen": Case(
        _keygen,
        lambda out: set(_json_line(out)) == {"name", "ed25519", "keyid"},
        lambda d: d["name"] == "aisi" and d["encrypted"] is False and d["keyid"],
    ),
    "keygen --reply": Case(
        _keygen_reply,
        lambda out: _json_line(out)["suite"] == "x25519" and "ok" not in _json_line(out),
        lambda d: d["public"]["suite"] == "x25519" and HEX64.match(d["keyid"]) and d["encrypted"],
    ),
    "result open": Case(
        _result_open,
        _is(""),
        lambda d: d["bytes"] == 19 * 5000 and d["job"] == "ab" * 16 and d["binding"]["job"],
    ),
    "meters instruct": Case(
        _meters_instruct,
        lambda out: _json_line(out)["payloadType"],
        lambda d: d["op"] == "read" and d["instruction"]["payloadType"] and d["expires_unix"],
    ),
    "meters read": Case(
        _meters_read,
        lambda out: "ok" not in _json_line(out) and _json_line(out)["authority"] == "aisi",
        lambda d: d["authority"] == "aisi" and d["answers_instruction"] and "meters" in d,
    ),
    "registrar init": Case(
        _registrar_init,
        lambda out: out.startswith("registrar: CA "),
        lambda d: HEX64.match(d["sha256"]),
    ),
    "registrar enroll": Case(
        _registrar_enroll,
        lambda out: out.startswith("registrar: AK ") and "installed in the daemon" in out,
        lambda d: d["installed"] and d["serial"],
    ),
    "registrar challenge": Case(
        _registrar_challenge,
        lambda out: out.startswith("registrar: challenge "),
        lambda d: d["id"] and d["ak_name"],
    ),
    "registrar answer": Case(
        _registrar_answer,
        lambda out: out.startswith("registrar: answer written"),
        lambda d: d["id"],
    ),
    "registrar issue": Case(
        _registrar_issue,
        lambda out: "certified; install" in out,
        lambda d: d["ak_name"] and d["tpm_kind"],
    ),
    "registrar install": Case(
        _registrar_install,
        lambda out: out.startswith("registrar: installed 1 certificate"),
        lambda d: d["ok"] is True,
    ),
    "broker init": Case(
        _broker_init,
        lambda out: set(_json_line(out)) == {"broker_keyid", "public_key"},
        lambda d: d["broker_keyid"] and d["public_key"].endswith("broker-signing.pub"),
    ),
    "broker add-key": Case(
        _broker_add_key,
        lambda out: _json_line(out) == {"model_id": "m", "key_id": "k", "keys": 1},
        lambda d: d["keys"] == 1,
    ),
    "broker log": Case(
        _broker_log,
        lambda out: _json_line(out) == {"seq": 1, **DECISION},
        lambda d: d["verified"] and [e["decision_id"] for e in d["decisions"]] == ["d1"],
    ),
    "weights keygen": Case(
        _weights_keygen,
        lambda out: out.startswith("weights: new key in "),
        lambda d: d["key_file"].endswith("wk"),
    ),
    "weights encrypt": Case(
        _weights_encrypt,
        lambda out: out.startswith("weights: ") and "header sha256" in out,
        lambda d: HEX64.match(d["header_sha256"]) and d["file_size"] > 12_000,
    ),
    "weights inspect": Case(
        _weights_inspect,
        lambda out: out.startswith("{\n  ") and json.loads(out)["model_id"] == "m",
        lambda d: d["header"]["model_id"] == "m",
    ),
}


def _no_floats(value: Any) -> None:
    assert not isinstance(value, float), value
    if isinstance(value, dict):
        for item in value.values():
            _no_floats(item)
    elif isinstance(value, list):
        for item in value:
            _no_floats(item)


@pytest.mark.parametrize("name", sorted(CASES))
def test_json_is_one_document_and_prose_stays_the_default(
    name: str, ctx: Ctx, capsys: Capture
) -> None:
    case = CASES[name]
    assert main(case.argv(ctx)) == 0
    prose = capsys.readouterr().out
    assert case.prose(prose), prose

    assert main([*case.argv(ctx), "--json"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    assert out.count("\n") == 1, "one document on one line, nothing else"
    doc = json.loads(out)
    assert isinstance(doc, dict)
    # Keys sorted, as verify's; measure prints its document in the canonical form it had.
    assert out in (json.dumps(doc, sort_keys=True) + "\n", canonical_json(doc).decode() + "\n")
    if case.ok_key:
        assert doc["ok"] is True
    _no_floats(doc)
    assert case.document(doc), doc


def test_every_result_command_has_json() -> None:
    """Every leaf command takes --json, except the long-running services (they print no
    result: `serve` logs, `broker serve` prints a ready line and runs until stopped)."""
    without = set()

    def walk(parser: Any, path: tuple[str, ...]) -> None:
        subs = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            if not any("--json" in a.option_strings for a in parser._actions):
                without.add(" ".join(path))
            return
        for name, child in subs[0].choices.items():
            walk(child, (*path, name))

    walk(build_parser(), ())
    assert without == {"serve", "broker serve"}


# -- errors: the same exit code, the prose on stderr, the error document on stdout ---------

ERRORS: dict[str, tuple[Callable[[Ctx], list[str]], int, str]] = {
    "identity without a daemon": (
        lambda c: ["identity", "--socket", str(c.tmp / "none.sock")],
        7,
        "cannot-connect",
    ),
    "payload seal under another measurement": (
        lambda c: [*_payload_seal(c), "--expect-measurement", "00" * 32],
        1,
        "",
    ),
    "keygen over a key": (lambda c: ["keygen", "--out", str(c.authority_key)], 2, "config-invalid"),
    "weights inspect of a non-model": (
        lambda c: ["weights", "inspect", str(c.world.identity)],
        3,
        "weights-malformed",
    ),
    "broker log without a log": (
        lambda c: ["broker", "log", "--dir", str(c.fresh())],
        2,
        "config-invalid",
    ),
    "audit to stdout": (lambda c: [*_audit(c)[:-1], "-"], 2, "config-invalid"),
    "result open to stdout": (lambda c: [*_result_open(c)[:-1], "-"], 2, "config-invalid"),
}


@pytest.mark.parametrize("name", sorted(ERRORS))
def test_an_error_is_a_document_too_with_the_same_exit_code(
    name: str, ctx: Ctx, capsys: Capture
) -> None:
    make, code, error_code = ERRORS[name]
    argv = make(ctx)
    if name.endswith("to stdout"):  # refused only with --json: stdout holds the document
        assert main(argv) == 0
        capsys.readouterr()
    else:
        assert main(argv) == code
        plain = capsys.readouterr()
        assert plain.out == ""
        assert plain.err.startswith("embassy: ")
    assert main([*make(ctx), "--json"]) == code
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert out.count("\n") == 1
    assert doc["ok"] is False
    assert set(doc["error"]) == {"code", "message"}
    if error_code:
        assert doc["error"]["code"] == error_code
    assert f"embassy: {doc['error']['code']}: {doc['error']['message']}" in err


def test_a_usage_error_with_json_is_only_on_stderr(capsys: Capture) -> None:
    """argparse could not read the command line, so --json in it is not known to be meant."""
    assert main(["keygen", "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage" in err
