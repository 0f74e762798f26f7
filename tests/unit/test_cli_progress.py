"""Progress of long steps: on stderr only when it is a terminal (or ``--progress always``),
rate-limited, silent otherwise, and never on stdout."""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from embassy.cli import main
from embassy.commands.progress import (
    DELAY,
    Progress,
    counting,
    human_bytes,
    progress_for,
)
from tests.fakes import FakeTpm
from tests.unit.audit.test_cli import _vector_args as audit_vector_args
from tests.unit.conftest import EmbassyFactory
from tests.unit.test_cli_image import UKI
from tests.unit.test_cli_meters import World, with_workload
from tests.unit.weights.weights_vectors import safetensors_bytes

Capture = pytest.CaptureFixture[str]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _reporter(stream: io.StringIO, clock: Clock, delay: float = 0.5) -> Progress:
    return Progress(stream, delay=delay, interval=0.2, clock=clock, ticker=False)


def test_a_quick_step_leaves_no_trace() -> None:
    stream, clock = Terminal(), Clock()
    with _reporter(stream, clock).step("hashing", 100) as step:
        step.advance(60)
        clock.now += 0.1
        step.advance(40)
    assert stream.getvalue() == ""


def test_a_long_step_draws_percent_and_bytes_rate_limited_then_done() -> None:
    stream, clock = Terminal(), Clock()
    with _reporter(stream, clock).step("hashing the UKI", 4 << 20) as step:
        clock.now += 0.6  # past the delay: the next count draws
        step.advance(1 << 20)
        for _ in range(10):  # within one interval: no redraw however often it counts
            step.advance(1)
        clock.now += 0.2
        step.advance(1 << 20)
        clock.now += 0.4
    lines = stream.getvalue().split("\r\x1b[K")[1:]
    assert lines == [
        "hashing the UKI: 25% (1.0 MiB of 4.0 MiB), 1 s",
        "hashing the UKI: 50% (2.0 MiB of 4.0 MiB), 1 s",
        "hashing the UKI: done (2.0 MiB, 1.2 s)\n",
    ]


def test_not_a_terminal_gets_whole_lines_and_a_failure_says_so() -> None:
    stream, clock = io.StringIO(), Clock()
    reporter = _reporter(stream, clock, delay=0.0)

    def fail() -> None:
        with reporter.step("verifying") as step:
            step.advance(0)
            clock.now += 3
            raise RuntimeError

    with pytest.raises(RuntimeError):
        fail()
    assert stream.getvalue() == "verifying: …, 0 s\nverifying: failed (3.0 s)\n"


def test_a_quick_failure_leaves_the_error_message_alone() -> None:
    stream, clock = Terminal(), Clock()
    with pytest.raises(RuntimeError), _reporter(stream, clock).step("x"):
        raise RuntimeError
    assert stream.getvalue() == ""


def test_disabled_is_silent_and_counts_nothing_anywhere() -> None:
    reporter = Progress(None)
    assert not reporter.enabled
    with reporter.step("anything", 10) as step:
        step.advance(10)
    assert step.done == 10
    assert not step.drawn


def test_the_ticker_redraws_a_step_that_counts_nothing() -> None:
    stream = io.StringIO()
    reporter = Progress(stream, delay=0.0, interval=0.01)
    with reporter.step("waiting for the daemon"):
        time.sleep(0.2)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines  # the first draw, the ticker's, the final
    assert lines[-1].startswith("waiting for the daemon: done (0.")
    assert not any(t.name == "embassy-progress" for t in threading.enumerate())


def test_counting_reader_counts_what_was_read() -> None:
    reporter = Progress(None)
    with reporter.step("x") as step:
        src = counting(io.BytesIO(b"a" * 1000), step)
        assert src.read(300) == b"a" * 300
        src.seek(900)
        assert src.tell() == 900
        assert src.read() == b"a" * 100
    assert step.done == 400


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (27 << 20, "27.0 MiB"), (3 << 40, "3.0 TiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


def test_progress_for_follows_the_flag_and_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    from argparse import Namespace

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_for(Namespace(progress="auto")).enabled, "not a terminal: silent"
    assert progress_for(Namespace(progress="always")).delay == 0
    monkeypatch.setattr(sys, "stderr", Terminal())
    auto = progress_for(Namespace(progress="auto"))
    assert auto.enabled
    assert auto.delay == DELAY
    assert not progress_for(Namespace(progress="never")).enabled


# -- the commands: progress on stderr when forced, nothing on stdout, nothing by default ----


def _weights(tmp: Path) -> list[str]:
    arrays = {"w": np.arange(300_000, dtype=np.float32)}
    (tmp / "m.safetensors").write_bytes(safetensors_bytes(arrays, {"w": "F32"}, {}))
    assert main(["weights", "keygen", "--out", str(tmp / "wk")]) == 0
    return ["weights", "encrypt", "--in", str(tmp / "m.safetensors"), "--out", str(tmp / "m.emw"),
            "--model-id", "m", "--key-id", "k", "--key-file", str(tmp / "wk")]  # fmt: skip


def _audit(tmp: Path) -> list[str]:
    return ["audit", *audit_vector_args("good-log-two-boots", tmp), "--out", str(tmp / "r.html")]


COMMANDS = {
    "weights encrypt": (_weights, ["weights: encrypting ", ": 0% (0 B of 1.1 MiB)", ": done (1.1"]),
    "measure --uki": (
        lambda tmp: ["measure", "--uki", str(UKI)],
        ["measure: reading ", "measure: hashing the UKI (", "for PCRs 4/11/12: done"],
    ),
    "audit": (_audit, ["audit: reading ", "audit: verifying 2 segment(s)", "audit: drawing"]),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_forced_progress_goes_to_stderr_only(name: str, tmp_path: Path, capsys: Capture) -> None:
    make, expected = COMMANDS[name]

    def argv(directory: str) -> list[str]:
        (tmp_path / directory).mkdir()
        made = make(tmp_path / directory)
        capsys.readouterr()  # what setting up printed
        return made

    quiet_argv = argv("a")
    assert main(quiet_argv) == 0
    quiet = capsys.readouterr()
    loud_argv = argv("b")
    assert main(["--progress", "always", *loud_argv]) == 0
    loud = capsys.readouterr()
    same = re.sub("[0-9a-f]{64}", "HEX", loud.out.replace("/b/", "/a/"))
    assert same == re.sub("[0-9a-f]{64}", "HEX", quiet.out), "stdout is the same"
    for text in expected:
        assert text in loud.err, (text, loud.err)
        assert text not in loud.out
        assert text not in quiet.err, "not a terminal: no progress unless forced"
    json_argv = argv("c")
    assert main(["--progress", "always", *json_argv, "--json"]) == 0
    both = capsys.readouterr()
    json.loads(both.out)  # the one document, untouched by progress
    assert expected[0] in both.err


def test_payload_seal_counts_the_input(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path, capsys: Capture
) -> None:
    """The stream encryption reads through the counter: the done line has the input's size."""
    world = World(with_workload(make_embassy, tpm, {}), tpm, tmp_path)
    plain = tmp_path / "in"
    plain.write_bytes(b"p" * (3 << 20))
    argv = ["payload", "seal", "--in", str(plain), "--out", str(tmp_path / "in.enc"),
            "--envelope", str(tmp_path / "env.json"), *world.trust]  # fmt: skip
    assert main(["--progress", "always", *argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["stream_bytes"] > 3 << 20
    assert f"payload seal: encrypting {plain}: 0% (0 B of 3.0 MiB)" in err
    assert f"payload seal: encrypting {plain}: done (3.0 MiB, " in err
    assert main(["--progress", "never", *argv]) == 0
    assert "encrypting" not in capsys.readouterr().err
