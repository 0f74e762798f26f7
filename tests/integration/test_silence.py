"""Sealed means silence, tried from the attacker's side on the real daemon, dockerd and kernel.

While a session is open, no frame crosses the workload's link (the host end is watched by an
AF_PACKET sniffer), every probe from inside and towards the workload fails, and flows opened
before the seal carry nothing; after the unseal everything works again and those flows go on
on their original connections. A container or a process joining the workload's namespace is
refused (killed, sessions aborted, namespace quarantined); a restart of the workload or a
kill of the daemon never opens the link.

Network rule: every probe targets the canary this module starts on the embassy's own
network, listeners this process binds on that network's gateway, or the workload itself.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from embassy.client import ApiError, call
from tests.integration.conftest import (
    SEALED_SERVICE_ACCESS,
    SEALED_SERVICE_IMAGE,
    Daemon,
    embassy_id,
    ensure_sealed_service_image,
    published_port,
    remove_embassy_containers,
    require,
    wait_for_http,
)
from tests.integration.silence import (
    BCAST_PORT,
    CANARY,
    CLIENT,
    ECHO_PORT,
    HAMMER,
    HTTP_PORT,
    MCAST_V4,
    MCAST_V6,
    PUSHER,
    RELAY,
    UDP_PORT,
    WORKLOAD_BASE,
    WORKLOAD_ECHO,
    GatewayListener,
    LinkSniffer,
    Scene,
    broadcast_of,
    canary_addresses,
    wait_until,
)

pytestmark = pytest.mark.integration
docker = pytest.importorskip("docker")

ECHO_IN = 7070  # the workload's own echo (flows opened TO it)
WORKLOAD = f"""
workload:
  image: {SEALED_SERVICE_IMAGE}
  ports: ["127.0.0.1:0:8080/tcp", "127.0.0.1:0:{ECHO_IN}/tcp", "127.0.0.1:0:{ECHO_IN}/udp"]
{SEALED_SERVICE_ACCESS}"""


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    require("swtpm", "swtpm_setup", "nsenter", "iptables-legacy-save")
    client = docker.from_env()
    ensure_sealed_service_image(client)
    daemon = Daemon(Path(tmp_path_factory.mktemp("sil")), WORKLOAD)
    eid = ""
    made: list[Any] = []
    sniffer = gateway = None
    try:
        daemon.start()
        eid = embassy_id(daemon)
        status = call(daemon.socket, "GET", "/v1/seal")
        workload = client.containers.get(status["workload"]["container_id"])
        network = f"embassy-{eid}"
        canary = client.containers.run(
            WORKLOAD_BASE,
            ["python3", "-c", CANARY, json.dumps({"http": HTTP_PORT, "echo": ECHO_PORT,
              "udp": UDP_PORT, "bcast": BCAST_PORT, "mcast4": MCAST_V4, "mcast6": MCAST_V6})],
            network=network,
            detach=True,
            name=f"embassy-{eid}-test-canary",
        )  # fmt: skip
        made.append(canary)
        attrs = client.networks.get(network).attrs
        gateways = {":" in pool["Subnet"]: pool["Gateway"] for pool in attrs["IPAM"]["Config"]}
        canary_v4, canary_v6, canary_ll = canary_addresses(canary, network)
        gateway = GatewayListener([gateways[False], gateways[True]])
        sniffer = LinkSniffer(status["link"]["link"])
        assert wait_until(
            lambda: canary.exec_run(["test", "-e", "/tmp/canary.ready"]).exit_code == 0
        )
        wait_for_http(published_port(client, eid))
        yield Scene(
            daemon=daemon,
            client=client,
            eid=eid,
            workload=workload,
            canary=canary,
            link=status["link"]["link"],
            workload_v4=status["link"]["ipv4"].split("/")[0],
            workload_v6=(status["link"]["ipv6"] or "").split("/")[0],
            canary_v4=canary_v4,
            canary_v6=canary_v6,
            canary_ll=canary_ll,
            gateway_v4=gateways[False],
            gateway_v6=gateways[True],
            subnet_broadcast=broadcast_of(status["link"]["ipv4"]),
            sniffer=sniffer,
            gateway=gateway,
        )
    finally:
        if sniffer is not None:
            sniffer.close()
        if gateway is not None:
            gateway.close()
        for container in made:
            container.remove(force=True)
        daemon.cleanup()
        if eid:
            remove_embassy_containers(client, eid)
        client.close()


def _workload_echo(scene: Scene, log: str) -> None:
    """Start (again) the workload's own TCP+UDP echo on ECHO_IN; wait until it listens."""
    scene.refresh_workload()
    scene.py(scene.workload, WORKLOAD_ECHO, {"port": ECHO_IN, "log": log}, detach=True)
    assert wait_until(lambda: scene.inbound(scene.workload_v4, ECHO_IN) == "ok")


def _docker_time(stamp: str) -> float:
    """Docker's RFC 3339 time (nanoseconds, ``Z``) as seconds since the epoch."""
    whole, _, rest = stamp.rstrip("Z").partition(".")
    micros = (rest + "000000")[:6]
    return datetime.fromisoformat(f"{whole}.{micros}+00:00").timestamp()


def _no_traffic_while_sealed(scene: Scene, seconds: float = 0.0) -> None:
    time.sleep(seconds)
    assert scene.sniffer.total == 0, f"frames crossed the sealed link: {scene.sniffer.payloads}"


def test_the_workload_namespace_has_one_link_and_it_is_the_embassys(scene: Scene) -> None:
    scene.refresh_workload()
    assert scene.workload.attrs["HostConfig"]["NetworkMode"] == "none"
    assert scene.workload_links() == ["eth0", "lo"]
    status = scene.seal_status()
    assert status["gate"] == "open"
    assert status["link_up"] is True
    assert status["l3"] == "open"
    assert status["key_release"].startswith("refused")  # nothing is released while open


def test_every_probe_carries_nothing_while_sealed_and_works_after(scene: Scene) -> None:
    _workload_echo(scene, "/tmp/probes.log")
    before = scene.probes()
    # Docker's embedded resolver does not exist in a namespace the embassy wires (no exfiltration
    # through dockerd, sealed or not); everything else must work while open.
    assert before.pop("dns_udp").startswith("fail")
    assert before.pop("dns_tcp").startswith("fail")
    assert set(before.values()) == {"ok"}, before
    inbound = {
        f"{kind}_{port}": scene.inbound(host, port)
        for kind, host in (("v4", scene.workload_v4), ("v6", scene.workload_v6))
        for port in (8080, ECHO_IN)
        if (kind, port) != ("v6", 8080)  # the example service listens on IPv4 only
    }
    assert set(inbound.values()) == {"ok"}, inbound

    opened = scene.open()
    scene.sniffer.reset()
    status = scene.seal_status()
    assert (status["gate"], status["link_up"], status["l3"]) == ("closed", False, "sealed")
    assert status["key_release"] == "ready"
    sealed = scene.probes()
    assert all(v.startswith("fail") for v in sealed.values()), sealed
    for kind, host in (("v4", scene.workload_v4), ("v6", scene.workload_v6)):
        assert scene.inbound(host, ECHO_IN).startswith("fail"), kind
    _no_traffic_while_sealed(scene)
    closed = scene.close(opened)
    assert "statement" in closed

    after = scene.probes()
    after.pop("dns_udp"), after.pop("dns_tcp")
    assert after == before


def _host_pusher(port: int, log: list[tuple[float, str]], stop: threading.Event) -> None:
    """A host process's flow through the published port: a byte every 50 ms, echoes logged."""
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.settimeout(0.05)
        log.append((time.time(), "connected"))
        while not stop.is_set():
            try:
                s.send(b"h")
                data = s.recv(4096)
                log.append((time.time(), "closed" if not data else "echo"))
                if not data:
                    return
            except TimeoutError:
                continue
            except OSError:
                log.append((time.time(), "error"))
                return


def _host_udp(port: int, log: list[tuple[float, str]], stop: threading.Event) -> None:
    """A host process's datagrams through the published UDP port; echoes logged. A send the
    kernel refuses while sealed (no neighbour for the workload) is noted and retried: UDP
    has no connection to lose."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.05)
        while not stop.is_set():
            try:
                s.sendto(b"u", ("127.0.0.1", port))
                s.recvfrom(512)
                log.append((time.time(), "echo"))
            except TimeoutError:
                continue
            except OSError:
                log.append((time.time(), "refused"))
                time.sleep(0.05)


def _flow_logs(
    scene: Scene, host_tcp: list[tuple[float, str]], host_udp: list[tuple[float, str]]
) -> dict[str, list[dict[str, Any]]]:
    return {
        "workload-out": scene.lines(scene.workload, "/tmp/out.log"),
        "peer-v4": scene.lines(scene.canary, "/tmp/peer-v4.log"),
        "peer-v6": scene.lines(scene.canary, "/tmp/peer-v6.log"),
        "host-tcp": [{"t": t, "event": e} for t, e in list(host_tcp)],
        "host-udp": [{"t": t, "event": e} for t, e in list(host_udp)],
    }


def _echo_time(entry: dict[str, Any]) -> float:
    """When an echo came back on a flow (0 for other log entries)."""
    return float(entry["t"]) if entry.get("n") or entry.get("event") == "echo" else 0.0


def test_flows_opened_before_the_seal_pause_both_ways_and_resume(scene: Scene) -> None:
    _workload_echo(scene, "/tmp/in.log")
    tcp_port = published_port(scene.client, scene.eid, f"{ECHO_IN}/tcp")
    udp_port = published_port(scene.client, scene.eid, f"{ECHO_IN}/udp")
    params = {"port": ECHO_PORT, "max_seconds": 60}
    # The workload's own flow out, and a peer container's flow in (v4 and v6).
    out = {**params, "host": scene.canary_v4, "log": "/tmp/out.log"}
    scene.py(scene.workload, PUSHER, out, detach=True)
    for version, host in (("v4", scene.workload_v4), ("v6", scene.workload_v6)):
        peer = {"port": ECHO_IN, "max_seconds": 60, "host": host, "log": f"/tmp/peer-{version}.log"}
        scene.py(scene.canary, PUSHER, peer, detach=True)
    # A host process's flows through the published ports.
    stop = threading.Event()
    host_tcp: list[tuple[float, str]] = []
    host_udp: list[tuple[float, str]] = []
    threads = [
        threading.Thread(target=_host_pusher, args=(tcp_port, host_tcp, stop)),
        threading.Thread(target=_host_udp, args=(udp_port, host_udp, stop)),
    ]
    for thread in threads:
        thread.start()
    try:
        time.sleep(2)
        opened = scene.open()
        sealed_at = time.time()
        scene.sniffer.reset()
        _no_traffic_while_sealed(scene, seconds=4)
        unsealed_at = time.time()
        scene.close(opened)
        # TCP retransmits with exponential backoff: after a pause of some seconds the next
        # try may come as long again after the unseal. Wait (bounded) for every flow.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            logs = _flow_logs(scene, host_tcp, host_udp)
            if all(any(_echo_time(e) > unsealed_at for e in v) for v in logs.values()):
                break
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    margin = 0.05  # frames already in flight when the gate closed
    logs = _flow_logs(scene, host_tcp, host_udp)
    for name, entries in logs.items():
        echoes = [e["t"] for e in entries if _echo_time(e) > 0]
        during = [t for t in echoes if sealed_at + margin < t < unsealed_at]
        assert during == [], f"{name}: {len(during)} echoes crossed the seal"
        assert any(t > unsealed_at for t in echoes), (
            f"{name}: never resumed after the unseal ({sealed_at=}, {unsealed_at=}, "
            f"last entries {entries[-5:]})"
        )
        assert any(t < sealed_at for t in echoes), f"{name}: never worked before the seal"
        bad = [
            e for e in entries if str(e.get("event", "")).startswith(("closed", "error", "send-"))
        ]
        assert bad == [], f"{name}: the flow was reset, not paused: {bad}"
        connects = [e for e in entries if e.get("event") == "connected"]
        assert len(connects) <= 1, f"{name}: reconnected instead of resuming"
    # And the workload received nothing on the flows opened to it while sealed.
    received = scene.lines(scene.workload, "/tmp/in.log")
    assert [e for e in received if sealed_at + margin < e["t"] < unsealed_at] == []


def test_a_pending_request_gets_its_response_on_its_connection_after_the_unseal(
    scene: Scene,
) -> None:
    _workload_echo(scene, "/tmp/pending.log")
    port = published_port(scene.client, scene.eid, f"{ECHO_IN}/tcp")
    with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
        s.sendall(b"request-part-1 ")
        assert s.recv(64) == b"request-part-1 "
        opened = scene.open()
        s.sendall(b"request-part-2")  # written while sealed: it must wait, not vanish
        s.settimeout(1.5)
        with pytest.raises(TimeoutError):
            s.recv(64)
        scene.close(opened)
        s.settimeout(15)
        assert s.recv(64) == b"request-part-2"


def test_a_container_joining_the_namespace_is_killed_and_aborts_every_session(
    scene: Scene,
) -> None:
    opened = scene.open()
    scene.sniffer.reset()
    scene.refresh_workload()
    joiner = scene.client.containers.run(
        WORKLOAD_BASE,
        ["python3", "-c", RELAY, "5"],
        network_mode=f"container:{scene.workload.id}",
        cap_add=["NET_RAW"],
        detach=True,
    )
    try:
        assert wait_until(lambda: (joiner.reload() or joiner.status) == "exited", 10)
        assert joiner.attrs["State"]["ExitCode"] != 0, "the relay ran to its end"
        # Nothing crossed while the intruder was there. Once it is gone, the quarantine
        # lifts and the gate opens (the session was aborted): what comes after is allowed.
        gone = _docker_time(joiner.attrs["State"]["FinishedAt"])
        assert scene.sniffer.seen_before(gone) == [], "frames crossed while sealed"
        with pytest.raises(ApiError) as excinfo:
            scene.close(opened)
        assert excinfo.value.status == 409
        assert "aborted (intrusion)" in str(excinfo.value)
    finally:
        joiner.remove(force=True)
    assert wait_until(lambda: scene.seal_status()["gate"] == "open", 10)
    events = [json.loads(line) for line in scene.daemon.log_text().splitlines() if "{" in line]
    assert any("intrusion" in e.get("msg", "") for e in events)


def test_a_process_entering_the_namespace_quarantines_it(scene: Scene) -> None:
    scene.refresh_workload()
    pid = scene.workload.attrs["State"]["Pid"]
    intruder = subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", "sleep", "60"])
    try:
        assert wait_until(lambda: scene.seal_status()["quarantine"] != [], 5)
        status = scene.seal_status()
        assert (status["gate"], status["link_up"]) == ("closed", False)
        assert str(intruder.pid) in status["quarantine"][0]
        with pytest.raises(ApiError) as excinfo:
            scene.open()
        assert excinfo.value.status == 503
        assert "quarantined" in str(excinfo.value)
    finally:
        intruder.kill()
        intruder.wait(10)
    assert wait_until(lambda: scene.seal_status()["quarantine"] == [], 5)
    assert scene.seal_status()["gate"] == "open"


def test_session_routes_answer_only_the_workloads_own_processes(scene: Scene) -> None:
    for path, body in (
        ("/v1/sessions", {"deadline_seconds": 60}),
        ("/v1/sessions/close", {"session": "00" * 16, "token": "AA==", "output_sha256": None}),
    ):
        with pytest.raises(ApiError) as excinfo:  # this test runs on the host, as root
            call(scene.daemon.socket, "POST", path, body)
        assert (excinfo.value.status, excinfo.value.code) == (403, "forbidden")
    assert scene.seal_status()["open_sessions"] == 0
    # Another container that could reach the socket is not the workload either.
    other = scene.client.containers.run(
        WORKLOAD_BASE,
        ["python3", "-c", CLIENT, "POST", "/v1/sessions", '{"deadline_seconds":60}'],
        mounts=[docker.types.Mount("/run/embassy", str(scene.daemon.socket.parent), "bind")],
        network_mode="none",
        detach=True,
    )
    try:
        other.wait(timeout=30)
        reply = json.loads(other.logs().decode().strip().splitlines()[-1])
        assert reply["status"] == 403, reply
    finally:
        other.remove(force=True)
    # Read routes stay open to the host (an auditor's `embassy identity`, /v1/seal).
    assert call(scene.daemon.socket, "GET", "/v1/health")["status"] == "ok"


def test_concurrent_clients_all_get_answers(scene: Scene) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(5):
            body = call(scene.daemon.socket, "GET", "/v1/health", timeout=30)
            with lock:
                results.append(1 if body.get("status") == "ok" else 0)

    threads = [threading.Thread(target=client) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == [1] * 160


def test_a_restart_of_the_workload_while_sealed_carries_nothing(scene: Scene) -> None:
    old_netns = scene.seal_status()["netns"]
    opened = scene.open()
    scene.sniffer.reset()
    hammer: dict[str, Any] = {}

    def hammer_it() -> None:
        out = scene.py(
            scene.canary, HAMMER, {"host": scene.workload_v4, "port": 8080, "seconds": 8}
        )
        hammer.update(json.loads(out.splitlines()[-1]))

    thread = threading.Thread(target=hammer_it)
    thread.start()
    scene.workload.restart(timeout=1)
    assert wait_until(lambda: scene.seal_status()["netns"] not in (old_netns, None), 20)
    thread.join(30)
    assert hammer == {"connected": 0, "first": None}
    _no_traffic_while_sealed(scene)
    status = scene.seal_status()
    assert (status["gate"], status["link_up"], status["l3"]) == ("closed", False, "sealed")
    scene.refresh_workload()
    assert scene.workload_links() == ["eth0", "lo"]
    scene.close(opened)
    wait_for_http(published_port(scene.client, scene.eid))


def test_a_killed_daemon_leaves_the_workload_sealed_and_a_restart_keeps_it_so(
    scene: Scene,
) -> None:
    opened = scene.open()
    scene.sniffer.reset()
    scene.daemon.stop(signal.SIGKILL)
    assert scene.inbound(scene.workload_v4, 8080).startswith("fail")
    _no_traffic_while_sealed(scene, seconds=1)
    scene.daemon.start()
    status = scene.seal_status()
    assert (status["open_sessions"], status["gate"], status["link_up"]) == (1, "closed", False)
    _no_traffic_while_sealed(scene)
    scene.close(opened)  # the token still works: it is derived, not stored
    assert scene.seal_status()["gate"] == "open"
    assert wait_until(lambda: scene.inbound(scene.workload_v4, 8080) == "ok", 10)


MARKER = "EXFILTRATED-BY-THE-WORKLOAD-" * 8
JUNK = r"""
import http.client, json, os, socket, sys
marker = sys.argv[1]
class C(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect("/run/embassy/embassy.sock")
for method, path, body in (
    ("GET", "/" + marker, None),
    ("POST", "/v1/sessions", marker),
    ("POST", "/v1/sessions", json.dumps({"deadline_seconds": 60, marker: 1})),
    ("GET", "/v1/log?from=" + marker, None),
):
    c = C("embassy", timeout=30)
    c.request(method, path, body=body)
    c.getresponse().read()
for i, name in enumerate((marker + ".act", "." + marker, marker, "x\n" + marker + ".act")):
    with open(os.path.join("/var/lib/embassy/activations", name.replace("/", "_")), "w") as f:
        f.write(marker * 10)
print("done")
"""


def test_no_workload_chosen_bytes_reach_the_logs_or_the_statements(scene: Scene) -> None:
    """Paths, bodies and file names the workload chose never leave through the embassy."""
    out = scene.py(scene.workload, JUNK, MARKER)
    assert out.endswith("done"), out
    opened = scene.open()  # a session, so the intake has something to judge the files by
    time.sleep(1.5)  # the intake handles and removes them; rejections are summarised
    scene.close(opened)
    log_text = scene.daemon.log_text()
    assert MARKER[:27] not in log_text
    for line in (scene.daemon.data_dir / "log.jsonl").read_bytes().splitlines():
        entry = json.loads(line)
        data = base64.b64decode(entry["data"])
        envelope = json.loads(data)
        assert MARKER[:27].encode() not in base64.b64decode(envelope["payload"])
    assert list((scene.daemon.data_dir / "activations").iterdir()) == []
