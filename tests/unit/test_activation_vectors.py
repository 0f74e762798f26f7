"""The pinned activation files in tests/vectors/activations/ get exactly their pinned verdict.

``scripts/gen_vectors.py`` writes every vector of ``scripts/activation_vectors.py`` there as
``<name>.act`` and their verdicts into ``expected.json``. These tests read the files from
disk (they never regenerate them; ``test_vectors.py`` checks they are up to date) and parse
each with ``parse_activation(data, max_bytes=VECTOR_MAX_BYTES)``, then again through
``read_activation_file`` from a copy: a hostile file raises exactly the ``ActivationError``
code pinned for it, a good one parses to exactly the pinned header fields.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embassy.errors import ActivationError
from embassy.metering.activation import Activation, parse_activation, read_activation_file
from embassy.wire.codec import canonical_json
from workload_sdk.activations import CHECKSUM_LEN, CHECKSUM_OFFSET

ROOT = Path(__file__).resolve().parents[2]
ACTIVATION_DIR = ROOT / "tests" / "vectors" / "activations"
EXPECTED: dict[str, dict[str, Any]] = json.loads((ACTIVATION_DIR / "expected.json").read_bytes())
NAMES = sorted(EXPECTED)
GOOD_KEYS = {"sha256", "expect", "session", "seq", "tensor", "dtype", "shape"}
BAD_KEYS = {"sha256", "expect"}


def _max_bytes() -> int:
    """``VECTOR_MAX_BYTES`` of scripts/activation_vectors.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location(
        "activation_vectors", ROOT / "scripts" / "activation_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    value = module.VECTOR_MAX_BYTES
    assert isinstance(value, int)
    return value


MAX_BYTES = _max_bytes()


def _pinned(name: str) -> bytes:
    data = (ACTIVATION_DIR / f"{name}.act").read_bytes()
    assert hashlib.sha256(data).hexdigest() == EXPECTED[name]["sha256"], "file changed on disk"
    return data


def _verdict(parse: Any) -> tuple[str, Activation | None]:
    """(``"ok"`` and the activation) or (the error's code and None)."""
    try:
        activation = parse()
    except ActivationError as exc:
        return exc.code, None
    return "ok", activation


def _check(name: str, code: str, activation: Activation | None, data: bytes) -> None:
    expected = EXPECTED[name]
    assert code == expected["expect"], name
    if activation is None:
        return
    assert activation.session.hex() == expected["session"]
    assert activation.seq == expected["seq"]
    assert activation.tensor == expected["tensor"]
    assert activation.dtype == expected["dtype"]
    assert list(activation.shape) == expected["shape"]
    assert activation.data.shape == activation.shape
    assert activation.data.dtype == np.dtype(expected["dtype"])
    assert not activation.data.flags.writeable
    # The checksum field names the file: the pinned bytes' own field.
    assert activation.sha256 == data[CHECKSUM_OFFSET : CHECKSUM_OFFSET + CHECKSUM_LEN]
    assert bool(np.isfinite(activation.data).all())


def test_expected_is_complete_and_canonical() -> None:
    raw = (ACTIVATION_DIR / "expected.json").read_bytes()
    assert raw == canonical_json(EXPECTED) + b"\n"
    files = {p.name for p in ACTIVATION_DIR.iterdir()}
    assert files == {"expected.json"} | {f"{name}.act" for name in NAMES}
    for name, verdict in EXPECTED.items():
        assert set(verdict) == (GOOD_KEYS if verdict["expect"] == "ok" else BAD_KEYS), name
    verdicts = {v["expect"] for v in EXPECTED.values()}
    assert verdicts == {"ok", "activation-corrupt", "activation-truncated", "activation-oversized"}


@pytest.mark.parametrize("name", NAMES)
def test_parse_activation(name: str) -> None:
    data = _pinned(name)
    code, activation = _verdict(lambda: parse_activation(data, max_bytes=MAX_BYTES))
    _check(name, code, activation, data)


@pytest.mark.parametrize("name", NAMES)
def test_read_activation_file(name: str, tmp_path: Path) -> None:
    data = _pinned(name)
    copy = tmp_path / f"{name}.act"
    shutil.copyfile(ACTIVATION_DIR / f"{name}.act", copy)
    code, activation = _verdict(lambda: read_activation_file(copy, max_bytes=MAX_BYTES))
    _check(name, code, activation, data)
