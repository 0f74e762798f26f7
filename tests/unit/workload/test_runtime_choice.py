"""A workload's Docker runtime: parsed strictly, recorded in its launch, and refused unless it
uses the network namespace the embassy wires (runc, or gVisor with --network=host)."""

from __future__ import annotations

from typing import Any

import pytest

from embassy.errors import ConfigError, PolicyError
from embassy.workload.docker_runtime import DockerRuntime
from embassy.workload.spec import WorkloadSpec, launch_config_digest, parse_workload


class FakeDocker:
    def __init__(self, runtimes: dict[str, Any]) -> None:
        self.runtimes = runtimes

    def info(self) -> dict[str, Any]:
        return {"Runtimes": self.runtimes}


RUNTIMES = {
    "runc": {"path": "runc"},
    "runsc-hostinet": {
        "path": "/usr/bin/runsc",
        "runtimeArgs": ["--network=host", "--host-uds=open"],
    },
    "runsc-none": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none"]},
    "runsc-netstack": {"path": "/usr/bin/runsc"},
    "kata": {"path": "/usr/bin/kata-runtime"},
}


def _spec(**extra: Any) -> WorkloadSpec:
    spec = parse_workload({"image": "x", **extra}, {})
    assert spec is not None
    return spec


@pytest.mark.parametrize("name", ["runc", "runsc-hostinet"])
def test_runtimes_that_use_the_wired_namespace_are_accepted(name: str) -> None:
    DockerRuntime(FakeDocker(RUNTIMES)).check_runtime(_spec(runtime=name))


def test_gvisor_with_no_network_fits_only_a_workload_with_no_network() -> None:
    runtime = DockerRuntime(FakeDocker(RUNTIMES))
    runtime.check_runtime(_spec(runtime="runsc-none", network_mode="none"))
    with pytest.raises(PolicyError, match="without --network=host"):
        runtime.check_runtime(_spec(runtime="runsc-none"))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("runsc-netstack", "without --network=host"),
        ("kata", "runs kata-runtime"),
        ("nope", "not registered with dockerd"),
    ],
)
def test_other_runtimes_are_refused(name: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        DockerRuntime(FakeDocker(RUNTIMES)).check_runtime(_spec(runtime=name))


@pytest.mark.parametrize("value", ["", "Runsc", "a b", "x" * 65, "../runc", "rün", 7, ["runc"]])
def test_a_runtime_name_is_parsed_strictly(value: Any) -> None:
    with pytest.raises(ConfigError, match=r"workload\.runtime"):
        _spec(runtime=value)


def test_the_runtime_is_part_of_the_launch_and_absent_keeps_old_digests() -> None:
    plain, gvisor = _spec(), _spec(runtime="runsc-hostinet")
    assert plain.runtime is None
    assert gvisor.runtime == "runsc-hostinet"
    assert launch_config_digest(plain, "sha256:" + "0" * 64) != launch_config_digest(
        gvisor, "sha256:" + "0" * 64
    )
    from_env = parse_workload({"image": "x"}, {"EMBASSY_WORKLOAD_RUNTIME": "runsc-hostinet"})
    assert from_env is not None
    assert from_env.runtime == "runsc-hostinet"
