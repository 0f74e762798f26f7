"""Hostile config values, found by a fuzzer: each is a ConfigError naming its key, never a
traceback (``embassy serve`` and ``embassy measure`` then exit 2 with a message).

The classes: Unicode digits (``str.isdigit()`` is true for '²', which int() refuses, and
int() reads Arabic-Indic digits), floats that overflow or are not finite, integers of
thousands of digits (repr() and int() of them raise ValueError), unbounded strings and
lists, lone surrogates (a YAML escape, or a non-UTF-8 environment), control characters and
non-string keys; through every layer: YAML values, ``EMBASSY_WORKLOAD_*`` variables and
the ``workload_metadata`` JSON file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from embassy.cli import main
from embassy.config import MAX_CONFIG_BYTES, load_config, parse_config
from embassy.errors import ConfigError

HUGE = 10**5000  # repr() and str() of it raise ValueError
DIGITS = "[" + "9" * 5000 + "]"
W = {"image": "i"}  # the smallest valid workload section


def _env(var: str, value: str) -> dict[str, str]:
    return {"EMBASSY_WORKLOAD_IMAGE": "i", f"EMBASSY_WORKLOAD_{var}": value}


# (config tree, environment, key the message must name)
CASES: list[tuple[dict[str, Any] | None, dict[str, str], str]] = [
    # EMBASSY_WORKLOAD_* variables
    (None, _env("PIDS", "²"), "EMBASSY_WORKLOAD_PIDS"),
    (None, _env("PIDS", "\u0663"), "EMBASSY_WORKLOAD_PIDS"),
    (None, _env("PIDS", "9" * 30), "WORKLOAD_PIDS"),
    (None, _env("CPUS", "1e999999"), "WORKLOAD_CPUS"),
    (None, _env("CPUS", "nan"), "WORKLOAD_CPUS"),
    (None, _env("CPUS", "-inf"), "WORKLOAD_CPUS"),
    (None, _env("CPUS", "-1"), "WORKLOAD_CPUS"),
    (None, _env("CPUS", "9" * 400), "WORKLOAD_CPUS"),
    (None, _env("CPUS", "\u0661.\u0665"), "WORKLOAD_CPUS"),
    (None, _env("MEMORY", "\u0665\u0661\u0662m"), "WORKLOAD_MEMORY"),
    (None, _env("MEMORY", "9" * 25), "WORKLOAD_MEMORY"),
    (None, _env("PORTS", "²:80"), "WORKLOAD_PORTS"),
    (None, _env("PORTS", "\u0668\u0660:80"), "WORKLOAD_PORTS"),
    (None, _env("COMMAND", "[" * 100_000), "COMMAND"),
    (None, _env("COMMAND", DIGITS), "COMMAND"),
    (None, _env("COMMAND", "[NaN]"), "COMMAND"),
    (None, _env("ENV", '{"A": 1e999}'), "WORKLOAD_ENV"),
    (None, {"EMBASSY_WORKLOAD_IMAGE": "a\udcffb"}, "EMBASSY_WORKLOAD_IMAGE"),
    (None, {"EMBASSY_WORKLOAD_IMAGE": "i", "EMBASSY_WORKLOAD_\udcff": "x"}, "EMBASSY_WORKLOAD_"),
    # workload: values (as YAML gives them)
    ({"workload": {**W, "cpus": math.inf}}, {}, "workload.cpus"),
    ({"workload": {**W, "cpus": math.nan}}, {}, "workload.cpus"),
    ({"workload": {**W, "cpus": HUGE}}, {}, "workload.cpus"),
    ({"workload": {**W, "cpus": 1e300}}, {}, "workload.cpus"),
    ({"workload": {**W, "pids": HUGE}}, {}, "workload.pids"),
    ({"workload": {**W, "pids": "²"}}, {}, "workload.pids"),
    ({"workload": {**W, "memory": HUGE}}, {}, "workload.memory"),
    ({"workload": {**W, "memory": "9" * 5000}}, {}, "workload.memory"),
    ({"workload": {**W, "ports": [{"container_port": "²", "host_port": 1}]}}, {}, "ports[0]"),
    ({"workload": {**W, "ports": [{"container_port": 80, "host_port": HUGE}]}}, {}, "ports[0]"),
    ({"workload": {**W, "ports": ["1:1"] * 5000}}, {}, "workload.ports"),
    ({"workload": {**W, "ports": [{HUGE: 1}]}}, {}, "workload.ports[0]"),
    ({"workload": {"image": "a" * 10_000}}, {}, "workload.image"),
    ({"workload": {"image": "a\udcffb"}}, {}, "workload.image"),
    ({"workload": {**W, "user": 2**40}}, {}, "workload.user"),
    ({"workload": {**W, "user": "root\n"}}, {}, "workload.user"),
    ({"workload": {**W, "env": {"A": "x" * 100_000}}}, {}, "workload.env.A"),
    ({"workload": {**W, "env": {"A" * 5000: "x"}}}, {}, "workload.env"),
    ({"workload": {**W, "command": ["x"] * 5000}}, {}, "workload.command"),
    ({"workload": {**W, "mounts": [{"source": "/a\x00", "target": "/b"}]}}, {}, "mounts[0]"),
    ({"workload": {**W, HUGE: 1}}, {}, "config: workload."),
    # the daemon's own keys
    ({"http": {"workers": HUGE}}, {}, "http.workers"),
    ({"http": {"workers": math.inf}}, {}, "http.workers"),
    ({"statement_log": {"checkpoint_every": -(2**70)}}, {}, "statement_log.checkpoint_every"),
    ({"socket": "/" + "a" * 200}, {}, "socket"),
    ({"data_dir": "/var/\x00lib"}, {}, "data_dir"),
    ({"data_dir": "/" + "d" * 10_000}, {}, "data_dir"),
    ({"tpm": {"device": "/dev/\ud800"}}, {}, "tpm.device"),
    ({"socket_group": "root\nother"}, {}, "socket_group"),
    ({"socket_group": "99999999999"}, {}, "socket_group"),
    ({"debug": {"failpoint": "x" * 100}}, {}, "debug.failpoint"),
    ({"authorities": [{"name": "a\n", "ed25519": "x"}]}, {}, "authorities[0].name"),
    ({"authorities": [{1: 2, "name": "a"}]}, {}, "authorities[0]"),
    ({"authorities": [{"name": "a"}] * 1000}, {}, "authorities"),
    ({"pcrs": {"boot": [4] * 1000}}, {}, "pcrs.boot"),
    ({"pcrs": {"boot": [HUGE]}}, {}, "pcrs.boot[0]"),
    ({"metering": {"spool_bytes": 1}}, {}, "metering.spool_bytes"),
    ({"metering": {"spool_bytes": 1 << 20, "max_activation_bytes": 2 << 20}}, {}, "spool_bytes"),
    ({"metering": {"spool_inodes": 10**30}}, {}, "metering.spool_inodes"),
    ({"metering": {"spool_gid": -1}}, {}, "metering.spool_gid"),
    ({"metering": {HUGE: 1}}, {}, "metering."),
    ({HUGE: 1}, {}, "<root>"),
]


@pytest.mark.parametrize(("tree", "environ", "key"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_hostile_value_is_a_config_error_naming_its_key(
    tree: dict[str, Any] | None, environ: dict[str, str], key: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(tree, environ)
    assert key in info.value.message
    assert len(info.value.message) < 1000  # the value is shown bounded, if at all


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ({"image": "i", "pids": "²"}, "workload.pids"),
        ({"image": "i", "cpus": "1e999999"}, "workload.cpus"),
        ({"image": "i", "memory": "\u0665\u0661\u0662m"}, "workload.memory"),
        ({"image": "i", "user": "a\x00b"}, "workload.user"),
    ],
)
def test_hostile_metadata_value_names_its_key(metadata: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(None, {}, metadata)
    assert f"workload_metadata None: {key}" in info.value.message


def _config(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "embassy.yaml"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"socket: /run/e\xff.sock\n", "is not UTF-8 (at byte 14)"),
        (b"\xfe\xff\x00s", "is not UTF-8"),
        (b"http:\n  workers: " + b"9" * 5000 + b"\n", "an integer is too long"),
        (b"[" * 100_000, "not valid YAML"),
        (b"a: " + b"x" * (MAX_CONFIG_BYTES + 1), f"larger than {MAX_CONFIG_BYTES} bytes"),
        (b'socket: "/run/\\ud800"\n', "socket: not valid UTF-8"),
        (b"workload:\n  image: i\n  cpus: 1.0e+999\n", "workload.cpus: expected a finite"),
        (b"http:\n  workers: .nan\n", "http.workers: expected an integer, got nan"),
    ],
)
def test_hostile_config_file_is_a_config_error(tmp_path: Path, data: bytes, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, data), {})
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"image": "i", "pids": ' + b"9" * 5000 + b"}", "workload_metadata"),
        (b'{"image": "i", "cpus": 1e999}', "workload.cpus: expected a finite"),
        (b"\xff" * 10, "not UTF-8"),
        (b" " * (MAX_CONFIG_BYTES + 1), "larger than"),
    ],
)
def test_hostile_metadata_file_is_a_config_error(
    tmp_path: Path, data: bytes, fragment: str
) -> None:
    metadata = tmp_path / "workload.json"
    metadata.write_bytes(data)
    config = _config(tmp_path, f"workload_metadata: {json.dumps(str(metadata))}\n".encode())
    with pytest.raises(ConfigError) as info:
        load_config(config, {})
    assert fragment in info.value.message


def test_metadata_path_with_nul_is_refused_before_it_is_opened(tmp_path: Path) -> None:
    config = _config(tmp_path, b'workload_metadata: "/etc/\\0x"\n')
    with pytest.raises(ConfigError, match="workload_metadata: NUL"):
        load_config(config, {})


@pytest.mark.parametrize("command", ["serve", "measure"])
def test_cli_exits_2_on_a_non_utf8_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    config = _config(tmp_path, b"log_level: d\xe9bug\n")
    assert main([command, "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config-invalid" in err
    assert "not UTF-8 (at byte 12)" in err
    assert "Traceback" not in err


def test_cli_exits_2_on_a_unicode_digit_in_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EMBASSY_WORKLOAD_IMAGE", "i")
    monkeypatch.setenv("EMBASSY_WORKLOAD_PIDS", "²")
    assert main(["serve", "--config", str(_config(tmp_path, b"{}\n"))]) == 2
    assert "EMBASSY_WORKLOAD_PIDS: expected an integer (ASCII digits)" in capsys.readouterr().err


def test_good_values_still_parse() -> None:
    config = parse_config(
        {
            "socket_group": "embassy",
            "debug": {"failpoint": "seal:after-rules"},
            "metering": {"spool_bytes": 64 << 20, "spool_inodes": 100, "spool_gid": 1000},
            "workload": {**W, "cpus": "0.5", "pids": "100", "memory": "1g", "user": 1000},
        },
        {"EMBASSY_WORKLOAD_CPUS": "2.25", "EMBASSY_WORKLOAD_PORTS": "127.0.0.1:0:80/udp"},
    )
    assert config.metering.spool_inodes == 100
    assert config.workload is not None
    assert config.workload.limits.nano_cpus == 2_250_000_000
    assert config.workload.limits.pids == 100
    assert config.workload.user == "1000"
    assert config.workload.ports[0].protocol == "udp"
