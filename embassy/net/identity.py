"""A network namespace's identity, with nothing else: the pure side of the seal compares it
(the session manager, the seal proof) without importing the kernel adapters."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class NetnsId:
    """A network namespace's identity: the device and inode of its nsfs file.

    Unique only while the namespace lives: the kernel reuses a freed inode number at once
    (a restarted container often gets its predecessor's). The embassy holds an fd on the
    namespace it wired (:attr:`WorkloadLink.netns_fd`), so the one it compares against
    cannot be freed and its number cannot be reused meanwhile.
    """

    dev: int
    ino: int

    @classmethod
    def of_fd(cls, fd: int) -> NetnsId:
        st = os.fstat(fd)
        return cls(st.st_dev, st.st_ino)

    @classmethod
    def of_pid(cls, pid: int) -> NetnsId:
        """The namespace of process ``pid`` (OSError when it is gone)."""
        st = os.stat(f"/proc/{pid}/ns/net")
        return cls(st.st_dev, st.st_ino)

    def __str__(self) -> str:
        return f"net:[{self.ino}]"
