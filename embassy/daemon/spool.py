"""The activation spool: an embassy-owned, size-limited tmpfs on ``DATA/activations``.

Why. The activation directory is the one host directory the workload can write to. As a
plain directory on the data disk it let a workload fill the host's disk with any files
(never cleaned), and a full disk stopped the statement log, the registry, the daemon. A
tmpfs of its own bounds the bytes (``size=``, ``metering.spool_bytes``) and the files
(``nr_inodes=``, ``metering.spool_inodes``), is ``nosuid,nodev,noexec``, and its pages are
charged to the memory cgroup of whoever writes them (the workload). The intake
(``embassy.daemon.intake``) removes every entry it has handled, and anything that is not
an activation file.

Lifetime. The spool outlives the daemon, as the workload does: the workload's container
bind-mounts it, and a restarted daemon must watch the very filesystem the running workload
writes into. So the daemon never unmounts it, not at a crash nor at a clean stop. A
restart finds it by its source name (:data:`SOURCE`) and reuses it, remounting it if its
size, inode count or flags differ from the config. Anything else mounted there is refused
with a precise error: the intake would watch a filesystem the embassy does not own.

Order. It must be mounted before the workload's container is created: Docker resolves a
bind mount's source once, at creation, with private propagation, so a tmpfs mounted later
is never seen inside the container (which would write to the disk underneath).

Namespace. It must be mounted in the mount namespace Docker uses. A daemon sandboxed in a
mount namespace of its own (systemd's ProtectSystem= and friends) cannot do it; there the
spool is mounted beforehand, from the host (a systemd mount unit with ``What=`` :data:`SOURCE`
and the options :func:`mount_options` prints), and this module finds and reuses it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from embassy.config import Metering
from embassy.errors import StorageError

_LOG = logging.getLogger(__name__)
SOURCE = "embassy-activations"  # the mount's source field: how a restart knows it is ours
MODE = 0o770
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 2, 4, 8, 32
MNT_DETACH = 2
FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
_FLAG_NAMES = frozenset({"nosuid", "nodev", "noexec"})
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo (the fields the spool needs)."""

    mount_point: str
    flags: frozenset[str]  # per-mount options (nosuid, nodev, ...)
    fstype: str
    source: str
    options: dict[str, str]  # superblock options (size=1024k, nr_inodes=..., ...)


def _unescape(field: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \040, \011, \012, \134."""
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, rest = head.split(), tail.split()
        if not sep or len(fields) < 6 or len(rest) < 3:
            continue
        options = dict(o.partition("=")[::2] for o in rest[2].split(","))
        entries.append(
            MountEntry(
                _unescape(fields[4]),
                frozenset(fields[5].split(",")),
                rest[0],
                _unescape(rest[1]),
                options,
            )
        )
    return entries


def mounted_at(path: Path, mountinfo: Path = MOUNTINFO) -> MountEntry | None:
    """What is mounted on ``path`` now (the top of the stack), or None."""
    target = os.path.realpath(path)
    found = [e for e in parse_mountinfo(mountinfo.read_text()) if e.mount_point == target]
    return found[-1] if found else None


def mount_options(limits: Metering) -> str:
    return (
        f"size={limits.spool_bytes},nr_inodes={limits.spool_inodes},"
        f"mode={MODE:o},uid=0,gid={limits.spool_gid}"
    )


def mount_tmpfs(source: str, target: Path, flags: int, data: str) -> None:
    """mount(2) a tmpfs named ``source`` on ``target``; ``OSError`` if the kernel refuses."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    if libc.mount(source.encode(), os.fsencode(target), b"tmpfs", flags, data.encode()) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def detach(target: Path) -> bool:
    """umount2(MNT_DETACH) ``target``; whether the kernel did."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return bool(libc.umount2(os.fsencode(target), MNT_DETACH) == 0)


def _mount(target: Path, flags: int, data: str) -> None:
    mount_tmpfs(SOURCE, target, flags, data)


def _matches(entry: MountEntry, limits: Metering) -> bool:
    page = os.sysconf("SC_PAGE_SIZE")
    size_kib = -(-limits.spool_bytes // page) * page // 1024
    return (
        entry.flags >= _FLAG_NAMES
        and entry.options.get("size") == f"{size_kib}k"
        and entry.options.get("nr_inodes") == str(limits.spool_inodes)
    )


def _own_root(path: Path, limits: Metering) -> None:
    """Mode 0770, owner root, the configured group, on the spool's root directory.

    A remount does not change them, so they are set on the directory itself, and only if
    they differ: a sandboxed daemon without CAP_CHOWN reuses a spool mounted right for it.
    """
    st = os.stat(path)
    try:
        if (st.st_uid, st.st_gid) != (0, limits.spool_gid):
            os.chown(path, 0, limits.spool_gid)
        if stat.S_IMODE(st.st_mode) != MODE:
            os.chmod(path, MODE)
    except OSError as exc:
        raise StorageError(
            f"activation spool: cannot make {path} mode {MODE:o}, owner 0, group "
            f"{limits.spool_gid}: {exc.strerror}"
        ) from None


def _clear_plain_dir(path: Path) -> int:
    """Remove what an older embassy (a plain directory) left on the disk underneath."""
    count = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            count += 1
    return count


def ensure_spool(path: Path, limits: Metering, mountinfo: Path = MOUNTINFO) -> str:
    """Mount the spool on ``path`` or reuse ours; return ``"mounted"`` or ``"reused"``.

    Raises :class:`StorageError` for a path that is not a directory, something else mounted
    there, or a mount the kernel refuses (not root, or a sandboxed mount namespace).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        path.mkdir(mode=0o700)
        st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"activation spool: {path} exists and is not a directory")
    found = mounted_at(path, mountinfo)
    if found is not None and (found.fstype, found.source) != ("tmpfs", SOURCE):
        raise StorageError(
            f"activation spool: {path} is already a mount point ({found.fstype} from "
            f"{found.source!r}), not the embassy's tmpfs ({SOURCE!r}); unmount it first"
        )
    if found is not None:
        if not _matches(found, limits):
            try:
                _mount(path, MS_REMOUNT | FLAGS, mount_options(limits))
            except OSError as exc:  # e.g. shrinking below what it holds: keep its bound
                _LOG.warning(
                    "activation spool: cannot resize %s to the config (%s); keeping it",
                    path,
                    exc.strerror,
                )
        _own_root(path, limits)
        _LOG.info("activation spool: reusing the tmpfs on %s", path)
        return "reused"
    cleared = _clear_plain_dir(path)
    if cleared:
        _LOG.warning("activation spool: removed %d entries from the disk under %s", cleared, path)
    try:
        _mount(path, FLAGS, mount_options(limits))
    except OSError as exc:
        hint = (
            " (the daemon must run as root in the host's mount namespace, or the spool be "
            f"mounted beforehand: tmpfs {SOURCE} -o nosuid,nodev,noexec,{mount_options(limits)})"
        )
        raise StorageError(
            f"activation spool: cannot mount a tmpfs on {path}: {exc.strerror}"
            + (hint if exc.errno in (errno.EPERM, errno.EACCES) else "")
        ) from None
    found = mounted_at(path, mountinfo)
    if found is None or found.source != SOURCE:
        raise StorageError(f"activation spool: the tmpfs on {path} is not visible after mount")
    _own_root(path, limits)
    _LOG.info(
        "activation spool: mounted a tmpfs on %s (%d bytes, %d files)",
        path,
        limits.spool_bytes,
        limits.spool_inodes,
    )
    return "mounted"


def unmount_spool(path: Path) -> bool:
    """Tests and operators only (the daemon never calls it): detach our tmpfs from ``path``.

    A container that bind-mounted it keeps its own reference until it is removed.
    """
    found = mounted_at(path)
    if found is None or found.source != SOURCE:
        return False
    with contextlib.suppress(OSError):
        if not detach(path):
            return False
    return True
