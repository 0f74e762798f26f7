from __future__ import annotations

import base64
from pathlib import Path

import pytest

from embassy.cli import main
from embassy.config import SCHEMA, load_config, parse_config, render_docs
from embassy.errors import ConfigError


def test_defaults_are_valid_and_complete() -> None:
    config = parse_config(None)
    assert config.pcrs.quoted == (4, 11, 12, 13, 14)
    assert config.tpm_device is None
    effective = config.effective()
    # Every schema key but the workload appears in the effective (measured) config; the
    # workload is recorded as launch events instead, so the measurement does not reveal it.
    assert "workload" not in effective
    for key in SCHEMA:
        if key.path == "workload":
            continue
        node = effective
        for part in key.path.split("."):
            node = node[part]


@pytest.mark.parametrize(
    ("tree", "path", "fragment"),
    [
        ({"tpm": {"devcie": "/dev/tpmrm0"}}, "tpm.devcie", "unknown key"),
        ({"nope": 1}, "nope", "unknown key"),
        ({"pcrs": {"log": 16}}, "pcrs.log", "software can reset"),
        ({"pcrs": {"embassy": 11}}, "pcrs.embassy", "boot path"),
        ({"pcrs": {"embassy": 14}}, "pcrs.log", "must differ"),
        ({"pcrs": {"boot": [4, 4]}}, "pcrs.boot", "distinct"),
        ({"pcrs": {"boot": "4"}}, "pcrs.boot", "list"),
        ({"http": {"max_body_bytes": True}}, "http.max_body_bytes", "integer"),
        ({"http": {"max_body_bytes": 10}}, "http.max_body_bytes", "between"),
        ({"statement_log": {"checkpoint_every": 0}}, "statement_log.checkpoint_every", ">= 1"),
        ({"log_level": "loud"}, "log_level", "one of"),
        ({"socket": ""}, "socket", "non-empty"),
        ({"authorities": [{"name": "a"}]}, "authorities[0].ed25519", "base64"),
        ({"authorities": [{"name": "a", "ed25519": "AAAA"}]}, "authorities[0].ed25519", "32 bytes"),
        (
            {"authorities": [{"name": "a", "ed25519": "x", "extra": 1}]},
            "authorities[0].extra",
            "unknown",
        ),
    ],
)
def test_bad_values_name_their_key(tree: dict[str, object], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tree)
    assert f"config: {path}:" in info.value.message
    assert fragment in info.value.message


def test_duplicate_authority_refused() -> None:
    key = base64.b64encode(bytes(32)).decode()
    with pytest.raises(ConfigError, match="duplicate authority"):
        parse_config({"authorities": [{"name": "a", "ed25519": key}] * 2})


def test_load_config_reports_yaml_and_io_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("socket: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(bad)


def test_serve_with_bad_config_exits_2_with_the_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tpm:\n  devcie: /dev/tpmrm0\n")
    assert main(["serve", "--config", str(cfg)]) == 2
    assert "tpm.devcie: unknown key" in capsys.readouterr().err


def test_config_docs_are_generated_from_the_schema() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert docs.read_text() == render_docs()
    for key in SCHEMA:
        assert f"`{key.path}`" in render_docs()


def test_workload_comes_from_the_section_and_the_environment() -> None:
    config = parse_config(
        {"workload": {"image": "embassy/workload-base:bookworm-v2", "memory": "512m"}},
        {"EMBASSY_WORKLOAD_IMAGE": "other:tag"},
    )
    assert config.workload is not None
    assert (config.workload.image, config.workload.limits.memory_bytes) == (
        "other:tag",
        512 * 1024 * 1024,
    )
    assert parse_config(None).workload is None
    with pytest.raises(ConfigError, match=r"workload\.imagee"):
        parse_config({"workload": {"imagee": "x"}})


def test_a_failpoint_changes_the_measured_config() -> None:
    from embassy.measure import measure_config

    plain = measure_config(parse_config(None).effective())
    with_failpoint = measure_config(
        parse_config({"debug": {"failpoint": "seal:after-rules"}}).effective()
    )
    assert plain[0] != with_failpoint[0]
