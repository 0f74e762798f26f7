"""The workload spec: parsing with precise paths, the launch policy, and the launch events."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from embassy.errors import ConfigError, PolicyError, WireFormatError
from embassy.workload.spec import (
    LAUNCH_EVENT_TYPES,
    Limits,
    Mount,
    PortMapping,
    WorkloadSpec,
    check_launch_policy,
    launch_config_digest,
    launch_events,
    parse_workload,
)

DIGEST = "sha256:" + "ab" * 32
ALLOW_ALL = {"org.embassy.allow-override": "command, env, mounts, user"}
GOOD: dict[str, Any] = {
    "name": "model",
    "image": "embassy/workload-base:bookworm-v2",
    "command": ["python3", "-m", "serve"],
    "env": {"MODEL": "minilm", "TOKEN": "s3cret"},
    "ports": ["8080:80/tcp", "127.0.0.1:9000:9000/udp", {"container_port": 7, "host_port": 0}],
    "memory": "512m",
    "cpus": "1.5",
    "pids": 64,
    "mounts": [{"source": "/srv/weights", "target": "/weights"}],
    "cap_add": ["chown"],
    "user": 1000,
}


def spec(**changes: Any) -> WorkloadSpec:
    return dataclasses.replace(WorkloadSpec(name="w", image="img"), **changes)


# ------------------------------------------------------------------ parsing


def test_absent_section_and_no_env_is_no_workload() -> None:
    assert parse_workload(None, {}) is None
    assert parse_workload(None, {"PATH": "/bin", "EMBASSY_SOCKET": "x"}) is None


def test_good_section_parses_to_canonical_spec() -> None:
    got = parse_workload(GOOD, {})
    assert got == WorkloadSpec(
        name="model",
        image="embassy/workload-base:bookworm-v2",
        command=("python3", "-m", "serve"),
        env=(("MODEL", "minilm"), ("TOKEN", "s3cret")),
        ports=(
            PortMapping(7, "tcp", "0.0.0.0", 0),
            PortMapping(80, "tcp", "0.0.0.0", 8080),
            PortMapping(9000, "udp", "127.0.0.1", 9000),
        ),
        limits=Limits(memory_bytes=512 * 1024**2, nano_cpus=1_500_000_000, pids=64),
        mounts=(Mount("/srv/weights", "/weights", read_only=True),),
        network_mode=None,
        privileged=False,
        cap_add=("CHOWN",),
        user="1000",
    )


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("2g", 2 << 30),
        ("2G", 2 << 30),
        ("64MiB", 64 << 20),
        ("10000000", 10_000_000),
        (1 << 30, 1 << 30),
    ],
)
def test_memory_units(memory: object, expected: int) -> None:
    got = parse_workload({"image": "i", "memory": memory}, {})
    assert got is not None
    assert got.limits.memory_bytes == expected


def test_ipv6_port_and_yaml_float_cpus() -> None:
    got = parse_workload({"image": "i", "ports": ["[::1]:8443:443"], "cpus": 0.25}, {})
    assert got is not None
    assert got.ports == (PortMapping(443, "tcp", "::1", 8443),)
    assert got.limits.nano_cpus == 250_000_000


def test_environment_overrides_the_section() -> None:
    environ = {
        "EMBASSY_WORKLOAD_IMAGE": "other:tag",
        "EMBASSY_WORKLOAD_COMMAND": '["python3", "-c", "print(1)"]',
        "EMBASSY_WORKLOAD_ENV": '{"TOKEN": "new", "EXTRA": "1"}',
        "EMBASSY_WORKLOAD_PORTS": "127.0.0.1:1:2/udp,3:4",
        "EMBASSY_WORKLOAD_MEMORY": "1g",
        "EMBASSY_WORKLOAD_CPUS": "2",
        "EMBASSY_WORKLOAD_PIDS": "10",
    }
    got = parse_workload(GOOD, environ)
    assert got is not None
    assert got.image == "other:tag"
    assert got.command == ("python3", "-c", "print(1)")
    assert dict(got.env) == {"MODEL": "minilm", "TOKEN": "new", "EXTRA": "1"}
    assert [name for name, _ in got.env] == sorted(name for name, _ in got.env)
    assert got.ports == (PortMapping(2, "udp", "127.0.0.1", 1), PortMapping(4, "tcp", "0.0.0.0", 3))
    assert got.limits == Limits(1 << 30, 2_000_000_000, 10)
    assert got.mounts == parse_workload(GOOD, {}).mounts  # type: ignore[union-attr]


def test_environment_alone_makes_a_workload() -> None:
    got = parse_workload(None, {"EMBASSY_WORKLOAD_IMAGE": "img", "EMBASSY_WORKLOAD_PORTS": ""})
    assert got == WorkloadSpec(name="workload", image="img")


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        ({"imgae": "x"}, "config: workload.imgae: unknown key"),
        ({"name": "x"}, "config: workload.image: required"),
        ({"image": ""}, "config: workload.image: expected a non-empty string"),
        ({"image": "a b"}, "config: workload.image: an image reference has no whitespace"),
        ({"image": "i", "name": "-bad"}, "config: workload.name: expected a container name"),
        (
            {"image": "i", "command": "python3"},
            "config: workload.command: expected a non-empty list",
        ),
        ({"image": "i", "command": []}, "config: workload.command: expected a non-empty list"),
        (
            {"image": "i", "command": ["a", 1]},
            "config: workload.command[1]: expected a non-empty string",
        ),
        ({"image": "i", "env": ["A=1"]}, "config: workload.env: expected a mapping"),
        ({"image": "i", "env": {"A": 1}}, "config: workload.env.A: expected a string"),
        ({"image": "i", "env": {"A=B": "1"}}, "config: workload.env: bad variable name"),
        ({"image": "i", "ports": "80:80"}, "config: workload.ports: expected a list"),
        ({"image": "i", "ports": ["80:80", "80"]}, "config: workload.ports[1]: expected HOST_PORT"),
        ({"image": "i", "ports": ["80:80/sctp"]}, "config: workload.ports[0]: protocol must be"),
        (
            {"image": "i", "ports": ["80:70000"]},
            "config: workload.ports[0]: port 70000 out of range",
        ),
        ({"image": "i", "ports": ["1.2.3:80:80"]}, "config: workload.ports[0]: expected an IP"),
        ({"image": "i", "ports": ["80:80", "80:81"]}, "config: workload.ports[1]: host tcp port"),
        (
            {"image": "i", "ports": [{"container_port": 80}]},
            "config: workload.ports[0].host_port: missing",
        ),
        (
            {"image": "i", "ports": [{"container_port": 80, "host_port": 1, "hostip": "x"}]},
            "config: workload.ports[0].hostip: unknown key",
        ),
        (
            {"image": "i", "ports": [{"container_port": 80, "host_port": 1, "protocol": "icmp"}]},
            "config: workload.ports[0].protocol: protocol must be",
        ),
        ({"image": "i", "memory": "lots"}, "config: workload.memory: expected bytes or a size"),
        (
            {"image": "i", "memory": "1k"},
            "config: workload.memory: memory limit 1024 bytes is below",
        ),
        ({"image": "i", "memory": True}, "config: workload.memory: expected an integer"),
        ({"image": "i", "cpus": "one"}, "config: workload.cpus: expected a number of CPUs"),
        ({"image": "i", "cpus": "0.001"}, "config: workload.cpus: CPU limit must be at least 0.01"),
        (
            {"image": "i", "cpus": "1.0000000001"},
            "config: workload.cpus: expected a number of CPUs with at most 9",
        ),
        ({"image": "i", "cpus": "NaN"}, "config: workload.cpus: expected a finite number"),
        ({"image": "i", "pids": 0}, "config: workload.pids: must be >= 1"),
        ({"image": "i", "pids": "many"}, "config: workload.pids: expected an integer"),
        ({"image": "i", "mounts": {"source": "/a"}}, "config: workload.mounts: expected a list"),
        (
            {"image": "i", "mounts": [{"source": "rel", "target": "/t"}]},
            "config: workload.mounts[0].source: expected an absolute path",
        ),
        (
            {"image": "i", "mounts": [{"source": "/a", "target": "/t", "ro": True}]},
            "config: workload.mounts[0].ro: unknown key",
        ),
        (
            {"image": "i", "mounts": [{"source": "/a", "target": "/t", "read_only": "yes"}]},
            "config: workload.mounts[0].read_only: expected true or false",
        ),
        (
            {"image": "i", "mounts": [{"source": "/a", "target": "/run/embassy"}]},
            "config: workload.mounts[0].target: mount target /run/embassy would shadow",
        ),
        (
            {
                "image": "i",
                "mounts": [{"source": "/a", "target": "/t"}, {"source": "/b", "target": "/t/"}],
            },
            "config: workload.mounts[1].target: /t is mounted twice",
        ),
        ({"image": "i", "privileged": "no"}, "config: workload.privileged: expected true or false"),
        ({"image": "i", "cap_add": "NET_ADMIN"}, "config: workload.cap_add: expected a list"),
        (
            {"image": "i", "cap_add": ["NET ADMIN"]},
            "config: workload.cap_add[0]: not a capability name",
        ),
        ({"image": "i", "user": "a b"}, "config: workload.user: expected a user name"),
        (
            {"image": "i", "network_mode": "none", "ports": ["1:1"]},
            "config: workload.ports: ports cannot be published",
        ),
    ],
)
def test_bad_values_name_their_path(tree: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_workload(tree, {})
    assert str(err.value).startswith(message), str(err.value)


def test_section_must_be_a_mapping_and_path_is_used() -> None:
    with pytest.raises(ConfigError, match=r"^config: svc\.workload: expected a mapping"):
        parse_workload(["image"], {}, path="svc.workload")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^config: svc\.workload\.x: unknown key"):
        parse_workload({"x": 1}, {}, path="svc.workload")


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"EMBASSY_WORKLOAD_IMAGE": ""}, "env EMBASSY_WORKLOAD_IMAGE: expected a non-empty string"),
        (
            {"EMBASSY_WORKLOAD_COMMAND": "python3 -c 1"},
            "env EMBASSY_WORKLOAD_COMMAND: invalid JSON",
        ),
        (
            {"EMBASSY_WORKLOAD_COMMAND": '"python3"'},
            "env EMBASSY_WORKLOAD_COMMAND: expected a non-empty list",
        ),
        (
            {"EMBASSY_WORKLOAD_COMMAND": '["a", 2]'},
            "env EMBASSY_WORKLOAD_COMMAND[1]: expected a non-empty string",
        ),
        ({"EMBASSY_WORKLOAD_ENV": '["A"]'}, "env EMBASSY_WORKLOAD_ENV: expected a mapping"),
        ({"EMBASSY_WORKLOAD_ENV": '{"A": 1}'}, "env EMBASSY_WORKLOAD_ENV.A: expected a string"),
        (
            {"EMBASSY_WORKLOAD_PORTS": "80:80,oops"},
            "env EMBASSY_WORKLOAD_PORTS[1]: expected HOST_PORT",
        ),
        (
            {"EMBASSY_WORKLOAD_MEMORY": "5x"},
            "env EMBASSY_WORKLOAD_MEMORY: expected bytes or a size",
        ),
        ({"EMBASSY_WORKLOAD_CPUS": ""}, "env EMBASSY_WORKLOAD_CPUS: expected a number of CPUs"),
        ({"EMBASSY_WORKLOAD_PIDS": "-1"}, "env EMBASSY_WORKLOAD_PIDS: expected an integer"),
        ({"EMBASSY_WORKLOAD_IMAEG": "x"}, "env EMBASSY_WORKLOAD_IMAEG: unknown variable"),
    ],
)
def test_bad_environment_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_workload({"image": "i"}, environ)
    assert str(err.value).startswith(message), str(err.value)


def test_environment_without_image_anywhere_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"workload\.image: required .*EMBASSY_WORKLOAD_IMAGE"):
        parse_workload(None, {"EMBASSY_WORKLOAD_MEMORY": "1g"})


# ------------------------------------------------------------------ launch policy


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (spec(network_mode="host"), "network_mode host shares the host's network namespace"),
        (spec(network_mode="HOST"), "network_mode host"),
        (
            spec(network_mode="container:x"),
            "network_mode 'container:x' shares a network namespace the operator names",
        ),
        (spec(network_mode="ns:/proc/1/ns/net"), "shares a network namespace"),
        (spec(network_mode="some-other-net"), "may only use the embassy's own bridge"),
        (spec(privileged=True), "privileged: a privileged container can change its own firewall"),
        (spec(cap_add=("NET_ADMIN",)), "cap_add NET_ADMIN: NET_ADMIN changes the firewall rules"),
        (spec(cap_add=("NET_RAW",)), "cap_add NET_RAW: NET_RAW opens raw"),
        (spec(cap_add=("CAP_NET_ADMIN",)), "cap_add CAP_NET_ADMIN: NET_ADMIN"),
        (spec(cap_add=("cap_net_admin",)), "cap_add cap_net_admin: NET_ADMIN"),
        (spec(cap_add=("sys_admin",)), "cap_add sys_admin: SYS_ADMIN"),
        (spec(cap_add=("SYS_MODULE",)), "SYS_MODULE loads kernel modules"),
        (spec(cap_add=("SYS_PTRACE",)), "SYS_PTRACE injects code"),
        (spec(cap_add=("CAP_BPF",)), "BPF loads BPF programs"),
        (spec(cap_add=("ALL",)), "cap_add ALL: ALL grants every capability"),
        (spec(cap_add=("all",)), "ALL grants every capability"),
        (spec(cap_add=("DAC_READ_SEARCH",)), "not on the embassy's capability allowlist"),
        (spec(cap_add=("SYS_TIME",)), "not on the embassy's capability allowlist"),
    ],
)
def test_seal_lifting_configurations_are_refused(bad: WorkloadSpec, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        check_launch_policy(bad, ALLOW_ALL)
    assert message in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("/var/run/docker.sock", "exposes a container runtime API (the Docker socket)"),
        ("/run/docker.sock", "the Docker socket"),
        ("//run//docker.sock", "the Docker socket"),
        ("/var/run/../run/docker.sock", "the Docker socket"),
        ("/home/op/docker.sock", "the Docker socket"),
        ("/run/containerd/containerd.sock", "container runtime API"),
        ("/run", "contains the container runtime socket /run/docker.sock"),
        ("/run/", "contains the container runtime socket /run/docker.sock"),
        ("/var/run", "contains the container runtime socket /var/run/docker.sock"),
        ("/var", "contains the container runtime socket /var/run/docker.sock"),
        ("/", "mount source / is the host's root filesystem"),
        ("/proc", "exposes the host's /proc"),
        ("/proc/1/root", "exposes the host's /proc"),
        ("/sys/fs/cgroup", "exposes the host's /sys"),
        ("/dev", "exposes the host's /dev"),
        ("weights", "is not an absolute host path"),
    ],
)
def test_dangerous_mounts_are_refused_even_when_mounts_are_allowed(
    source: str, message: str
) -> None:
    bad = spec(mounts=(Mount(source, "/mnt", read_only=True),))
    with pytest.raises(PolicyError) as err:
        check_launch_policy(bad, ALLOW_ALL)
    assert message in str(err.value), str(err.value)


def test_mount_over_the_embassy_dirs_is_refused() -> None:
    bad = spec(mounts=(Mount("/srv/x", "/var/lib/embassy/activations", read_only=False),))
    with pytest.raises(PolicyError, match="would shadow the embassy's own mount"):
        check_launch_policy(bad, ALLOW_ALL)


@pytest.mark.parametrize(
    ("override", "what"),
    [
        (spec(command=("sh",)), "command"),
        (spec(env=(("A", "1"),)), "env"),
        (spec(mounts=(Mount("/srv/weights", "/weights", read_only=True),)), "mounts"),
        (spec(user="1000"), "user"),
    ],
)
def test_overrides_need_the_image_label(override: WorkloadSpec, what: str) -> None:
    expected = f"the image does not allow overriding its {what} (label org.embassy.allow-override)"
    for labels in ({}, {"org.embassy.role": "x"}, {"org.embassy.allow-override": ""}):
        with pytest.raises(PolicyError) as err:
            check_launch_policy(override, labels)
        assert str(err.value) == expected
    others = ",".join(w for w in ("command", "env", "mounts", "user") if w != what)
    with pytest.raises(PolicyError, match=f"overriding its {what} "):
        check_launch_policy(override, {"org.embassy.allow-override": others})
    check_launch_policy(override, {"org.embassy.allow-override": what})
    check_launch_policy(override, {"org.embassy.allow-override": f" {what.upper()} , env"})


def test_repeating_the_image_defaults_is_no_override() -> None:
    defaults = spec(command=("python3",), env=(("PATH", "/bin"),), user="app")
    same = spec(command=("python3",), env=(("PATH", "/bin"),), user="app")
    check_launch_policy(same, {}, defaults)
    with pytest.raises(PolicyError, match="overriding its env"):
        check_launch_policy(dataclasses.replace(same, env=(("PATH", "/evil"),)), {}, defaults)


def test_plain_and_benign_specs_pass() -> None:
    check_launch_policy(spec(), {})
    check_launch_policy(spec(network_mode="bridge", cap_add=("NET_BIND_SERVICE",)), {})
    check_launch_policy(spec(network_mode="none", limits=Limits(1 << 30, 10**9, 50)), {})
    parsed = parse_workload(GOOD, {})
    assert parsed is not None
    check_launch_policy(parsed, ALLOW_ALL)


def test_unknown_override_in_label_is_bad_metadata() -> None:
    with pytest.raises(WireFormatError, match="unknown override 'network'"):
        check_launch_policy(spec(), {"org.embassy.allow-override": "command,network"})


# ------------------------------------------------------------------ launch events

SEAL_POLICY = {"v": 1, "allow_established_inbound": True}


def test_launch_events_are_typed_canonical_and_ordered() -> None:
    parsed = parse_workload(GOOD, {})
    assert parsed is not None
    events = launch_events(parsed, DIGEST, SEAL_POLICY)
    assert tuple(kind for kind, _ in events) == LAUNCH_EVENT_TYPES
    assert events[0][0] == "launch-image"
    assert events[-1] == ("launch-separator", b"{}")
    bodies = {kind: json.loads(data) for kind, data in events}
    for _kind, data in events:
        assert (
            data
            == json.dumps(
                json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False
            ).encode()
        )
    assert bodies["launch-image"]["digest"] == DIGEST
    assert bodies["launch-image"]["image"] == "embassy/workload-base:bookworm-v2"
    assert bodies["launch-command"]["command"] == ["python3", "-m", "serve"]
    assert bodies["launch-seal-policy"] == SEAL_POLICY
    assert bodies["launch-env"]["env"] == [
        {"name": "MODEL", "sha256": hashlib.sha256(b"minilm").hexdigest()},
        {"name": "TOKEN", "sha256": hashlib.sha256(b"s3cret").hexdigest()},
    ]
    assert bodies["launch-limits"]["memory_bytes"] == 512 << 20
    assert bodies["launch-options"]["mounts"][0]["source"] == "/srv/weights"
    assert len(bodies["launch-ports"]["ports"]) == 3


def test_launch_events_never_contain_env_values() -> None:
    secret = "hunter2-very-secret-value"
    parsed = parse_workload({"image": "i", "env": {"API_KEY": secret}}, {})
    assert parsed is not None
    events = launch_events(parsed, DIGEST, SEAL_POLICY)
    for _, data in events:
        assert secret.encode() not in data
    assert b"API_KEY" in b"".join(data for _, data in events)


def test_command_null_is_recorded_as_null() -> None:
    events = dict(launch_events(spec(), DIGEST, {}))
    assert events["launch-command"] == b'{"command":null,"v":1}'


def test_seal_policy_must_encode_canonically() -> None:
    with pytest.raises(ConfigError, match="seal policy: cannot be encoded canonically"):
        launch_events(spec(), DIGEST, {"ratio": 0.5})


def test_launch_digest_changes_with_every_input() -> None:
    base = spec(
        command=("a",),
        env=(("K", "v"),),
        ports=(PortMapping(80, "tcp", "0.0.0.0", 8080),),
        limits=Limits(1 << 30, 10**9, 10),
        mounts=(Mount("/srv", "/m", read_only=True),),
        cap_add=("CHOWN",),
        user="1",
    )
    variants = [
        spec(),
        dataclasses.replace(base, name="w2"),
        dataclasses.replace(base, image="img2"),
        dataclasses.replace(base, command=("b",)),
        dataclasses.replace(base, command=None),
        dataclasses.replace(base, env=(("K", "w"),)),
        dataclasses.replace(base, env=(("L", "v"),)),
        dataclasses.replace(base, ports=(PortMapping(80, "udp", "0.0.0.0", 8080),)),
        dataclasses.replace(base, ports=(PortMapping(80, "tcp", "127.0.0.1", 8080),)),
        dataclasses.replace(base, ports=(PortMapping(80, "tcp", "0.0.0.0", 8081),)),
        dataclasses.replace(base, limits=Limits(2 << 30, 10**9, 10)),
        dataclasses.replace(base, limits=Limits(1 << 30, 2 * 10**9, 10)),
        dataclasses.replace(base, limits=Limits(1 << 30, 10**9, 11)),
        dataclasses.replace(base, mounts=(Mount("/srv", "/m", read_only=False),)),
        dataclasses.replace(base, cap_add=("KILL",)),
        dataclasses.replace(base, user="2"),
        dataclasses.replace(base, network_mode="none"),
    ]
    digests = {launch_config_digest(s, DIGEST) for s in [base, *variants]}
    assert len(digests) == len(variants) + 1
    assert launch_config_digest(base, "sha256:" + "cd" * 32) not in digests
    assert launch_config_digest(base, DIGEST) == launch_config_digest(
        dataclasses.replace(base), DIGEST
    )
    assert all(len(d) == 32 for d in digests)
