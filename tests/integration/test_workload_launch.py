"""The workload launched for real on dockerd: the netns holder, the workload that joins it.

Checked with the Docker SDK and /proc, not with the embassy's own view: only the two host
mounts, no capability, the holder's network namespace, published ports, a restart that
keeps the namespace, refusals that create nothing, and a cleanup that leaves nothing.
No traffic leaves the test: the only connection is to a Unix socket the test creates.
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
from embassy.workload.docker_runtime import DockerRuntime, Launched, netns_path
from embassy.workload.spec import Mount, WorkloadSpec, parse_workload
from tests.integration.conftest import IN_CI

pytestmark = pytest.mark.integration

BASE_IMAGE = "embassy/workload-base:bookworm-v3"
HOLDER_IMAGE = "embassy/canary:latest"
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
    for image in (BASE_IMAGE, HOLDER_IMAGE):
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

    def launch(self, spec: WorkloadSpec) -> Launched:
        return self.runtime.launch(
            spec,
            embassy_id=self.embassy_id,
            socket_dir=self.socket_dir,
            activation_dir=self.activation_dir,
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


def test_launch_isolates_the_workload_in_the_holders_netns(env: Env) -> None:
    launched = env.launch(_spec())
    workload = env.client.containers.get(launched.workload_id)
    holder = env.client.containers.get(launched.holder_id)
    wcfg, hcfg = workload.attrs["HostConfig"], holder.attrs["HostConfig"]

    # The workload: only the embassy's two host mounts, every capability dropped.
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
    assert wcfg["NetworkMode"] == f"container:{launched.holder_id}"
    assert wcfg["RestartPolicy"]["Name"] == "no"
    assert wcfg["Memory"] == 256 << 20
    assert wcfg["PidsLimit"] == 64
    assert workload.attrs["Image"] == launched.image_digest
    assert workload.labels["org.embassy.role"] == "workload"
    assert workload.labels["org.embassy.launch-digest"] == launched.launch_digest
    status = workload.exec_run(["grep", "CapEff", "/proc/1/status"]).output.decode()
    assert status.split() == ["CapEff:", "0000000000000000"]

    # The holder: on the embassy's network, publishing the workload's port, locked down.
    networks = holder.attrs["NetworkSettings"]["Networks"]
    assert list(networks) == [f"embassy-{env.embassy_id}"]
    assert launched.network == f"embassy-{env.embassy_id}"
    assert launched.ipv4 == networks[launched.network]["IPAddress"]
    bound = holder.attrs["NetworkSettings"]["Ports"]["8080/tcp"]
    assert bound[0]["HostIp"] == "127.0.0.1"
    assert int(bound[0]["HostPort"]) > 0
    assert hcfg["CapDrop"] == ["ALL"]
    assert hcfg["ReadonlyRootfs"] is True
    assert not hcfg.get("Mounts")
    assert hcfg["Binds"] in (None, [])
    assert "no-new-privileges:true" in hcfg["SecurityOpt"]
    assert holder.labels["org.embassy.role"] == "netns-holder"
    assert holder.labels["org.embassy.id"] == env.embassy_id

    # Same network namespace, and it is the holder's.
    assert launched.holder_pid == holder.attrs["State"]["Pid"]
    wpid = workload.attrs["State"]["Pid"]
    assert _netns_inode(wpid) == _netns_inode(launched.holder_pid)
    assert netns_path(launched) == Path(f"/proc/{launched.holder_pid}/ns/net")
    assert env.runtime.in_sealed_netns(launched)


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
    with pytest.raises(ConflictError, match="create the netns holder"):
        env.launch(_spec())
    assert {c.id for c in env.ours()} == {first.workload_id, first.holder_id}
    assert env.network_exists()
    assert env.runtime.refresh(first).holder_pid == first.holder_pid


def test_workload_restart_keeps_the_netns_and_is_reported(env: Env) -> None:
    launched = env.launch(_spec())
    before = _netns_inode(launched.holder_pid)
    started = threading.Event()
    seen: list[str] = []

    def on_start(cid: str) -> None:
        seen.append(cid)
        started.set()

    stop = env.runtime.watch_starts([launched.workload_id, launched.holder_id], on_start)
    try:
        workload = env.client.containers.get(launched.workload_id)
        old_pid = workload.attrs["State"]["Pid"]
        workload.restart(timeout=1)
        assert started.wait(30), "no start event for the restarted workload"
    finally:
        stop()
    assert seen[0] == launched.workload_id
    workload.reload()
    new_pid = workload.attrs["State"]["Pid"]
    assert new_pid not in (0, old_pid)
    after = env.runtime.refresh(launched)
    assert after.holder_pid == launched.holder_pid
    assert _netns_inode(launched.holder_pid) == before
    assert _netns_inode(new_pid) == before
    assert env.runtime.in_sealed_netns(after)
    assert env.runtime.find(env.embassy_id) == after


def test_remove_leaves_nothing(env: Env) -> None:
    launched = env.launch(_spec())
    assert len(env.ours()) == 2
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
