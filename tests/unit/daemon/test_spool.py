"""The activation spool: the embassy's own tmpfs, reused on restart, bounded, never the disk.

Needs root (mount(2)); skipped otherwise. Each test detaches what it mounted.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embassy.config import Metering
from embassy.daemon.intake import ActivationIntake
from embassy.daemon.runtime import Embassy
from embassy.daemon.spool import (
    SOURCE,
    ensure_spool,
    mounted_at,
    parse_mountinfo,
    unmount_spool,
)
from embassy.errors import StorageError
from tests.fakes import FakeTpm
from tests.unit.conftest import EmbassyFactory
from tests.unit.daemon.test_metering import statements
from workload_sdk.activations import ActivationWriter, file_name

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
MIB = 1 << 20


def limits(size: int = 4 * MIB, inodes: int = 256, gid: int = 0) -> Metering:
    return Metering(
        max_activation_bytes=64 * 1024, spool_bytes=size, spool_inodes=inodes, spool_gid=gid
    )


def _fill_with_files(where: Path, count: int) -> None:
    for i in range(count):
        (where / f"f{i}").write_bytes(b"")


def _fill_with_one_file(path: Path) -> None:
    with path.open("wb") as f:
        while True:
            f.write(bytes(MIB))


@pytest.fixture
def where(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "activations"
    yield path
    while mounted_at(path) is not None:  # ours, or the one a test put in the way
        subprocess.run(["umount", "-l", str(path)], check=True, timeout=10)


def test_mounted_then_reused_and_resized_on_restart(where: Path) -> None:
    assert ensure_spool(where, limits(gid=1234)) == "mounted"
    found = mounted_at(where)
    assert found is not None
    assert (found.fstype, found.source) == ("tmpfs", SOURCE)
    assert {"nosuid", "nodev", "noexec"} <= found.flags
    assert (found.options["size"], found.options["nr_inodes"]) == ("4096k", "256")
    st = os.stat(where)
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o770", 0, 1234)
    (where / "kept").write_bytes(b"a workload's file")
    # A restart: the same filesystem (the running workload writes into it), resized.
    assert ensure_spool(where, limits(size=8 * MIB, inodes=512)) == "reused"
    assert (where / "kept").read_bytes() == b"a workload's file"
    found = mounted_at(where)
    assert found is not None
    assert (found.options["size"], found.options["nr_inodes"]) == ("8192k", "512")
    assert os.stat(where).st_gid == 0
    assert len([e for e in parse_mountinfo(Path("/proc/self/mountinfo").read_text())
                if e.mount_point == str(where)]) == 1  # reused, not stacked  # fmt: skip


def test_something_else_mounted_there_is_refused(where: Path) -> None:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "someone-else", str(where)],
        check=True,
        timeout=10,
    )
    with pytest.raises(StorageError, match=r"already a mount point \(tmpfs from 'someone-else'\)"):
        ensure_spool(where, limits())


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_path_that_is_not_a_directory_is_refused(where: Path, tmp_path: Path, kind: str) -> None:
    if kind == "file":
        where.write_bytes(b"")
    else:
        (tmp_path / "elsewhere").mkdir()
        where.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(StorageError, match="exists and is not a directory"):
        ensure_spool(where, limits())
    assert mounted_at(tmp_path / "elsewhere") is None


def test_what_a_plain_directory_held_is_cleared_before_mounting(where: Path) -> None:
    where.mkdir()
    (where / "old.act").write_bytes(b"x" * 1000)
    (where / "dir").mkdir()
    (where / "dir" / "f").write_bytes(b"y")
    ensure_spool(where, limits())
    assert unmount_spool(where)
    assert list(where.iterdir()) == []  # the disk underneath is empty too


def test_the_spool_bounds_bytes_and_files(where: Path) -> None:
    ensure_spool(where, limits(size=1 * MIB, inodes=64))
    with pytest.raises(OSError) as full:
        (where / "big").write_bytes(bytes(2 * MIB))
    assert full.value.errno == errno.ENOSPC
    (where / "big").unlink()
    with pytest.raises(OSError) as inodes:
        _fill_with_files(where, 100)
    assert inodes.value.errno == errno.ENOSPC


def test_a_flood_neither_fills_the_disk_nor_stalls_a_close(
    where: Path, make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    """20,000 junk files and one as large as the spool: no byte lands on the disk, the
    close drains them within its timeout, and a bounded number of statements says so."""
    embassy: Embassy = make_embassy(tpm)
    # tmpfs counts whole pages: 20,000 small files take 80 MiB of it.
    ensure_spool(where, limits(size=128 * MIB, inodes=25_000))
    session = os.urandom(16)
    embassy.metering.begin(session)
    ActivationWriter(where, session).write("layer.6", np.ones((2, 8), np.float32))
    for i in range(20_000):
        name = f"junk-{i}" if i % 4 else file_name(session, 100 + i)
        (where / name).write_bytes(b"j" * 16)
    with pytest.raises(OSError) as full:
        _fill_with_one_file(where / "huge")
    assert full.value.errno == errno.ENOSPC
    # Every byte is on the spool (a device of its own, full), none on the disk.
    assert os.stat(where / "huge").st_dev != os.stat(tmp_path).st_dev
    assert os.statvfs(where).f_bavail < 64

    intake = ActivationIntake.for_metering(where, embassy.metering, drain_timeout=20)
    started = time.monotonic()
    intake.start()  # a restart's first drain: everything present
    first_drain = time.monotonic() - started
    try:
        summary = embassy.metering.finish(session, intake.drain)
    finally:
        intake.stop()
    assert first_drain < 20
    assert summary is not None
    assert (summary["files"], summary["files_left"]) == (1, 0)
    assert summary["rejected"] == 5000  # the SDK-named junk: not an activation
    assert summary["unattributed"] == 15_001  # the other names, and the huge one
    assert list(where.iterdir()) == []
    rejected = statements(embassy, "activation-rejected")
    assert 2 <= len(rejected) <= 4  # the session's and no-session's, not 20,001
    print(f"\n20,001 junk entries (the last filling the spool) drained in {first_drain:.2f} s")


_WRITER = """
import sys
import numpy as np
from workload_sdk.activations import ActivationWriter
try:
    ActivationWriter(__import__("pathlib").Path(sys.argv[1]), bytes(16)).write(
        "layer.6", np.ones((256, 1024), np.float32)
    )
except OSError as exc:
    sys.exit(exc.errno)
"""


def test_a_writer_on_a_full_spool_gets_enospc_not_sigbus(where: Path) -> None:
    ensure_spool(where, limits(size=1 * MIB))
    (where / "filler").write_bytes(bytes(1 * MIB - 64 * 1024))
    root = Path(__file__).resolve().parents[3]
    done = subprocess.run(
        [sys.executable, "-c", _WRITER, str(where)], cwd=root, timeout=60, check=False
    )
    assert done.returncode == errno.ENOSPC  # not -SIGBUS: the writer allocates first


def test_a_spool_mounted_right_is_reused_without_chown(
    where: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sandboxed daemon (no CAP_CHOWN, its mounts not the host's) reuses a spool a mount
    unit made; it changes nothing it need not, and says so precisely if it must."""
    ensure_spool(where, limits(gid=77))

    def refused(*args: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "chown", refused)
    assert ensure_spool(where, limits(gid=77)) == "reused"
    with pytest.raises(StorageError, match=r"cannot make .* group 78: Operation not permitted"):
        ensure_spool(where, limits(gid=78))


def test_the_spool_command_mounts_then_reuses_with_the_daemons_config(
    where: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`embassy spool` (run before a sandboxed daemon) mounts what the daemon would."""
    from embassy.cli import main

    config = where.parent / "config.yaml"
    config.write_text(
        f"data_dir: {where.parent}\nsocket: {where.parent / 'run' / 's.sock'}\n"
        "metering:\n  spool_bytes: 8388608\n  max_activation_bytes: 4194304\n  spool_gid: 4321\n"
    )
    assert main(["spool", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "mounted"
    assert main(["spool", "--config", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "reused"
    assert where.stat().st_gid == 4321
