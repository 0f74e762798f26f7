"""The example Rego policy against pinned inputs, and deny-by-default for every way a
policy can fail to answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.broker.policy import RegoPolicy, policy_digest
from embassy.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "broker"
INPUTS = sorted((Path(__file__).parent / "inputs").glob("*.json"))


@pytest.fixture(scope="module")
def example() -> Iterator[RegoPolicy]:
    policy = RegoPolicy.from_files(str(EXAMPLE / "policy.rego"), str(EXAMPLE / "data.json"))
    yield policy
    policy.close()


def _policy(text: str, data: dict[str, Any] | None = None, **kw: Any) -> RegoPolicy:
    return RegoPolicy("package embassy.weights\nimport rego.v1\n" + text, data or {}, **kw)


@pytest.mark.parametrize("case", INPUTS, ids=[p.stem for p in INPUTS])
def test_pinned_input(example: RegoPolicy, case: Path) -> None:
    pinned = json.loads(case.read_text())
    outcome = example.evaluate(pinned["input"])
    assert (outcome.allow, outcome.reason) == (
        pinned["expect"]["allow"],
        pinned["expect"]["reason"],
    ), outcome.message


def test_example_requires_sealing_only_when_configured() -> None:
    data = json.loads((EXAMPLE / "data.json").read_text())
    data["broker"]["require_sealed"] = False
    pinned = json.loads((Path(__file__).parent / "inputs" / "deny-not-sealed.json").read_text())
    policy = RegoPolicy((EXAMPLE / "policy.rego").read_text(), data)
    try:
        assert policy.evaluate(pinned["input"]).allow
    finally:
        policy.close()


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("x := 1\n", "policy-undefined"),  # no allow rule at all
        ("allow if input.nope == 1\n", "policy-undefined"),  # no default, condition fails
        ('allow := "yes"\n', "policy-error"),  # not a boolean
        ("allow := 1\n", "policy-error"),
        ("allow := true\nallow := false if true\n", "policy-error"),  # conflicting values
        ('allow := true\ndeny_reason := "Not A Code"\n', "policy-error"),
        ('allow := true\ndeny_reason := "tenant-suspended"\n', "tenant-suspended"),
        ("default allow := false\n", "policy-denied"),
    ],
)
def test_deny_by_default(text: str, reason: str) -> None:
    policy = _policy(text)
    try:
        outcome = policy.evaluate({"a": 1})
    finally:
        policy.close()
    assert not outcome.allow
    assert outcome.reason == reason


def test_timeout_denies() -> None:
    policy = _policy(
        "allow if count([x | some x in numbers.range(1, 400000)]) > 0\n", timeout_s=0.001
    )
    try:
        outcome = policy.evaluate({})
    finally:
        policy.close()
    assert (outcome.allow, outcome.reason) == (False, "policy-timeout")


def test_policy_that_does_not_compile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="does not compile"):
        _policy("allow if {\n")


def test_digest_names_text_and_data() -> None:
    base = policy_digest("package p", {"a": 1})
    assert policy_digest("package p", {"a": 2}) != base
    assert policy_digest("package p ", {"a": 1}) != base
    # The text's length is in the digest: text and data cannot trade bytes.
    assert policy_digest("package p{", {}) != policy_digest("package p", {"{": {}})
    assert base == policy_digest("package p", {"a": 1})


def test_data_with_floats_refused(tmp_path: Path) -> None:
    (tmp_path / "data.json").write_text('{"x": 1.5}')
    with pytest.raises(ConfigError, match=r"data\.json: JSON number"):
        RegoPolicy.from_files(str(EXAMPLE / "policy.rego"), str(tmp_path / "data.json"))
