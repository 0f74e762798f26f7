"""``embassy weights keygen | encrypt | inspect`` through ``embassy.cli.main``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from embassy.cli import main
from tests.unit.weights.weights_vectors import safetensors_bytes
from workload_sdk.weights import WeightsError, load_encrypted


def _model(tmp_path: Path) -> Path:
    src = tmp_path / "model.safetensors"
    arrays = {"w": np.arange(3000, dtype=np.float32), "b": np.ones(3, np.float16)}
    src.write_bytes(safetensors_bytes(arrays, {"w": "F32", "b": "F16"}, {"k": "v"}))
    return src


def test_keygen_encrypt_inspect_load(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "weights.key"
    assert main(["weights", "keygen", "--out", str(key)]) == 0
    assert key.stat().st_mode & 0o777 == 0o600
    assert main(["weights", "keygen", "--out", str(key)]) == 2  # never overwritten
    assert "exists" in capsys.readouterr().err
    out = tmp_path / "model.emw"
    argv = ["weights", "encrypt", "--in", str(_model(tmp_path)), "--out", str(out)]
    argv += ["--model-id", "acme/m@1", "--key-id", "k1", "--key-file", str(key)]
    assert main([*argv, "--json", "--chunk-size", "4096"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True
    assert result["file_size"] == out.stat().st_size
    assert main(["weights", "inspect", str(out)]) == 0
    public = json.loads(capsys.readouterr().out)
    assert public["model_id"] == "acme/m@1"
    assert public["chunk_size"] == 4096
    assert [t["name"] for t in public["tensors"]] == ["w", "b"]
    secret = bytearray(bytes.fromhex(key.read_text()))
    loaded = load_encrypted(out, secret, model_id="acme/m@1", key_id="k1")
    assert np.array_equal(loaded["w"], np.arange(3000, dtype=np.float32))
    assert main([*argv, "--hide-names"]) == 0
    capsys.readouterr()
    assert main(["weights", "inspect", str(out)]) == 0
    public = json.loads(capsys.readouterr().out)
    assert public["names_hidden"] is True
    assert "tensors" not in public
    with pytest.raises(WeightsError) as caught:
        load_encrypted(out, os.urandom(32), model_id="acme/m@1", key_id="k1")
    assert caught.value.code == "weights-wrong-key"


def test_key_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _model(tmp_path)
    out = tmp_path / "model.emw"
    key = tmp_path / "k"
    argv = ["weights", "encrypt", "--in", str(src), "--out", str(out)]
    argv += ["--model-id", "m", "--key-id", "k", "--key-file", str(key)]
    key.write_bytes(bytes(range(32)))
    key.chmod(0o600)
    assert main(argv) == 0  # raw
    key.chmod(0o640)
    assert main(argv) == 2
    assert "mode 0640" in capsys.readouterr().err
    for bad in (b"short", b"zz" * 32, bytes(33)):
        key.write_bytes(bad)
        key.chmod(0o600)
        assert main(argv) == 2
    assert "hex digits" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "none")]) == 2
    assert main([*argv, "--chunk-size", "5000"]) == 2  # usage: not a power of two


def test_inspect_refuses_what_is_not_an_encrypted_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "x.emw"
    path.write_bytes(b"not a model file at all")
    assert main(["weights", "inspect", str(path)]) == 3
    assert "weights-malformed: magic" in capsys.readouterr().err
    src = tmp_path / "bad.safetensors"
    src.write_bytes(b"\x10" + bytes(7) + b"{}")
    key = tmp_path / "k"
    key.write_text(bytes(32).hex() + "\n")
    key.chmod(0o600)
    argv = ["weights", "encrypt", "--in", str(src), "--out", str(path)]
    assert main([*argv, "--model-id", "m", "--key-id", "k", "--key-file", str(key)]) == 3
    assert "safetensors:" in capsys.readouterr().err
