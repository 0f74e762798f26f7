"""The pure checks of job containers: which runtimes, and what a created container must be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from embassy.errors import PolicyError, SealError
from embassy.jobs.containers import Gone, check_created, check_runtime, mounts_naming

RUNTIMES = {
    "runc": {"path": "runc"},
    "runsc-nonet": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=open"]},
    "runsc-hostinet": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=host"]},
    "kata": {"path": "/usr/bin/kata-runtime"},
}


def test_runtime_choices() -> None:
    assert check_runtime(RUNTIMES, None) == "runc"
    assert check_runtime(RUNTIMES, "runc") == "runc"
    assert check_runtime(RUNTIMES, "runsc-nonet") == "runsc-nonet"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("runsc-hostinet", "--network=none"),
        ("kata", "runc or gVisor"),
        ("missing", "not registered"),
    ],
)
def test_runtimes_that_would_give_a_network_are_refused(name: str, fragment: str) -> None:
    with pytest.raises(PolicyError, match=fragment):
        check_runtime(RUNTIMES, name)


def _sealed() -> dict[str, Any]:
    return {
        "HostConfig": {
            "NetworkMode": "none",
            "ReadonlyRootfs": True,
            "CapDrop": ["ALL"],
            "CapAdd": None,
            "Privileged": False,
            "SecurityOpt": ["no-new-privileges:true"],
            "PidMode": "",
            "IpcMode": "private",
        },
        "Config": {"User": "65534"},
        "NetworkSettings": {"Networks": {"none": {}}},
    }


def test_a_sealed_container_passes() -> None:
    check_created(_sealed(), user="65534")


@pytest.mark.parametrize(
    ("section", "key", "value", "fragment"),
    [
        ("HostConfig", "NetworkMode", "bridge", "NetworkMode"),
        ("HostConfig", "NetworkMode", "host", "NetworkMode"),
        ("NetworkSettings", "Networks", {"none": {}, "bridge": {}}, "Networks"),
        ("HostConfig", "ReadonlyRootfs", False, "ReadonlyRootfs"),
        ("HostConfig", "CapAdd", ["NET_ADMIN"], "CapDrop"),
        ("HostConfig", "CapDrop", [], "CapDrop"),
        ("HostConfig", "Privileged", True, "Privileged"),
        ("HostConfig", "SecurityOpt", [], "no-new-privileges"),
        ("HostConfig", "PidMode", "host", "PidMode"),
        ("HostConfig", "IpcMode", "container:abc", "IpcMode"),
        ("Config", "User", "0", "User"),
    ],
)
def test_anything_else_is_refused(section: str, key: str, value: object, fragment: str) -> None:
    attrs = _sealed()
    attrs[section][key] = value
    with pytest.raises(SealError, match=fragment):
        check_created(attrs, user="65534")


def test_mounts_naming_counts_lines(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text("1 2 0:1 / /a rw - overlay overlay upperdir=/x/abc/diff\n3 4 0:2 / /b rw\n")
    assert mounts_naming(["/x/abc"], info) == 1
    assert mounts_naming(["zzz", ""], info) == 0
    assert mounts_naming(["x"], tmp_path / "missing") == 0


def test_gone_is_ok_only_when_everything_is() -> None:
    ok = Gone("inspect-404", "absent", "absent", "none")
    assert ok.ok
    assert not Gone("still there (running)", "absent", "absent", "none").ok
    assert not Gone("inspect-404", "present", "absent", "none").ok
    assert not Gone("inspect-404", "absent", "present", "none").ok
    assert not Gone("inspect-404", "absent", "absent", "1 left").ok
