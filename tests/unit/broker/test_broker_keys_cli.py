"""The broker's secrets at rest, its config parser, and the `embassy broker` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from embassy.broker.config import parse_broker_config
from embassy.broker.keyring import (
    KEYRING_FILE,
    SIGNING_KEY_FILE,
    add_key,
    init_broker,
    load_keyring,
    load_signing_key,
    read_weights_key,
)
from embassy.cli import main
from embassy.errors import ConfigError

PASS = b"correct horse"
KEY = bytes(range(200, 232))


def test_keys_are_never_on_disk_in_the_clear(tmp_path: Path) -> None:
    public = init_broker(tmp_path, PASS)
    assert add_key(tmp_path, PASS, "minilm-l6", "k1", KEY) == 1
    assert load_keyring(tmp_path, PASS) == {("minilm-l6", "k1"): KEY}
    assert load_signing_key(tmp_path, PASS).public_key() == public
    for path in tmp_path.iterdir():
        data = path.read_bytes()
        assert KEY not in data
        assert KEY.hex().encode() not in data
    assert (tmp_path / SIGNING_KEY_FILE).stat().st_mode & 0o077 == 0
    assert (tmp_path / KEYRING_FILE).stat().st_mode & 0o077 == 0


def test_wrong_passphrase_and_tampering_refused(tmp_path: Path) -> None:
    init_broker(tmp_path, PASS)
    add_key(tmp_path, PASS, "m", "k", KEY)
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_keyring(tmp_path, b"wrong")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        load_signing_key(tmp_path, b"wrong")
    doc = json.loads((tmp_path / KEYRING_FILE).read_text())
    doc["kdf"]["n"] = 1 << 14  # a weaker KDF than the file was sealed with
    (tmp_path / KEYRING_FILE).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="changed"):
        load_keyring(tmp_path, PASS)


def test_existing_keys_are_never_replaced(tmp_path: Path) -> None:
    init_broker(tmp_path, PASS)
    add_key(tmp_path, PASS, "m", "k", KEY)
    with pytest.raises(ConfigError, match="already has a key"):
        add_key(tmp_path, PASS, "m", "k", bytes(32))
    with pytest.raises(ConfigError, match="refusing to replace"):
        init_broker(tmp_path, PASS)


def test_weights_key_files(tmp_path: Path) -> None:
    (tmp_path / "raw").write_bytes(KEY)
    (tmp_path / "hex").write_text(KEY.hex() + "\n")
    (tmp_path / "short").write_bytes(KEY[:31])
    assert read_weights_key(tmp_path / "raw") == KEY
    assert read_weights_key(tmp_path / "hex") == KEY
    with pytest.raises(ConfigError, match="32-byte key"):
        read_weights_key(tmp_path / "short")


def test_config(tmp_path: Path) -> None:
    config = parse_broker_config(
        {
            "dir": "state",
            "policy": "policy.rego",
            "listen": {"tcp": "127.0.0.1:9000"},
            "trust": {
                "swtpm_cas": ["ca.pem"],
                "allow_software_tpm": True,
                "expected_pcrs": {4: "ab" * 32},
            },
        },
        tmp_path,
    )
    assert config.dir == tmp_path / "state"
    assert config.tcp == ("127.0.0.1", 9000)
    assert config.sqlite == tmp_path / "state" / "decisions.db"
    assert config.trust.expected_pcrs == {4: bytes.fromhex("ab" * 32)}
    for tree, message in [
        ({"policy": "p"}, "dir: missing"),
        ({"dir": "d", "policy": "p", "extra": 1}, "extra: unknown key"),
        ({"dir": "d", "policy": "p", "listen": {"tcp": "nohost"}}, "listen.tcp"),
        ({"dir": "d", "policy": "p", "trust": {"expected_pcrs": {4: "xy"}}}, "expected_pcrs.4"),
        ({"dir": "d", "policy": "p", "store": {"sqlite": "a", "postgres": "b"}}, "not both"),
        ({"dir": "d", "policy": "p", "nonce_ttl_s": 0}, "nonce_ttl_s"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_broker_config(tree, tmp_path)


def test_cli_init_add_key_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EMBASSY_BROKER_PASSPHRASE", "pass")
    directory = tmp_path / "broker"
    assert main(["broker", "init", "--dir", str(directory)]) == 0
    (tmp_path / "key").write_text(KEY.hex())
    assert (
        main(
            [
                "broker",
                "add-key",
                "--dir",
                str(directory),
                "--model-id",
                "m",
                "--key-id",
                "k",
                "--key-file",
                str(tmp_path / "key"),
            ]
        )
        == 0
    )
    assert load_keyring(directory, b"pass") == {("m", "k"): KEY}
    # An empty log verifies once a store exists; a missing one is a config error.
    assert main(["broker", "log", "--dir", str(directory), "--verify"]) != 0
    monkeypatch.delenv("EMBASSY_BROKER_PASSPHRASE")
    assert (
        main(
            [
                "broker",
                "add-key",
                "--dir",
                str(directory),
                "--model-id",
                "m",
                "--key-id",
                "k2",
                "--key-file",
                str(tmp_path / "key"),
            ]
        )
        != 0
    )
    assert "EMBASSY_BROKER_PASSPHRASE" in capsys.readouterr().err


def test_cli_log_verifies_the_broker_signed_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from embassy.broker.store import SqliteStore

    directory = tmp_path / "broker"
    init_broker(directory, PASS)
    signing = load_signing_key(directory, PASS)
    decision = {
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
    with SqliteStore(directory / "decisions.db") as store:
        store.append_decision(decision, signing.sign)
    assert main(["broker", "log", "--dir", str(directory), "--verify"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["reason"] == "nonce-unknown"
    assert "verified: 1 entries" in out.err
    # Another broker's key does not verify this log.
    other = tmp_path / "other"
    init_broker(other, PASS)
    (directory / "broker-signing.pub").write_bytes((other / "broker-signing.pub").read_bytes())
    assert main(["broker", "log", "--dir", str(directory), "--verify"]) != 0
