"""workload_sdk.spool: the whole ciphertext on local disk before the seal, nothing left behind.

Every path is checked for leftovers twice: the spool directory is empty and this process
holds no more descriptors than before. Both the O_TMPFILE path and the named fallback run.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import stat
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from workload_sdk import spool as spool_module
from workload_sdk.spool import SpoolError, spool_input
from workload_sdk.stream import decrypt_stream, encrypt_bytes

KEY = bytes(range(32))
PAYLOAD_ID = bytes(range(16))


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(params=["o_tmpfile", "named"])
def spool_dir(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A spool directory, under each way of creating the file; checked clean afterwards."""
    if request.param == "named":
        monkeypatch.setattr(spool_module, "_USE_O_TMPFILE", False)
    directory = tmp_path / "spool"
    directory.mkdir()
    before = _fds()
    yield directory
    assert list(directory.iterdir()) == []
    assert _fds() <= before, "a descriptor leaked"


class Reader:
    """``total`` bytes from a generator of 64 KiB blocks, handed out as ``read(n)`` asks.

    At most one block is held at a time. ``fail_at``: raise ``error`` once that many bytes
    have been handed out. ``on_read`` runs before each read (to look at the spool directory
    while spooling is under way).
    """

    def __init__(
        self,
        total: int,
        *,
        fail_at: int | None = None,
        error: BaseException | None = None,
        on_read: Callable[[], None] | None = None,
    ) -> None:
        self.total, self.given, self.reads = total, 0, 0
        self.fail_at, self.error, self.on_read = fail_at, error, on_read
        self._blocks = self._generate()
        self._pending = memoryview(b"")

    def _generate(self) -> Iterator[bytes]:
        block = 64 * 1024
        for start in range(0, self.total, block):
            # Each block starts with its offset: a misplaced or repeated block would show.
            yield start.to_bytes(8, "big") + bytes(min(block, self.total - start) - 8)

    def read(self, n: int, /) -> bytes:
        self.reads += 1
        if self.on_read is not None:
            self.on_read()
        if self.fail_at is not None and self.given >= self.fail_at:
            assert self.error is not None
            raise self.error
        if not self._pending:
            self._pending = memoryview(next(self._blocks, b""))
        out, self._pending = bytes(self._pending[:n]), self._pending[n:]
        self.given += len(out)
        return out


def test_exactly_length_bytes_are_spooled_and_the_rest_is_left(spool_dir: Path) -> None:
    src = io.BytesIO(b"0123456789next request")
    with spool_input(src, 10, max_bytes=100, directory=spool_dir) as spooled:
        assert spooled.tell() == 0
        assert spooled.read() == b"0123456789"
    assert src.read() == b"next request"


def test_an_empty_input_spools_to_an_empty_file(spool_dir: Path) -> None:
    with spool_input(io.BytesIO(b"more"), 0, max_bytes=0, directory=spool_dir) as spooled:
        assert spooled.read() == b""


def test_the_spooled_stream_decrypts(spool_dir: Path) -> None:
    plaintext = os.urandom(300_000)  # several chunks
    ciphertext = encrypt_bytes(KEY, PAYLOAD_ID, plaintext, chunk_size=65536)
    src = io.BytesIO(ciphertext)
    with spool_input(src, len(ciphertext), max_bytes=1 << 20, directory=spool_dir) as spooled:
        # The spool holds the ciphertext exactly as received: no plaintext is written.
        assert spooled.read() == ciphertext
        spooled.seek(0)
        got = b"".join(decrypt_stream(KEY, spooled, expected_payload_id=PAYLOAD_ID))
    assert got == plaintext


def test_a_short_input_is_a_precise_error_and_leaves_nothing(spool_dir: Path) -> None:
    with pytest.raises(SpoolError) as caught:
        spool_input(io.BytesIO(b"x" * 999), 1000, max_bytes=10_000, directory=spool_dir)
    assert caught.value.reason == "short-input"
    assert caught.value.received == 999
    assert str(caught.value) == "the input ended after 999 of its 1000 bytes"


def test_a_short_input_over_many_chunks(spool_dir: Path) -> None:
    src = Reader(5 * 4096 + 7)
    with pytest.raises(SpoolError, match="ended after 20487 of its 20488 bytes"):
        spool_input(src, 20488, max_bytes=1 << 20, directory=spool_dir, chunk_size=4096)


def test_a_known_length_over_the_cap_is_refused_before_reading(spool_dir: Path) -> None:
    src = Reader(10, fail_at=0, error=AssertionError("read before the cap was checked"))
    with pytest.raises(SpoolError) as caught:
        spool_input(src, 11, max_bytes=10, directory=spool_dir)
    assert caught.value.reason == "too-large"
    assert str(caught.value) == "the input is 11 bytes, over the cap of 10"
    assert src.reads == 0


def test_the_cap_itself_is_allowed(spool_dir: Path) -> None:
    with spool_input(io.BytesIO(b"abc"), 3, max_bytes=3, directory=spool_dir) as spooled:
        assert spooled.read() == b"abc"


def test_an_unknown_length_reads_to_the_end_within_the_cap(spool_dir: Path) -> None:
    with spool_input(Reader(10_000), None, max_bytes=10_000, directory=spool_dir) as spooled:
        assert len(spooled.read()) == 10_000


def test_an_unknown_length_over_the_cap_stops_one_byte_past_it(spool_dir: Path) -> None:
    src = Reader(1 << 20)
    with pytest.raises(SpoolError) as caught:
        spool_input(src, None, max_bytes=5000, directory=spool_dir, chunk_size=1024)
    assert caught.value.reason == "too-large"
    assert caught.value.received == src.given == 5001


@pytest.mark.parametrize(
    "error", [ConnectionError("peer went away"), TimeoutError("timed out"), KeyboardInterrupt()]
)
def test_a_failing_source_propagates_and_leaves_nothing(
    spool_dir: Path, error: BaseException
) -> None:
    src = Reader(1 << 20, fail_at=3 * 1024, error=error)
    with pytest.raises(type(error)):
        spool_input(src, 1 << 20, max_bytes=1 << 20, directory=spool_dir, chunk_size=1024)


def test_a_full_disk_is_no_space(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    calls = 0

    def write(fd: int, data: bytes | memoryview) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SpoolError) as caught:
        spool_input(Reader(10_000), 10_000, max_bytes=10_000, directory=spool_dir, chunk_size=1000)
    assert caught.value.reason == "no-space"
    assert caught.value.received == 2000
    assert "No space left on device" in caught.value.message


def test_short_writes_are_completed(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))
    data = os.urandom(5000)
    with spool_input(io.BytesIO(data), 5000, max_bytes=5000, directory=spool_dir) as spooled:
        assert spooled.read() == data


def test_the_file_is_owner_only_nameless_and_read_only(spool_dir: Path) -> None:
    seen: list[list[str]] = []
    src = Reader(4096, on_read=lambda: seen.append(os.listdir(spool_dir)))
    with spool_input(src, 4096, max_bytes=4096, directory=spool_dir, chunk_size=1024) as spooled:
        info = os.fstat(spooled.fileno())
        assert stat.S_ISREG(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert info.st_nlink == 0  # no name anywhere: nothing to find, nothing to leave
        assert info.st_uid == os.geteuid()
        # Which way it was made: O_TMPFILE shows as "#<inode>", the fallback by its old name.
        where = os.readlink(f"/proc/self/fd/{spooled.fileno()}")
        made = "/#" if spool_module._USE_O_TMPFILE else "/.embassy-spool-"
        assert made in where, where
        with pytest.raises(io.UnsupportedOperation):
            spooled.write(b"x")
    # Not even while the bytes were arriving did the file have a name.
    assert seen == [[]] * 4


def test_the_mode_ignores_a_permissive_umask(spool_dir: Path) -> None:
    old = os.umask(0)
    try:
        with spool_input(io.BytesIO(b"x"), 1, max_bytes=1, directory=spool_dir) as spooled:
            assert stat.S_IMODE(os.fstat(spooled.fileno()).st_mode) == 0o600
    finally:
        os.umask(old)


def test_a_filesystem_without_o_tmpfile_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_open = os.open

    def no_tmpfile(path: str, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", no_tmpfile)
    with spool_input(io.BytesIO(b"abc"), 3, max_bytes=3, directory=tmp_path) as spooled:
        assert os.fstat(spooled.fileno()).st_nlink == 0
        assert spooled.read() == b"abc"
    assert list(tmp_path.iterdir()) == []


def test_the_named_fallback_never_follows_or_reuses_a_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spool_module, "_USE_O_TMPFILE", False)
    # Every name it could pick already exists as a symlink to a file it must not touch.
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    taken, free = ".embassy-spool-" + "01" * 8, ".embassy-spool-" + "02" * 8
    names = iter([taken[-16:], free[-16:]])
    monkeypatch.setattr(secrets, "token_hex", lambda n: next(names))
    (tmp_path / taken).symlink_to(target)
    with spool_input(io.BytesIO(b"abc"), 3, max_bytes=3, directory=tmp_path) as spooled:
        assert spooled.read() == b"abc"
    assert target.read_bytes() == b"keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == [taken, "target"]


def test_a_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(SpoolError) as caught:
        spool_input(io.BytesIO(b"x"), 1, max_bytes=1, directory=tmp_path / "nope")
    assert caught.value.reason == "storage"
    assert f"cannot open the spool directory {tmp_path / 'nope'}" in caught.value.message


def test_the_default_directory_is_tmpdir(spool_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(spool_dir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # forget the cached choice
    with spool_input(io.BytesIO(b"abc"), 3, max_bytes=3) as spooled:
        # The kernel names an unlinked file by where it was: "<dir>/<name> (deleted)".
        where = os.readlink(f"/proc/self/fd/{spooled.fileno()}")
    assert where.startswith(f"{spool_dir}/"), where
    assert where.endswith(" (deleted)"), where


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"length": -1}, ValueError, "length must be non-negative"),
        ({"length": True}, TypeError, "length must be an int or None"),
        ({"length": 1.0}, TypeError, "length must be an int or None"),
        ({"max_bytes": -1}, ValueError, "max_bytes must be a non-negative int"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
    ],
)
def test_bad_arguments(
    spool_dir: Path, kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    args: dict[str, object] = {"length": 1, "max_bytes": 1, "chunk_size": 1024, **kwargs}
    with pytest.raises(error, match=match):
        spool_input(io.BytesIO(b"x"), directory=spool_dir, **args)  # type: ignore[arg-type]


def test_a_non_blocking_source_with_nothing_ready_is_an_error(spool_dir: Path) -> None:
    class Empty:
        def read(self, n: int, /) -> bytes | None:
            return None

    with pytest.raises(OSError, match="non-blocking"):
        spool_input(Empty(), 10, max_bytes=10, directory=spool_dir)


def test_a_source_that_returns_more_than_asked_is_refused(spool_dir: Path) -> None:
    class Greedy:
        def read(self, n: int, /) -> bytes:
            return b"x" * (n + 1)

    with pytest.raises(ValueError, match="returned 11 bytes when asked for 10"):
        spool_input(Greedy(), 10, max_bytes=10, directory=spool_dir)


def test_memory_is_o_chunk_whatever_the_size(spool_dir: Path) -> None:
    """256 MiB through a 64 KiB chunk: Python's allocations stay within a few chunks.

    The bound counts the reader's own (a block, its slice, the concatenation that made it)
    as well as the spool's (one chunk in flight): a fixed multiple of the chunk, against an
    input 4096 chunks long.
    """
    total, chunk = 256 * 1024 * 1024, 64 * 1024
    src = Reader(total)
    tracemalloc.start()
    try:
        with spool_input(
            src, total, max_bytes=total, directory=spool_dir, chunk_size=chunk
        ) as spooled:
            _, peak = tracemalloc.get_traced_memory()
            size = os.fstat(spooled.fileno()).st_size
    finally:
        tracemalloc.stop()
    assert size == total == src.given
    assert src.reads == total // chunk
    assert peak < 8 * chunk, f"peak {peak} bytes for a {chunk}-byte chunk"
