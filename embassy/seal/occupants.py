"""Who is in a workload's network namespace besides the workload (read from /proc).

Sealed means nothing but the workload is in its namespace: a process or container that
joins it (``--network container:<workload>``, ``nsenter``, a thread that ``setns()``-ed in)
shares its loopback and could relay for it through channels of its own. A task belongs to
the workload when its cgroup is the workload container's (``docker exec`` processes are
in it too: they are the workload, with its limits and capabilities).

Reading is cheap (about 2 µs a task here), so the monitor scans processes often and, less
often, every thread. A task is an intruder only if it is still there at the next look:
``docker exec`` starts its process in the namespace a moment before runc moves it into the
container's cgroup. A task that vanishes while being read is simply not counted; one whose
namespace cannot be read (``EACCES``: a process the kernel hides even from root, such as a
sandbox's init) cannot be in a container's namespace and is skipped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embassy.net.identity import NetnsId


@dataclass(frozen=True, slots=True)
class Occupant:
    pid: int
    tid: int  # == pid for a process's main thread
    cgroup_sha: str  # a short tag of its cgroup line, never the text (names may be chosen)


def _netns(path: str) -> NetnsId | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return NetnsId(st.st_dev, st.st_ino)


def _cgroup(pid: int, proc: Path) -> str | None:
    try:
        return (proc / str(pid) / "cgroup").read_text(errors="replace")
    except OSError:
        return None


def _tasks(proc: Path, threads: bool) -> Iterator[tuple[int, int, str]]:
    """(pid, tid, path of the task's netns link) for every task to look at."""
    try:
        entries = [e for e in os.scandir(proc) if e.name.isascii() and e.name.isdigit()]
    except OSError:
        return
    for entry in entries:
        pid = int(entry.name)
        if not threads:
            yield pid, pid, f"{entry.path}/ns/net"
            continue
        try:
            tids = [t.name for t in os.scandir(f"{entry.path}/task") if t.name.isdigit()]
        except OSError:
            continue
        for tid in tids:
            yield pid, int(tid), f"{entry.path}/task/{tid}/ns/net"


def in_cgroup_of(cgroup: str, container_id: str) -> bool:
    """Whether the /proc/PID/cgroup text ``cgroup`` puts the task in the container's own
    cgroup: the last path component is the id (cgroupfs: ``/docker/<id>``) or its systemd
    scope (``docker-<id>.scope``), in some hierarchy line. A cgroup merely *under* one
    named after the container (``--cgroup-parent=/docker/<id>``) is not the container's."""
    if not container_id:
        return False
    names = {container_id, f"docker-{container_id}.scope"}
    for line in cgroup.splitlines():
        path = line.split(":", 2)[-1]
        if path.rstrip("/").rsplit("/", 1)[-1] in names:
            return True
    return False


def in_container(pid: int, container_id: str, proc: Path = Path("/proc")) -> bool:
    """Whether process ``pid`` is in the container ``container_id``'s cgroup (its own
    processes and ``docker exec``'d ones). False when it is gone."""
    cgroup = _cgroup(pid, proc)
    return cgroup is not None and in_cgroup_of(cgroup, container_id)


def still_there(
    occupant: Occupant, netns: NetnsId, container_id: str, proc: Path = Path("/proc")
) -> bool:
    """Whether ``occupant`` is still a task in ``netns`` outside the container's cgroup."""
    path = f"{proc}/{occupant.pid}/task/{occupant.tid}/ns/net"
    if _netns(path) != netns:
        return False
    cgroup = _cgroup(occupant.pid, proc)
    return cgroup is not None and not in_cgroup_of(cgroup, container_id)


def find_occupants(
    netns: NetnsId,
    container_id: str,
    *,
    threads: bool = False,
    proc: Path = Path("/proc"),
    own_pid: int | None = None,
) -> list[Occupant]:
    """Tasks in ``netns`` that are not in the container ``container_id``'s cgroup.

    ``own_pid`` (default: this process) is skipped: the embassy's netns worker thread
    enters workload namespaces to change their rules.
    """
    own = os.getpid() if own_pid is None else own_pid
    found: list[Occupant] = []
    for pid, tid, path in _tasks(proc, threads):
        if pid == own or _netns(path) != netns:
            continue
        cgroup = _cgroup(pid, proc)
        if cgroup is None:
            continue  # gone meanwhile
        if in_cgroup_of(cgroup, container_id):
            continue
        tag = hashlib.sha256(cgroup.encode()).hexdigest()[:12]
        found.append(Occupant(pid, tid, tag))
    return found
