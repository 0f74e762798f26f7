"""The CLI's verify flags reach the policy and the report."""

from __future__ import annotations

import pytest

from embassy.cli import _policy, build_parser
from embassy.errors import ConfigError


def _args(*extra: str) -> object:
    return build_parser().parse_args(["verify", "identity", "doc.json", *extra])


def test_workload_pins_reach_the_policy() -> None:
    policy = _policy(_args("--expect-image-digest", "AB" * 32, "--expect-launch-digest", "cd" * 32))
    assert policy.expected_image_digest == "sha256:" + "ab" * 32
    assert policy.expected_launch_digest == bytes.fromhex("cd" * 32)
    unpinned = _policy(_args())
    assert unpinned.expected_image_digest is None
    assert unpinned.expected_launch_digest is None


@pytest.mark.parametrize(
    "flags",
    [
        ("--expect-image-digest", "sha256:xyz"),
        ("--expect-image-digest", "sha256:" + "ab" * 31),
        ("--expect-launch-digest", "ab"),
    ],
)
def test_bad_workload_pins_are_usage_errors(flags: tuple[str, str]) -> None:
    with pytest.raises(ConfigError):
        _policy(_args(*flags))


def test_log_and_result_flags_parse() -> None:
    parser = build_parser()
    log = parser.parse_args(
        ["verify", "log", "s.json", "--identity", "i", "--complete", "--evidence", "e",
         "--nonce", "00"]
    )  # fmt: skip
    assert (log.complete, log.evidence, log.nonce) == (True, "e", "00")
    result = parser.parse_args(
        ["verify", "result", "r.json", "--identity", "i", "--before", "b", "--before-nonce",
         "01", "--after", "a", "--after-nonce", "02"]
    )  # fmt: skip
    assert (result.before, result.before_nonce, result.after, result.after_nonce) == (
        "b", "01", "a", "02"
    )  # fmt: skip
