"""The real daemon under a test's notify socket, and its /metrics read as Prometheus would.

`embassy serve` runs with NOTIFY_SOCKET pointing at a datagram socket this test binds, as
systemd's would be for a ``Type=notify`` unit: READY=1 must come only once the socket answers
and the workload runs, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 at SIGTERM. Its metrics
are read over the socket (the host may, the workload may not) and on the optional loopback
port, with prometheus_client's own text parser, before and after a session from inside the
workload.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import (
    INSIDE_CLIENT,
    SLEEPING_WORKLOAD,
    Daemon,
    embassy_id,
    remove_embassy_containers,
    require,
)
from tests.notify_listener import NotifyListener
from workload_sdk.transport import UnixHTTPConnection

pytestmark = pytest.mark.integration

docker = pytest.importorskip("docker")

WORKLOAD = SLEEPING_WORKLOAD
CLIENT = INSIDE_CLIENT

WATCHDOG_USEC = 1_000_000  # a ping every 0.5 s
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def host_get(sock: Path, path: str) -> tuple[int, str, bytes]:
    conn = UnixHTTPConnection(str(sock), 10.0)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def scrape(daemon: Daemon) -> Samples:
    status, content_type, body = host_get(daemon.socket, "/metrics")
    assert status == 200, body
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    return samples(body.decode("utf-8"))


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_addresses(port: int) -> set[str]:
    """Local addresses in LISTEN state on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port and fields[3] == "0A":
                found.add(address)
    return found


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


def _workloads(client: Any, daemon: Daemon) -> list[Any]:
    if not (daemon.data_dir / "embassy-id").exists():
        return []
    labels = [f"org.embassy.id={embassy_id(daemon)}", "org.embassy.role=workload"]
    return list(client.containers.list(filters={"label": labels, "status": "running"}))


def test_ready_watchdog_metrics_and_stopping(client: Any, daemon_factory: type[Daemon]) -> None:
    port = free_loopback_port()
    daemon = daemon_factory(WORKLOAD + f'metrics:\n  listen: "127.0.0.1:{port}"\n')

    def at_ready() -> dict[str, Any]:
        # What a unit ordered after embassy.service would find the moment READY=1 arrives.
        status, _, _ = host_get(daemon.socket, "/v1/health")
        return {"health": status, "workloads": len(_workloads(client, daemon))}

    listener = NotifyListener(daemon.root / "notify", at_ready)
    daemon.env = {"NOTIFY_SOCKET": str(daemon.root / "notify"), "WATCHDOG_USEC": str(WATCHDOG_USEC)}
    try:
        daemon.start()
        ready_at = listener.wait_for("READY=1", timeout=60)
        assert listener.at_ready == {"health": 200, "workloads": 1}
        lines = listener.lines()
        assert lines.index("READY=1") > lines.index(
            "STATUS=starting: TPM, keys, statement log, workload"
        )
        assert lines.count("READY=1") == 1
        ready_status = lines[lines.index("READY=1") + 1]
        assert ready_status == f"STATUS=serving on {daemon.socket}; workload launched"

        # The watchdog: pings keep coming at about half of WATCHDOG_USEC.
        time.sleep(2.6)
        pings = [at for at, text in listener.messages if text == "WATCHDOG=1" and at > ready_at]
        assert len(pings) >= 4, listener.lines()
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.9, gaps

        workload = _workloads(client, daemon)[0]

        def inside(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            argv = ["python3", "-c", CLIENT, method, path]
            if body is not None:
                argv.append(json.dumps(body))
            code, out = workload.exec_run(argv)
            assert code == 0, out.decode()
            return json.loads(out.decode().strip().splitlines()[-1])

        # The workload may not read the metrics; the host may.
        refused = inside("GET", "/metrics")
        assert (refused["status"], refused["body"]["error"]["code"]) == (403, "forbidden")
        before = scrape(daemon)
        assert before[("embassy_sessions_open", ())] == 0
        assert before[("embassy_log_bytes", ())] > 0
        assert before[("embassy_intake_queue_depth", ())] == 0

        opened = inside("POST", "/v1/sessions", {"deadline_seconds": 60})
        assert opened["status"] == 201, opened
        during = scrape(daemon)
        assert during[("embassy_sessions_open", ())] == 1
        assert during[("embassy_sessions_opened_total", ())] == (
            before[("embassy_sessions_opened_total", ())] + 1
        )
        assert during[("embassy_seal_seconds_count", ())] == (
            before[("embassy_seal_seconds_count", ())] + 1
        )
        assert 0 < during[("embassy_seal_seconds_sum", ())] < 10
        assert during[("embassy_log_bytes", ())] > before[("embassy_log_bytes", ())]

        closed = inside(
            "POST",
            "/v1/sessions/close",
            {
                "session": opened["body"]["session"],
                "token": opened["body"]["token"],
                "output_sha256": "00" * 32,
            },
        )
        assert closed["status"] == 200, closed
        after = scrape(daemon)
        assert after[("embassy_sessions_open", ())] == 0
        assert after[("embassy_sessions_closed_total", ())] == (
            before[("embassy_sessions_closed_total", ())] + 1
        )
        assert after[("embassy_unseal_seconds_count", ())] == (
            before[("embassy_unseal_seconds_count", ())] + 1
        )
        assert after[("embassy_log_bytes", ())] > during[("embassy_log_bytes", ())]
        # The seal and unseal statements (and any reconcile of the gate in between).
        assert after[("embassy_log_statements_total", ())] >= (
            before[("embassy_log_statements_total", ())] + 2
        )
        assert after[("embassy_log_commits_total", ())] > before[("embassy_log_commits_total", ())]
        assert (
            after[("embassy_tpm_quotes_total", (("purpose", "checkpoint"),))]
            == (after[("embassy_log_checkpoints_total", ())])
        )
        assert after[("embassy_tpm_quotes_total", (("purpose", "evidence"),))] >= 1  # identity
        text = host_get(daemon.socket, "/metrics")[2].decode()
        assert opened["body"]["session"] not in text  # counts, never ids

        # The local port: the same metrics, on loopback only.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            local = samples(r.read().decode("utf-8"))
        assert {k for k in local if not k[0].startswith("embassy_log_bytes")} == {
            k for k in after if not k[0].startswith("embassy_log_bytes")
        }
        assert (
            local[("embassy_sessions_closed_total", ())]
            == (after[("embassy_sessions_closed_total", ())])
        )
        assert listening_addresses(port) == {"0100007F"}  # 127.0.0.1, nothing else

        assert daemon.stop() == 0
        stopping_at = listener.wait_for("STOPPING=1", timeout=5)
        assert not [
            at for at, text in listener.messages if text == "WATCHDOG=1" and at > stopping_at
        ]
        assert listening_addresses(port) == set()
    finally:
        listener.close()
        if (daemon.data_dir / "embassy-id").exists():
            remove_embassy_containers(client, embassy_id(daemon))


def test_an_abstract_notify_socket_and_no_watchdog(daemon_factory: type[Daemon]) -> None:
    """systemd may name an abstract socket ('@...'); without WATCHDOG_USEC nothing pings."""
    daemon = daemon_factory()
    name = f"embassy-test-{daemon.root.name}-{time.monotonic_ns()}"
    served: list[int] = []
    listener = NotifyListener(
        b"\0" + name.encode(),
        lambda: served.append(host_get(daemon.socket, "/v1/health")[0]) or {},
    )
    daemon.env = {"NOTIFY_SOCKET": "@" + name}
    try:
        daemon.start()
        listener.wait_for("READY=1", timeout=60)
        assert served == [200]
        assert f"STATUS=serving on {daemon.socket}; workload none" in listener.lines()
        time.sleep(1.5)
        assert daemon.stop() == 0
        listener.wait_for("STOPPING=1", timeout=5)
        assert "WATCHDOG=1" not in listener.lines()
        assert listener.lines()[-1] == "STATUS=stopped"
    finally:
        listener.close()
