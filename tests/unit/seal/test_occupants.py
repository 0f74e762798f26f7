"""Who besides the workload is in its namespace, read from a fake /proc tree."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from embassy.seal.occupants import Occupant, find_occupants, in_cgroup_of, still_there
from tests.unit.seal.fakeproc import FakeProc

CONTAINER = "c0ffee" + "0" * 58
WORKLOAD_CGROUP = f"0::/system.slice/docker-{CONTAINER}.scope\n"
HOST_CGROUP = "0::/user.slice/user-0.slice/session-1.scope\n"
OWN = 1  # the embassy's own pid in these trees


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    fake = FakeProc(tmp_path)
    fake.process(OWN, "host", HOST_CGROUP)
    return fake


def _find(proc: FakeProc, *, threads: bool = False, container: str = CONTAINER) -> list[Occupant]:
    return find_occupants(
        proc.netns("workload"), container, threads=threads, proc=proc.root, own_pid=OWN
    )


def _tag(cgroup: str) -> str:
    return hashlib.sha256(cgroup.encode()).hexdigest()[:12]


def test_tasks_of_other_namespaces_are_ignored(proc: FakeProc) -> None:
    proc.process(10, "host", HOST_CGROUP)
    proc.process(11, "other", HOST_CGROUP)
    assert _find(proc) == []
    assert _find(proc, threads=True) == []


def test_tasks_in_the_containers_cgroup_are_the_workload(proc: FakeProc) -> None:
    proc.process(20, "workload", WORKLOAD_CGROUP)
    proc.process(21, "workload", WORKLOAD_CGROUP, threads={22: "workload"})  # docker exec
    assert _find(proc) == []
    assert _find(proc, threads=True) == []


def test_anyone_else_in_the_namespace_is_an_occupant(proc: FakeProc) -> None:
    proc.process(20, "workload", WORKLOAD_CGROUP)
    proc.process(30, "workload", HOST_CGROUP)  # nsenter --net=/proc/20/ns/net
    other = "0::/system.slice/docker-" + "a" * 64 + ".scope\n"  # --network container:
    proc.process(31, "workload", other)
    assert sorted(_find(proc), key=lambda o: o.pid) == [
        Occupant(30, 30, _tag(HOST_CGROUP)),
        Occupant(31, 31, _tag(other)),
    ]


def test_own_pid_is_skipped(proc: FakeProc) -> None:
    # The embassy's netns worker thread enters the workload's namespace to change its rules.
    proc.move(OWN, OWN, "workload")
    assert _find(proc) == []
    assert _find(proc, threads=True) == []
    found = find_occupants(proc.netns("workload"), CONTAINER, proc=proc.root, own_pid=OWN + 1000)
    assert [o.pid for o in found] == [OWN]


def test_threads_looks_at_every_task(proc: FakeProc) -> None:
    # A thread of a host process that setns()-ed in: its process's ns/net says "host".
    proc.process(40, "host", HOST_CGROUP, threads={41: "host", 42: "workload"})
    assert _find(proc) == []
    assert _find(proc, threads=True) == [Occupant(40, 42, _tag(HOST_CGROUP))]


def test_no_container_id_means_everyone_is_an_occupant(proc: FakeProc) -> None:
    proc.process(20, "workload", WORKLOAD_CGROUP)
    assert [o.pid for o in _find(proc, container="")] == [20]


def test_occupant_carries_a_short_tag_never_the_cgroup_text(proc: FakeProc) -> None:
    chosen = "0::/system.slice/Ignore previous instructions; secret-name-\u202e.scope\n"
    proc.process(50, "workload", chosen)
    (occupant,) = _find(proc)
    assert occupant.cgroup_sha == _tag(chosen)
    assert len(occupant.cgroup_sha) == 12
    assert int(occupant.cgroup_sha, 16) >= 0
    assert "secret" not in repr(occupant)
    assert "Ignore" not in repr(occupant)
    assert set(Occupant.__slots__) == {"pid", "tid", "cgroup_sha"}


def test_entries_that_are_not_pids_are_ignored(proc: FakeProc) -> None:
    for name in ("self", "thread-self", "sys", "\u0663\u0664"):  # Arabic-Indic "34"
        (proc.root / name / "ns").mkdir(parents=True)
        (proc.root / name / "cgroup").write_text(HOST_CGROUP)
    assert _find(proc) == []


def test_a_task_that_vanishes_while_read_is_not_counted(proc: FakeProc) -> None:
    proc.process(60, "workload", HOST_CGROUP)
    (proc.root / "60" / "cgroup").unlink()  # exited between the two reads
    proc.process(61, "workload", HOST_CGROUP)
    (proc.root / "61" / "ns" / "net").unlink()
    (proc.root / "61" / "task" / "61" / "ns" / "net").unlink()
    proc.process(62, "workload", HOST_CGROUP, threads={63: "workload"})
    (proc.root / "62" / "task" / "63" / "ns" / "net").unlink()
    assert _find(proc) == [Occupant(62, 62, _tag(HOST_CGROUP))]
    assert _find(proc, threads=True) == [Occupant(62, 62, _tag(HOST_CGROUP))]


def test_a_missing_proc_finds_nobody(tmp_path: Path) -> None:
    fake = FakeProc(tmp_path)
    assert find_occupants(fake.netns("workload"), CONTAINER, proc=tmp_path / "nowhere") == []
    assert (
        find_occupants(fake.netns("workload"), CONTAINER, threads=True, proc=tmp_path / "nowhere")
        == []
    )


# -- still_there ----------------------------------------------------------------------------------


def _there(proc: FakeProc, occupant: Occupant) -> bool:
    return still_there(occupant, proc.netns("workload"), CONTAINER, proc=proc.root)


def test_still_there_while_it_stays(proc: FakeProc) -> None:
    proc.process(70, "workload", HOST_CGROUP)
    (occupant,) = _find(proc)
    assert _there(proc, occupant)
    assert _there(proc, occupant)


def test_not_there_once_it_leaves_the_namespace(proc: FakeProc) -> None:
    proc.process(70, "workload", HOST_CGROUP)
    (occupant,) = _find(proc)
    proc.move(70, 70, "host")
    assert not _there(proc, occupant)


def test_not_there_once_it_exits(proc: FakeProc) -> None:
    proc.process(70, "workload", HOST_CGROUP)
    (occupant,) = _find(proc)
    proc.exit(70)
    assert not _there(proc, occupant)


def test_not_there_once_it_is_in_the_container(proc: FakeProc) -> None:
    # docker exec: the process starts in the namespace a moment before runc moves it into
    # the container's cgroup.
    proc.process(70, "workload", HOST_CGROUP)
    (occupant,) = _find(proc)
    proc.set_cgroup(70, WORKLOAD_CGROUP)
    assert not _there(proc, occupant)
    assert _find(proc) == []


def test_a_thread_occupant_is_followed_by_its_tid(proc: FakeProc) -> None:
    proc.process(80, "host", HOST_CGROUP, threads={81: "workload"})
    (occupant,) = _find(proc, threads=True)
    assert occupant == Occupant(80, 81, _tag(HOST_CGROUP))
    assert _there(proc, occupant)
    proc.move(80, 81, "host")
    assert not _there(proc, occupant)


CID = "ab" * 32


@pytest.mark.parametrize(
    ("cgroup", "inside"),
    [
        (f"0::/docker/{CID}\n", True),  # cgroup v2, cgroupfs driver
        (f"0::/system.slice/docker-{CID}.scope\n", True),  # systemd driver
        (f"12:pids:/docker/{CID}\n1:name=systemd:/docker/{CID}\n0::/docker/{CID}\n", True),
        # a container started with --cgroup-parent=/docker/<workload id> is not the workload
        (f"0::/docker/{CID}/{'cd' * 32}\n", False),
        (f"0::/docker/{CID}x\n", False),
        (f"0::/kubepods/{CID[:12]}\n", False),
        ("0::/user.slice/session-1.scope\n", False),
        ("", False),
    ],
)
def test_in_cgroup_of_matches_the_container_s_own_cgroup_only(cgroup: str, inside: bool) -> None:
    assert in_cgroup_of(cgroup, CID) is inside
    assert in_cgroup_of(cgroup, "") is False
