"""sd_notify written out: the datagrams a notify unit's systemd would read, on a test socket."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.daemon.notify import MAX_STATUS_CHARS, Notifier, socket_address, watchdog_interval
from tests.notify_listener import NotifyListener


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, NotifyListener]]:
    path = str(tmp_path / "notify")
    got = NotifyListener(path)
    yield path, got
    got.close()


def test_ready_status_and_stopping_arrive_as_assignments(
    listener: tuple[str, NotifyListener],
) -> None:
    path, got = listener
    notifier = Notifier(path, None)
    assert notifier.enabled
    assert notifier.ready("serving on /run/embassy/embassy.sock;\nworkload launched")
    assert notifier.status("x" * 1000)
    assert notifier.stopping()
    assert notifier.stopping("stopped")
    got.wait_for("STATUS=stopped")
    assert got.texts() == [
        "READY=1\nSTATUS=serving on /run/embassy/embassy.sock; workload launched",
        "STATUS=" + "x" * MAX_STATUS_CHARS,
        "STOPPING=1\nSTATUS=stopping",  # once
        "STATUS=stopped",
    ]
    notifier.close()


def test_an_abstract_socket_name(tmp_path: Path) -> None:
    name = f"embassy-test-{os.getpid()}-{time.monotonic_ns()}"
    got = NotifyListener(b"\0" + name.encode())
    try:
        notifier = Notifier("@" + name, None)
        assert notifier.ready("up")
        got.wait_for("READY=1")
        notifier.close()
    finally:
        got.close()


def test_the_address_forms() -> None:
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@x/y") == b"\0x/y"
    with pytest.raises(ValueError, match="absolute path"):
        socket_address("relative/notify")


def test_no_notify_socket_is_a_quiet_no_op() -> None:
    notifier = Notifier(None, 1.0)
    assert not notifier.enabled
    assert not notifier.ready("up")
    assert not notifier.start_watchdog(lambda: None)
    assert not notifier.stopping()
    notifier.close()
    # A relative path is refused, and the notifier is off rather than failing the start.
    assert not Notifier("relative", None).enabled


def test_a_send_nobody_reads_is_false_not_an_error(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody"), None)
    assert notifier.enabled
    assert not notifier.ready("up")
    notifier.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "4242"}, 1.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}, None),  # another process's
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "\u0661\u0662"}, None),
        ({"WATCHDOG_USEC": "1" * 30}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(environ, 4242) == expected


def test_from_environ_takes_the_variables_away_from_children(tmp_path: Path) -> None:
    environ = {
        "NOTIFY_SOCKET": str(tmp_path / "n"),
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": str(os.getpid()),
        "PATH": "/bin",
    }
    notifier = Notifier.from_environ(environ)
    assert environ == {"PATH": "/bin"}
    assert notifier.enabled
    assert notifier.watchdog_seconds == 0.5
    notifier.close()
    # No socket, no watchdog: WATCHDOG_USEC alone is not for us.
    assert Notifier.from_environ({"WATCHDOG_USEC": "1000000"}).watchdog_seconds is None


def test_the_watchdog_pings_only_while_healthy(listener: tuple[str, NotifyListener]) -> None:
    path, got = listener
    problem: list[str | None] = [None]
    notifier = Notifier(path, 0.02)
    assert notifier.start_watchdog(lambda: problem[0])
    assert not notifier.start_watchdog(lambda: None)  # one watchdog thread
    time.sleep(0.3)
    healthy_pings = got.texts().count("WATCHDOG=1")
    assert healthy_pings >= 5
    problem[0] = "the socket's accept loop has not turned for 9.0 s"
    time.sleep(0.1)
    got.wait_for("STATUS=unhealthy: the socket's accept loop")
    stuck_at = got.texts().count("WATCHDOG=1")
    time.sleep(0.3)
    # Stuck: no more pings (systemd restarts us after WatchdogSec), and the reason said once.
    assert got.texts().count("WATCHDOG=1") == stuck_at
    assert sum(t.startswith("STATUS=unhealthy") for t in got.texts()) == 1
    problem[0] = None  # recovered before systemd acted: pings resume
    time.sleep(0.2)
    assert got.texts().count("WATCHDOG=1") > stuck_at
    notifier.stopping()
    time.sleep(0.1)
    after_stop = got.texts().count("WATCHDOG=1")
    time.sleep(0.2)
    assert got.texts().count("WATCHDOG=1") == after_stop
    notifier.close()


def test_a_health_check_that_raises_counts_as_unhealthy(
    listener: tuple[str, NotifyListener],
) -> None:
    path, got = listener

    def broken() -> str | None:
        raise RuntimeError("boom")

    notifier = Notifier(path, 0.02)
    notifier.start_watchdog(broken)
    got.wait_for("STATUS=unhealthy: health check failed: RuntimeError")
    time.sleep(0.1)
    assert "WATCHDOG=1" not in got.texts()
    notifier.close()


class _Loop:
    def __init__(self, age: float | None) -> None:
        self.age = age

    def loop_age(self) -> float | None:
        return self.age


@pytest.mark.parametrize(
    ("age", "healthy"), [(0.1, True), (4.9, True), (5.1, False), (None, False)]
)
def test_the_daemon_is_healthy_while_its_accept_loop_turns(
    age: float | None, healthy: bool
) -> None:
    from embassy.daemon.runtime import _loop_health

    problem = _loop_health(_Loop(age), 5.0)  # type: ignore[arg-type]
    assert (problem is None) is healthy
    if not healthy:
        assert problem is not None
        assert "accept loop" in problem
