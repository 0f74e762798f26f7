"""The workload launched for real on dockerd: no network of Docker's, the embassy's network.

Checked with the Docker SDK and /proc, not with the embassy's own view: only the two host
mounts, no capability, Docker's ``none`` network (loopback only, at every start), the
addresses the embassy's network reserves for the workload, the containers that join it,
refusals that create nothing, and a cleanup that leaves nothing. No traffic leaves the
test: the only connection is to a Unix socket the test creates.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from embassy.errors import ConflictError, PolicyError
from embassy.net.plan import RESERVATION, Published
from embassy.workload.docker_runtime import DockerRuntime, Launched
from embassy.workload.spec import Mount, WorkloadSpec, parse_workload
from tests.integration.conftest import IN_CI

pytestmark = pytest.mark.integration

BASE_IMAGE = "embassy/workload-base:bookworm-v3"
CANARY_IMAGE = "embassy/canary:latest"
TEST_IMAGE = "embassy/workload-test:allow-command-mounts"
SLEEP = ["python3", "-c", "import time; time.sleep(600)"]


def _unavailable(msg: str) -> None:
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    try:
        import docker
        import docker.errors
    except ImportError:
        _unavailable("the docker SDK is not installed")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        _unavailable(f"dockerd is not reachable ({exc}); start it: dockerd &")
    for image in (BASE_IMAGE, CANARY_IMAGE):
        try:
            client.images.get(image)
        except docker.errors.ImageNotFound:
            client.close()
            _unavailable(f"image {image} missing: run scripts/build_images.sh")
    # The base image allows no override; the test's image allows command and mounts (built
    # from the local base image: nothing is pulled).
    dockerfile = f"FROM {BASE_IMAGE}\nLABEL org.embassy.allow-override=command,mounts\n"
    client.images.build(
        fileobj=io.BytesIO(dockerfile.encode()), tag=TEST_IMAGE, rm=True, pull=False
    )
    yield client
    with contextlib.suppress(docker.errors.APIError):
        client.images.remove(TEST_IMAGE)
    client.close()


@dataclass
class Env:
    client: Any
    runtime: DockerRuntime
    embassy_id: str
    socket_dir: Path
    activation_dir: Path

    def launch(self, spec: WorkloadSpec, ports: tuple[Published, ...] = ()) -> Launched:
        return self.runtime.launch(
            spec,
            embassy_id=self.embassy_id,
            socket_dir=self.socket_dir,
            activation_dir=self.activation_dir,
            ports=ports,
        )

    def ours(self) -> list[Any]:
        return list(
            self.client.containers.list(
                all=True, filters={"label": f"org.embassy.id={self.embassy_id}"}
            )
        )

    def network_exists(self) -> bool:
        return any(
            n.name == f"embassy-{self.embassy_id}"
            for n in self.client.networks.list(names=[f"embassy-{self.embassy_id}"])
        )


@pytest.fixture
def env(client: Any, tmp_path: Path) -> Iterator[Env]:
    embassy_id = f"t{secrets.token_hex(4)}"
    (tmp_path / "s").mkdir()
    (tmp_path / "a").mkdir()
    with DockerRuntime(client) as runtime:
        e = Env(client, runtime, embassy_id, tmp_path / "s", tmp_path / "a")
        try:
            yield e
        finally:
            for container in e.ours():
                container.remove(force=True)
            for network in client.networks.list(names=[f"embassy-{embassy_id}"]):
                network.remove()


def _spec(**extra: Any) -> WorkloadSpec:
    spec = parse_workload(
        {
            "name": "model",
            "image": TEST_IMAGE,
            "command": SLEEP,
            "ports": ["127.0.0.1:0:8080/tcp"],
            "memory": "256m",
            "pids": 64,
            **extra,
        },
        {},
    )
    assert spec is not None
    return spec


def _netns_inode(pid: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/net")
    return st.st_dev, st.st_ino


def _links(pid: int) -> list[str]:
    return sorted(os.listdir(f"/proc/{pid}/root/sys/class/net"))


def test_launch_gives_the_workload_no_network_and_only_the_embassy_mounts(env: Env) -> None:
    ports = (Published("tcp", "127.0.0.1", 18080, 8080),)
    launched = env.launch(_spec(), ports)
    workload = env.client.containers.get(launched.workload_id)
    wcfg = workload.attrs["HostConfig"]

    mounts = {m["Destination"]: m for m in workload.attrs["Mounts"]}
    assert set(mounts) == {"/run/embassy", "/var/lib/embassy/activations"}
    assert mounts["/run/embassy"]["Source"] == str(env.socket_dir)
    assert mounts["/run/embassy"]["RW"] is False
    assert mounts["/var/lib/embassy/activations"]["Source"] == str(env.activation_dir)
    assert all(m["Type"] == "bind" for m in mounts.values())
    assert wcfg["Binds"] in (None, [])
    assert wcfg["CapDrop"] == ["ALL"]
    assert not wcfg["CapAdd"]
    assert wcfg["Privileged"] is False
    assert "no-new-privileges:true" in wcfg["SecurityOpt"]
    assert wcfg["RestartPolicy"]["Name"] == "no"
    assert wcfg["Memory"] == 256 << 20
    assert wcfg["PidsLimit"] == 64
    assert workload.attrs["Image"] == launched.image_digest
    assert workload.labels["org.embassy.role"] == "workload"
    assert workload.labels["org.embassy.launch-digest"] == launched.launch_digest
    assert workload.labels["org.embassy.ports"] == "127.0.0.1:18080:8080/tcp"
    status = workload.exec_run(["grep", "CapEff", "/proc/1/status"]).output.decode()
    assert status.split() == ["CapEff:", "0000000000000000"]

    # Docker's "none": the namespace has loopback only; Docker publishes nothing, has no
    # endpoint and no resolver for it. Its one link is the embassy's to make.
    assert wcfg["NetworkMode"] == "none"
    assert wcfg["PortBindings"] in (None, {})
    assert _links(launched.pid) == ["lo"]
    assert launched.pid == workload.attrs["State"]["Pid"]
    assert launched.ports == ports


def test_the_embassys_network_reserves_the_workloads_addresses(env: Env) -> None:
    plan = env.runtime.ensure_network(env.embassy_id)
    network = env.client.networks.get(f"embassy-{env.embassy_id}")
    assert network.attrs["Options"]["com.docker.network.bridge.name"] == plan.bridge
    pools = {":" in p["Subnet"]: p for p in network.attrs["IPAM"]["Config"]}
    assert plan.ipv4 is not None
    assert pools[False]["AuxiliaryAddresses"] == {RESERVATION: str(plan.ipv4.ip)}
    assert str(plan.gateway4) == pools[False]["Gateway"]
    if plan.ipv6 is not None:
        assert pools[True]["AuxiliaryAddresses"] == {RESERVATION: str(plan.ipv6.ip)}
    assert env.runtime.ensure_network(env.embassy_id) == plan, "the same network is reused"
    import docker

    # Docker's allocation never hands the reserved address out (an operator who names it
    # explicitly can still take it: docs/architecture.md says what that does and does not do).
    tiny = env.client.networks.create(
        f"embassy-{env.embassy_id}-tiny",
        driver="bridge",
        ipam=docker.types.IPAMConfig(
            pool_configs=[
                docker.types.IPAMPool(
                    subnet="10.254.254.0/29",
                    gateway="10.254.254.1",
                    aux_addresses={RESERVATION: "10.254.254.6"},
                )
            ]
        ),
        labels={"org.embassy.id": env.embassy_id},
    )
    try:
        given = []
        for _ in range(4):  # .2 .3 .4 .5, then the pool is exhausted: .6 is never given
            c = env.client.containers.run(
                CANARY_IMAGE,
                ["sleep", "30"],
                network=tiny.name,
                detach=True,
                labels={"org.embassy.id": env.embassy_id, "org.embassy.role": "test"},
            )
            c.reload()
            given.append(c.attrs["NetworkSettings"]["Networks"][tiny.name]["IPAddress"])
        assert "10.254.254.6" not in given
        with pytest.raises(docker.errors.APIError):
            env.client.containers.run(
                CANARY_IMAGE,
                ["sleep", "30"],
                network=tiny.name,
                detach=True,
                labels={"org.embassy.id": env.embassy_id, "org.embassy.role": "test"},
            )
    finally:
        for c in env.client.containers.list(all=True, filters={"network": tiny.name}):
            c.remove(force=True)
        tiny.remove()


def test_a_foreign_network_with_the_name_is_refused(env: Env) -> None:
    env.client.networks.create(f"embassy-{env.embassy_id}", driver="bridge")
    with pytest.raises(ConflictError, match="is not this embassy's"):
        env.runtime.ensure_network(env.embassy_id)


def test_workload_reaches_the_embassy_socket_and_activation_dir(env: Env) -> None:
    path = env.socket_dir / "t.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(30)
        launched = env.launch(_spec())
        workload = env.client.containers.get(launched.workload_id)
        code = (
            "import socket; s = socket.socket(socket.AF_UNIX);"
            "s.connect('/run/embassy/t.sock'); s.sendall(b'hello'); s.close()"
        )
        result: dict[str, Any] = {}
        sender = threading.Thread(
            target=lambda: result.update(r=workload.exec_run(["python3", "-c", code]))
        )
        sender.start()
        conn, _ = server.accept()
        with conn:
            assert conn.recv(16) == b"hello"
        sender.join(30)
        assert result["r"].exit_code == 0, result["r"].output
    out = workload.exec_run(["sh", "-c", "echo x > /var/lib/embassy/activations/a.bin"])
    assert out.exit_code == 0, out.output
    assert (env.activation_dir / "a.bin").read_bytes() == b"x\n"
    # The socket dir is read-only for the workload.
    out = workload.exec_run(["sh", "-c", "echo x > /run/embassy/evil"])
    assert out.exit_code != 0
    assert not (env.socket_dir / "evil").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"privileged": True}, "privileged"),
        ({"network_mode": "host"}, "network_mode host"),
        ({"cap_add": ["CAP_NET_ADMIN"]}, "NET_ADMIN"),
        ({"mounts": [{"source": "/var/run/docker.sock", "target": "/d.sock"}]}, "Docker socket"),
        ({"env": {"A": "1"}}, "does not allow overriding its env"),
    ],
)
def test_refused_spec_creates_nothing(env: Env, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        env.launch(_spec(**extra))
    assert env.ours() == []
    assert not env.network_exists()


def test_symlink_to_docker_socket_is_refused(env: Env, tmp_path: Path) -> None:
    link = tmp_path / "innocent"
    link.symlink_to("/run")
    spec = WorkloadSpec(
        name="model", image=TEST_IMAGE, mounts=(Mount(str(link), "/x", read_only=True),)
    )
    with pytest.raises(
        PolicyError, match=r"contains the container runtime socket.*resolves to /run"
    ):
        env.launch(spec)
    assert env.ours() == []


def test_an_image_without_the_label_refuses_a_command_override(env: Env) -> None:
    # The canary image carries no org.embassy.allow-override label: nothing may be overridden.
    spec = WorkloadSpec(name="model", image="embassy/canary:latest", command=("sleep", "60"))
    with pytest.raises(PolicyError, match=r"does not allow overriding its command"):
        env.launch(spec)
    assert env.ours() == []


def test_missing_image_is_refused_without_pulling(env: Env) -> None:
    spec = WorkloadSpec(name="model", image="embassy/no-such-image:never")
    with pytest.raises(PolicyError, match="is not present locally; build it"):
        env.launch(spec)
    assert env.ours() == []


def test_second_launch_conflicts_and_leaves_the_first_intact(env: Env) -> None:
    first = env.launch(_spec())
    with pytest.raises(ConflictError, match="create the workload"):
        env.launch(_spec())
    assert {c.id for c in env.ours()} == {first.workload_id}
    assert env.runtime.refresh(first).pid == first.pid


def test_a_restart_is_reported_and_gets_a_new_namespace_with_loopback_only(env: Env) -> None:
    launched = env.launch(_spec())
    before = _netns_inode(launched.pid)
    # Held open, as the embassy holds the namespace it wired: a namespace's inode number is
    # unique only while the namespace lives (the kernel reuses a freed one at once).
    held = os.open(f"/proc/{launched.pid}/ns/net", os.O_RDONLY)
    seen: list[tuple[str, str]] = []
    started = threading.Event()

    def on_event(action: str, cid: str) -> None:
        if cid == launched.workload_id:
            seen.append((action, cid))
            if action == "start":
                started.set()

    stop = env.runtime.watch(on_event)
    try:
        env.client.containers.get(launched.workload_id).restart(timeout=1)
        assert started.wait(30), "no start event for the restarted workload"
    finally:
        stop()
    assert [action for action, _ in seen] == ["die", "start"]
    after = env.runtime.refresh(launched)
    assert after.pid not in (0, launched.pid)
    assert _netns_inode(after.pid) != before, "a restart is a new network namespace"
    os.close(held)
    assert _links(after.pid) == ["lo"], "born with no link: nothing until the embassy wires it"
    assert env.runtime.find(env.embassy_id) == after


def test_containers_that_join_the_workloads_namespaces_are_recognised(env: Env) -> None:
    launched = env.launch(_spec())
    modes = {
        "network_mode": "NetworkMode",
        "pid_mode": "PidMode",
        "ipc_mode": "IpcMode",
    }
    for keyword, mode in modes.items():
        for target in (launched.workload_id, launched.name, launched.workload_id[:12]):
            joiner = env.client.containers.create(
                CANARY_IMAGE,
                ["sleep", "1"],
                labels={"org.embassy.id": env.embassy_id, "org.embassy.role": "test"},
                **{keyword: f"container:{target}"},
            )
            assert env.runtime.joins(joiner.id, launched) == [mode], (keyword, target)
            joiner.remove(force=True)
    bystander = env.client.containers.create(
        CANARY_IMAGE, ["sleep", "1"], labels={"org.embassy.id": env.embassy_id}
    )
    assert env.runtime.joins(bystander.id, launched) == []


def test_a_netns_holder_of_the_earlier_design_is_refused_at_adoption(env: Env) -> None:
    env.launch(_spec())
    env.client.containers.create(
        CANARY_IMAGE,
        ["sleep", "1"],
        labels={"org.embassy.id": env.embassy_id, "org.embassy.role": "netns-holder"},
    )
    with pytest.raises(ConflictError, match="netns holder container from an earlier version"):
        env.runtime.find(env.embassy_id)


def test_remove_leaves_nothing(env: Env) -> None:
    env.runtime.ensure_network(env.embassy_id)
    launched = env.launch(_spec())
    assert len(env.ours()) == 1
    env.runtime.remove(launched)
    assert env.ours() == []
    assert not env.network_exists()
    env.runtime.remove(launched)  # idempotent
    assert env.runtime.find(env.embassy_id) is None


def test_allowed_mount_is_added_read_only(env: Env, tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "w.bin").write_bytes(b"w")
    launched = env.launch(_spec(mounts=[{"source": str(weights), "target": "/weights"}]))
    workload = env.client.containers.get(launched.workload_id)
    mounts = {m["Destination"]: m for m in workload.attrs["Mounts"]}
    assert set(mounts) == {"/run/embassy", "/var/lib/embassy/activations", "/weights"}
    assert mounts["/weights"]["RW"] is False
    assert workload.exec_run(["cat", "/weights/w.bin"]).output == b"w"
    assert workload.exec_run(["sh", "-c", "echo x > /weights/w.bin"]).exit_code != 0
