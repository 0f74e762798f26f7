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
    # Job mode off: no jobs section, so configs from before job mode measure the same.
    assert "jobs" not in effective
    # No metrics port: no metrics section either (a TCP listener is measured when set).
    assert "metrics" not in effective
    for key in SCHEMA:
        if key.path == "workload" or key.path.startswith(("jobs.", "metrics.")):
            continue
        node = effective
        for part in key.path.split("."):
            node = node[part]


def test_jobs_section_is_measured_whole() -> None:
    config = parse_config({"socket_group": "10001", "jobs": {"image": "embassy/job:1"}})
    effective = config.effective()
    for key in SCHEMA:
        if key.path.startswith("jobs."):
            assert key.path.split(".")[1] in effective["jobs"]
    assert config.jobs is not None
    assert config.jobs.pool_size == 2


@pytest.mark.parametrize(
    ("tree", "path", "fragment"),
    [
        ({"jobs": {"pool_size": 3}}, "jobs.pool_size", "set jobs.image"),
        ({"jobs": {"image": "x"}}, "socket_group", "job mode needs it"),
        ({"socket_group": "1", "jobs": {"image": "x", "user": "0"}}, "jobs.user", "expected"),
        (
            {"socket_group": "1", "jobs": {"image": "x", "pool_size": 65}},
            "jobs.pool_size",
            "between",
        ),
        ({"socket_group": "1", "jobs": {"image": "x", "command": []}}, "jobs.command", "non-empty"),
        (
            {"socket_group": "1", "jobs": {"image": "x", "runtime": "a b"}},
            "jobs.runtime",
            "expected",
        ),
    ],
)
def test_jobs_section_refusals(tree: dict[str, object], path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(tree)
    assert f"config: {path}:" in err.value.message
    assert fragment in err.value.message


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


def _write_config(tmp_path: Path, metadata: Path, workload: str = "") -> Path:
    config = tmp_path / "embassy.yaml"
    config.write_text(f"workload_metadata: {metadata}\n{workload}")
    return config


def test_workload_metadata_file_layers_between_the_section_and_the_environment(
    tmp_path: Path,
) -> None:
    metadata = tmp_path / "workload.json"
    metadata.write_text('{"image": "chosen:at-boot", "env": {"B": "2"}, "memory": "1g"}')
    config = _write_config(
        tmp_path, metadata, "workload:\n  image: baked:in\n  env: {A: '1', B: '1'}\n  pids: 64\n"
    )
    spec = load_config(config, {}).workload
    assert spec is not None
    assert spec.image == "chosen:at-boot"
    assert dict(spec.env) == {"A": "1", "B": "2"}  # env maps merge, the later layer wins
    assert spec.limits.pids == 64
    assert spec.limits.memory_bytes == 1 << 30
    spec = load_config(config, {"EMBASSY_WORKLOAD_IMAGE": "from:env"}).workload
    assert spec is not None
    assert spec.image == "from:env"


def test_workload_metadata_alone_chooses_the_workload(tmp_path: Path) -> None:
    metadata = tmp_path / "workload.json"
    metadata.write_text('{"image": "chosen:at-boot"}')
    spec = load_config(_write_config(tmp_path, metadata), {}).workload
    assert spec is not None
    assert spec.image == "chosen:at-boot"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "cannot read"),
        (b'["image"]', "expected a JSON object"),
        (b'{"image": "a:b", "image": "c:d"}', "duplicate"),
        (b"\xff", "not UTF-8"),
        (b'{"imgae": "a:b"}', "workload.json: workload.imgae: unknown key"),
        (b'{"privileged": "yes"}', "workload.json: workload.privileged"),
        (b'{"env": {"A": "1"}}', "image: required"),
    ],
)
def test_bad_workload_metadata_is_a_precise_config_error(
    tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    metadata = tmp_path / "workload.json"
    if content is not None:
        metadata.write_bytes(content)
    with pytest.raises(ConfigError, match="workload") as info:
        load_config(_write_config(tmp_path, metadata), {})
    assert fragment in info.value.message


def test_measure_does_not_need_the_metadata_file_but_measures_its_path(tmp_path: Path) -> None:
    # The auditor measures the image's config on another machine, where the file chosen at
    # boot does not exist; the workload is logged at launch, not measured.
    absent = load_config(_write_config(tmp_path, tmp_path / "absent.json"), read_metadata=False)
    assert absent.workload is None
    other = load_config(_write_config(tmp_path, tmp_path / "other.json"), read_metadata=False)
    assert absent.effective() != other.effective()
    assert absent.effective()["workload_metadata"] == str(tmp_path / "absent.json")


def test_explicit_null_is_absent_for_keys_whose_default_is_null() -> None:
    assert parse_config({"workload_metadata": None, "tpm": {"device": None}}) == parse_config(None)
    with pytest.raises(ConfigError, match="socket"):
        parse_config({"socket": None})
