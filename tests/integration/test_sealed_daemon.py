"""The daemon with a real workload: launch, sessions from inside the container, fail closed.

The workload talks to the embassy through the socket mounted into its container, as a
real workload does; a canary container the test starts on the embassy's network is the
only thing a probe ever tries to reach.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import (
    INSIDE_CLIENT,
    SLEEPING_WORKLOAD,
    Daemon,
    embassy_id,
    remove_embassy_containers,
    require,
)

pytestmark = pytest.mark.integration

docker = pytest.importorskip("docker")

WORKLOAD = SLEEPING_WORKLOAD
CLIENT = INSIDE_CLIENT

PROBE = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 8080), timeout=2).close(); print("open")
except OSError as e:
    print("blocked", e)
"""


@pytest.fixture
def client() -> Iterator[Any]:
    require("docker", "iptables-legacy-save")
    c = docker.from_env()
    try:
        c.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"dockerd is not running: {exc}")
    yield c
    c.close()


def _ours(client: Any, daemon: Daemon, role: str) -> Any:
    found = client.containers.list(
        all=True,
        filters={"label": [f"org.embassy.id={embassy_id(daemon)}", f"org.embassy.role={role}"]},
    )
    assert len(found) == 1, found
    return found[0]


class Scene:
    """A daemon with its workload, and a canary on the embassy's network."""

    def __init__(self, client: Any, daemon: Daemon) -> None:
        self.client, self.daemon = client, daemon
        self.workload = _ours(client, daemon, "workload")
        network = f"embassy-{embassy_id(daemon)}"
        self.canary = client.containers.run(
            "embassy/canary:latest",
            ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && httpd -f -p 8080 -h /www"],
            detach=True,
            network=network,
            labels={"org.embassy.test": "canary"},
        )
        self.canary.reload()
        self.canary_ip = self.canary.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        argv = ["python3", "-c", CLIENT, method, path]
        if body is not None:
            argv.append(json.dumps(body))
        code, out = self.workload.exec_run(argv)
        assert code == 0, out.decode()
        return json.loads(out.decode().strip().splitlines()[-1])

    def reachable(self) -> bool:
        code, out = self.workload.exec_run(["python3", "-c", PROBE, self.canary_ip])
        assert code == 0, out.decode()
        return out.decode().startswith("open")

    def close(self) -> None:
        self.canary.remove(force=True)


@pytest.fixture
def scene(client: Any, daemon_factory: type[Daemon]) -> Iterator[Scene]:
    daemon = daemon_factory(WORKLOAD)
    daemon.start()
    s = Scene(client, daemon)
    yield s
    s.close()
    _remove_ours(client, daemon)


def _remove_ours(client: Any, daemon: Daemon) -> None:
    if (daemon.data_dir / "embassy-id").exists():
        remove_embassy_containers(client, embassy_id(daemon))


def test_a_session_seals_the_workload_and_the_socket_still_works(scene: Scene) -> None:
    assert scene.reachable(), "the probe must work unsealed, or it proves nothing"
    opened = scene.call("POST", "/v1/sessions", {"deadline_seconds": 60})
    assert opened["status"] == 201, opened
    assert not scene.reachable(), "sealed: no new flow to the canary"
    status = scene.call("GET", "/v1/seal")["body"]
    assert (status["open_sessions"], status["gate"], status["link_up"]) == (1, "closed", False)
    wrong = scene.call(
        "POST",
        "/v1/sessions/close",
        {"session": opened["body"]["session"], "token": "AAAA" * 11, "output_sha256": None},
    )
    assert (wrong["status"], wrong["body"]["error"]["code"]) == (403, "forbidden")
    assert not scene.reachable()
    body = {
        "session": opened["body"]["session"],
        "token": opened["body"]["token"],
        "output_sha256": "00" * 32,
    }
    closed = scene.call("POST", "/v1/sessions/close", body)
    assert closed["status"] == 200, closed
    assert scene.reachable(), "unsealed after the last session closed"
    again = scene.call("POST", "/v1/sessions/close", body)
    assert again == closed, "a retried close gets the same unseal statement"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("  command:", "  privileged: true\n  command:"), "privileged"),
        (("workload-base:bookworm-v3", "workload-base:absent"), "is not present locally"),
    ],
)
def test_a_refused_workload_never_starts_and_leaves_nothing(
    client: Any, daemon_factory: type[Daemon], edit: tuple[str, str], message: str
) -> None:
    daemon = daemon_factory(WORKLOAD.replace(*edit))
    with pytest.raises(AssertionError, match="daemon exited 2"):
        daemon.start()
    assert message in daemon.log_text()
    if (daemon.data_dir / "embassy-id").exists():
        eid = embassy_id(daemon)
        found = client.containers.list(all=True, filters={"label": f"org.embassy.id={eid}"})
        assert found == []
        assert client.networks.list(names=[f"embassy-{eid}"]) == [], "no network made for it"


def _close_argv(session: dict[str, Any]) -> list[str]:
    body = {"session": session["session"], "token": session["token"], "output_sha256": None}
    return ["python3", "-c", CLIENT, "POST", "/v1/sessions/close", json.dumps(body)]


# (failpoint, the link up while the daemon is down (None: either, nothing was promised),
# sessions open after the restart)
FAILPOINTS = [
    ("seal:before-statement", None, 0),  # gate closing, nothing stated: reopened at restart
    ("seal:after-statement", False, 1),  # stated and checked: sealed until closed or deadline
    ("unseal:after-statement", False, 0),  # stated, not yet opened: opened at restart
]


@pytest.mark.parametrize(("point", "up_while_down", "open_after"), FAILPOINTS)
def test_kill_at_each_step_never_leaves_an_open_session_unsealed(
    client: Any,
    daemon_factory: type[Daemon],
    point: str,
    up_while_down: bool | None,
    open_after: int,
) -> None:
    daemon = daemon_factory(WORKLOAD + f"debug:\n  failpoint: {point}\n")
    daemon.start()
    s = Scene(client, daemon)
    try:
        assert s.reachable()
        delivered = None
        if point.startswith("unseal"):
            delivered = s.call("POST", "/v1/sessions", {"deadline_seconds": 120})["body"]
            assert not s.reachable()
            argv = _close_argv(delivered)
        else:
            argv = ["python3", "-c", CLIENT, "POST", "/v1/sessions", '{"deadline_seconds":15}']
        s.workload.exec_run(argv)  # the daemon dies at the failpoint, mid-request
        assert daemon.proc is not None
        assert daemon.proc.wait(timeout=30) == -signal.SIGKILL
        daemon.proc = None
        if up_while_down is not None:
            assert s.reachable() is up_while_down
        daemon.config_extra = WORKLOAD
        daemon.start()
        status = s.call("GET", "/v1/seal")["body"]
        # Whatever the log shows open is sealed again before anything else, and nothing else.
        assert status["open_sessions"] == open_after
        assert status["gate"] == ("closed" if open_after else "open")
        assert s.reachable() is not open_after
        if delivered is not None:
            # The workload retries its close: the unseal is finished (or returned again).
            retried = json.loads(s.workload.exec_run(argv).output.decode().splitlines()[-1])
            assert retried["status"] == 200, retried
        elif open_after:
            # Its token never reached the workload: it stays sealed until its deadline.
            assert wait_until_open(s, seconds=30)
        assert s.reachable()
        again = s.call("POST", "/v1/sessions", {"deadline_seconds": 60})
        assert again["status"] == 201
        assert not s.reachable()
    finally:
        s.close()
        _remove_ours(client, daemon)


def wait_until_open(s: Scene, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if s.call("GET", "/v1/seal")["body"]["gate"] == "open":
            return True
        time.sleep(0.5)
    return False


def test_concurrent_sessions_and_a_deadline(scene: Scene) -> None:
    first = scene.call("POST", "/v1/sessions", {"deadline_seconds": 120})["body"]
    second = scene.call("POST", "/v1/sessions", {"deadline_seconds": 120})["body"]
    assert not scene.reachable()
    closed = scene.call(
        "POST",
        "/v1/sessions/close",
        {"session": first["session"], "token": first["token"], "output_sha256": None},
    )
    assert closed["status"] == 200
    assert not scene.reachable(), "another session is still open: still sealed"
    scene.call(
        "POST",
        "/v1/sessions/close",
        {"session": second["session"], "token": second["token"], "output_sha256": None},
    )
    assert scene.reachable(), "unsealed only after the last session closed"

    too_short = scene.call("POST", "/v1/sessions", {"deadline_seconds": 2})
    assert too_short["status"] == 400, "a deadline under the minimum is refused"
    short = scene.call("POST", "/v1/sessions", {"deadline_seconds": 10})["body"]
    assert not scene.reachable()
    assert wait_until_open(scene, seconds=25)
    assert scene.reachable(), "past its deadline the session was aborted and the seal lifted"
    late = scene.call(
        "POST",
        "/v1/sessions/close",
        {"session": short["session"], "token": short["token"], "output_sha256": "00" * 32},
    )
    assert (late["status"], late["body"]["error"]["code"]) == (409, "conflict")
    assert "aborted" in late["body"]["error"]["message"]
