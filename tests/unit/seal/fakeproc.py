"""A fake /proc tree for the occupant scan: no symlinks, no root, no real namespaces.

``find_occupants`` and ``still_there`` identify a namespace by ``os.stat`` of a task's
``ns/net``: here every namespace is a regular file and every task's ``ns/net`` is a hard
link to it, so tasks of one namespace share its (st_dev, st_ino) as they would in /proc.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from embassy.net.identity import NetnsId


class FakeProc:
    def __init__(self, base: Path) -> None:
        self.root = base / "proc"
        self._namespaces = base / "namespaces"
        self.root.mkdir()
        self._namespaces.mkdir()

    def netns(self, name: str) -> NetnsId:
        """A namespace (made on first use), as ``NetnsId`` would identify it."""
        path = self._namespaces / name
        path.touch()
        st = os.stat(path)
        return NetnsId(st.st_dev, st.st_ino)

    def _ns_file(self, name: str) -> Path:
        self.netns(name)
        return self._namespaces / name

    def process(
        self, pid: int, netns: str, cgroup: str, threads: dict[int, str] | None = None
    ) -> None:
        """Process ``pid`` (its main thread in ``netns``) and its other threads' namespaces."""
        home = self.root / str(pid)
        (home / "ns").mkdir(parents=True)
        os.link(self._ns_file(netns), home / "ns" / "net")
        (home / "cgroup").write_text(cgroup)
        for tid, name in {pid: netns, **(threads or {})}.items():
            (home / "task" / str(tid) / "ns").mkdir(parents=True)
            os.link(self._ns_file(name), home / "task" / str(tid) / "ns" / "net")

    def move(self, pid: int, tid: int, netns: str) -> None:
        """Task ``tid`` of ``pid`` setns()-es into ``netns``."""
        paths = [self.root / str(pid) / "task" / str(tid) / "ns" / "net"]
        if tid == pid:
            paths.append(self.root / str(pid) / "ns" / "net")
        for path in paths:
            path.unlink()
            os.link(self._ns_file(netns), path)

    def set_cgroup(self, pid: int, cgroup: str) -> None:
        (self.root / str(pid) / "cgroup").write_text(cgroup)

    def exit(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))
