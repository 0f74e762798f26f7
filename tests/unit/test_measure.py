from __future__ import annotations

import base64
from pathlib import Path

import pytest

from embassy.config import parse_config
from embassy.errors import WireFormatError
from embassy.measure import code_digest, measure, package_files, parse_measurement


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


def test_same_inputs_same_value_in_two_places(tmp_path: Path) -> None:
    files = {"a.py": b"x = 1\n", "sub/b.py": b"y = 2\n"}
    one = _tree(tmp_path / "one", files)
    two = _tree(tmp_path / "elsewhere" / "two", files)
    (two / "__pycache__").mkdir()
    (two / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00junk")
    config = parse_config(None)
    assert measure(config, one) == measure(config, two)


def test_each_input_moves_the_measurement(tmp_path: Path) -> None:
    root = _tree(tmp_path / "pkg", {"a.py": b"x = 1\n"})
    base = measure(parse_config(None), root)
    changed_code = _tree(tmp_path / "pkg2", {"a.py": b"x = 2\n"})
    assert measure(parse_config(None), changed_code).code != base.code
    assert measure(parse_config(None), changed_code).digest != base.digest
    other_config = measure(parse_config({"pcrs": {"log": 15}}), root)
    assert other_config.config != base.config
    assert other_config.policy == base.policy
    key = base64.b64encode(bytes(range(32))).decode()
    with_authority = measure(parse_config({"authorities": [{"name": "a", "ed25519": key}]}), root)
    assert with_authority.policy != base.policy
    assert with_authority.config == base.config


def test_renamed_file_changes_the_code_digest() -> None:
    assert code_digest([("a.py", b"1")]) != code_digest([("b.py", b"1")])
    assert code_digest([("a.py", b"1"), ("b.py", b"2")]) == code_digest(
        [("b.py", b"2"), ("a.py", b"1")]
    )


def test_document_round_trip_and_tamper(tmp_path: Path) -> None:
    m = measure(parse_config(None), _tree(tmp_path, {"a.py": b""}))
    assert parse_measurement(m.encode()) == m
    forged = m.encode().replace(m.code.hex().encode(), b"00" * 32)
    with pytest.raises(WireFormatError, match="does not match its components"):
        parse_measurement(forged)


def test_installed_package_is_measured() -> None:
    import embassy

    files = dict(package_files(Path(embassy.__file__).parent))
    assert "cli.py" in files
    assert "verify/identity.py" in files
    assert not any(name.endswith(".pyc") for name in files)
