"""The same seal for a workload under gVisor (Debian's runsc, registered with --network=host).

gVisor's sentry, given the host's network stack, uses the kernel's stack in the container's
namespace: the one the embassy wires and gates. From the attacker's side: a probe from
inside the sandbox reaches a canary while open, carries nothing while sealed (the link's
host end sees no frame), and works again after the unseal. A runtime that would not use
that namespace (gVisor's own netstack) is refused at launch.

Network rule: the only peer is the canary this module starts on the embassy's network.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from embassy.client import call
from tests.integration.conftest import (
    IN_CI,
    SEALED_SERVICE_ACCESS,
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    remove_embassy_containers,
    require,
)
from tests.integration.silence import CLIENT, LinkSniffer

pytestmark = pytest.mark.integration
docker = pytest.importorskip("docker")

RUNTIME = "runsc-hostinet"  # scripts/ensure_dockerd.sh registers it
PROBE = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], 80), timeout=2).close(); print("open")
except OSError as e:
    print("blocked " + type(e).__name__)
"""


def _registered(client: Any, name: str) -> dict[str, Any] | None:
    runtime: dict[str, Any] | None = (client.info().get("Runtimes") or {}).get(name)
    return runtime


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    require("runsc", "swtpm", "swtpm_setup")
    c = docker.from_env()
    if _registered(c, RUNTIME) is None:
        msg = f"dockerd has no {RUNTIME} runtime: run scripts/ensure_dockerd.sh"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    ensure_sealed_service_image(c)
    yield c
    c.close()


def _daemon(factory: type[Daemon], runtime: str) -> Daemon:
    return factory(
        f"workload:\n  image: {SEALED_SERVICE_IMAGE}\n  runtime: {runtime}\n{SEALED_SERVICE_ACCESS}"
    )


def _in_workload(workload: Any, *argv: str) -> str:
    code, out = workload.exec_run(["python3", "-c", *argv])
    assert code == 0, out.decode()
    return str(out.decode().strip().splitlines()[-1])


def test_a_gvisor_workload_is_wired_and_sealed_like_any_other(
    client: Any, daemon_factory: type[Daemon]
) -> None:
    daemon = _daemon(daemon_factory, RUNTIME)
    daemon.start()
    eid = embassy_id(daemon)
    canary = None
    try:
        status = call(daemon.socket, "GET", "/v1/seal")
        workload = client.containers.get(status["workload"]["container_id"])
        assert workload.attrs["HostConfig"]["Runtime"] == RUNTIME
        network = f"embassy-{eid}"
        canary = client.containers.run(
            "embassy/canary:latest",
            ["sh", "-c", "mkdir -p /www && echo ok > /www/index.html && httpd -f -p 80 -h /www"],
            network=network,
            detach=True,
        )
        canary.reload()
        target = canary.attrs["NetworkSettings"]["Networks"][network]["IPAddress"]
        assert _in_workload(workload, PROBE, target) == "open"

        sniffer = LinkSniffer(status["link"]["link"])
        try:
            opened = json.loads(
                _in_workload(workload, CLIENT, "POST", "/v1/sessions", '{"deadline_seconds":60}')
            )
            assert opened["status"] == 201, opened
            sniffer.reset()
            assert _in_workload(workload, PROBE, target).startswith("blocked")
            assert sniffer.total == 0, "a frame crossed the sealed link of a gVisor workload"
            body = {
                "session": opened["body"]["session"],
                "token": opened["body"]["token"],
                "output_sha256": None,
            }
            closed = json.loads(
                _in_workload(workload, CLIENT, "POST", "/v1/sessions/close", json.dumps(body))
            )
            assert closed["status"] == 200, closed
        finally:
            sniffer.close()
        assert _in_workload(workload, PROBE, target) == "open"
        assert call(daemon.socket, "GET", "/v1/seal")["quarantine"] == []
    finally:
        if canary is not None:
            canary.remove(force=True)
        daemon.cleanup()
        remove_embassy_containers(client, eid)


def test_a_runtime_that_would_not_use_the_wired_namespace_is_refused(
    client: Any, daemon_factory: type[Daemon], tmp_path: Path
) -> None:
    daemon = _daemon(daemon_factory, "no-such-runtime")
    with pytest.raises(AssertionError, match="daemon exited 2"):
        daemon.start()
    assert "not registered with dockerd" in daemon.log_text()
    if (daemon.data_dir / "embassy-id").exists():
        found = client.containers.list(
            all=True, filters={"label": f"org.embassy.id={embassy_id(daemon)}"}
        )
        assert found == []
