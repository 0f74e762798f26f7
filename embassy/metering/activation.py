"""The embassy's strict reader of activation files (format v1, ``workload_sdk.activations``).

The format is defined once, in the SDK the workload writes with; this module imports its
constants and checks every byte of a file against them::

    0    magic "\\x89EMBACT\\n" | 8 version=1 | 10 dtype 1/2/3 | 11 ndim 1..4 | 12 name_len 1..128
    14   reserved=0 | 16 header_len = roundup64(112 + name_len) | 20 reserved=0
    24   session (16) | 40 seq u64 | 48 shape 4 x u64 (ndim dims >= 1, the rest 0)
    80   checksum = SHA-256(header with checksum zeroed || data)
    112  name [A-Za-z0-9_.:/-] | zero padding to header_len | data (C order) | end of file

The files come from the untrusted workload, the reader is root. :func:`parse_activation` is
pure and raises only :class:`~embassy.errors.ActivationError` subclasses, whatever the
bytes: ``ActivationTruncatedError`` (shorter than its header says),
``ActivationOversizedError`` (over ``max_bytes``, or a header claiming more: decided from
the header alone, before anything is allocated), ``ActivationCorruptError`` (everything
else, including a checksum mismatch and NaN or infinite values). Checks run in file order,
so a file has exactly one verdict, and the message names the field and both values.

:func:`read_activation_file` opens the file without following a link or blocking, and
refuses anything but a regular file with one link before opening it for reading; it then
decides what it can from the size (fstat) and the fixed header alone (one 112-byte pread),
with the same checks and verdicts as :func:`parse_activation`, before reading the rest.

Messages name fields and numbers, never the file's name, and are for tests and debugging:
what the embassy emits about a rejected file is its code (``ActivationError.code``), its
length and, in debug logs, a hash of its name (the workload chooses all of these bytes).

:func:`parse_file_name` reads the name the SDK gives a finished file
(``<session hex>-<seq:012d>.act``); :data:`TEMP_NAME` matches its writer's temporary name.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.errors import (
    ActivationCorruptError,
    ActivationForeignError,
    ActivationOversizedError,
    ActivationTruncatedError,
)
from workload_sdk.activations import (
    CHECKSUM_LEN,
    CHECKSUM_OFFSET,
    DTYPES,
    FIXED_HEADER_LEN,
    HEADER,
    MAGIC,
    MAX_NAME_LEN,
    MAX_NDIM,
    MAX_SEQ,
    NAME,
    SESSION_LEN,
    VERSION,
    file_name,
    header_len_for,
    pack_header,
)

# NaN/inf are checked this many elements at a time: the boolean scratch array stays small
# (1 MiB) whatever the tensor's size.
_FINITE_BLOCK = 1 << 20
_ZERO_CHECKSUM = bytes(CHECKSUM_LEN)
# The SDK's names (workload_sdk.activations.file_name and ActivationWriter's temporary).
# ASCII classes only: str patterns' \d would match other scripts' digits.
FINAL_NAME = re.compile(r"([0-9a-f]{32})-([0-9]{12,20})\.act")
TEMP_NAME = re.compile(r"\.[0-9a-f]{32}-[0-9]{1,20}\.tmp")


def parse_file_name(name: str) -> tuple[bytes, int] | None:
    """(session, seq) of a finished activation file's name, or None if the SDK would not
    name a file so (exactly: no other digits, case or padding)."""
    match = FINAL_NAME.fullmatch(name)
    if match is None:
        return None
    session, seq = bytes.fromhex(match[1]), int(match[2])
    if len(session) != SESSION_LEN or seq > MAX_SEQ or file_name(session, seq) != name:
        return None
    return session, seq


@dataclass(frozen=True)
class Activation:
    """One parsed activation file.

    ``sha256`` is the file's checksum field, which covers every byte of the file: equal
    checksums mean equal files, so ``data`` (a read-only view, not a copy) is left out of
    comparisons and repr.
    """

    session: bytes
    seq: int
    tensor: str
    dtype: str
    shape: tuple[int, ...]
    sha256: bytes
    data: npt.NDArray[np.floating[Any]] = field(compare=False, repr=False)


def _corrupt(message: str) -> ActivationCorruptError:
    return ActivationCorruptError(f"activation: {message}")


@dataclass(frozen=True)
class _Fixed:
    """The fixed header's fields, each already checked on its own."""

    dtype: str
    name_len: int
    header_len: int
    session: bytes
    seq: int
    shape: tuple[int, ...]
    checksum: bytes


def parse_activation(data: bytes | bytearray, *, max_bytes: int) -> Activation:
    """Strictly parse one activation file's bytes (no more than ``max_bytes`` of them).

    The returned array is a read-only view of ``data``, not a copy: do not change a
    ``bytearray`` after handing it over.
    """
    buf = memoryview(data).toreadonly()
    fixed, data_len = _check_layout(buf, len(buf), max_bytes)
    name = _parse_name(buf, fixed)
    _check_checksum(buf, fixed)
    _check_canonical(buf, fixed, name)
    # A read-only buffer makes a read-only array, and one that cannot be made writable.
    array: npt.NDArray[np.floating[Any]] = np.frombuffer(
        buf,
        dtype=fixed.dtype,
        count=data_len // np.dtype(fixed.dtype).itemsize,
        offset=fixed.header_len,
    ).reshape(fixed.shape)
    _check_finite(array)
    return Activation(
        session=fixed.session,
        seq=fixed.seq,
        tensor=name,
        dtype=fixed.dtype,
        shape=fixed.shape,
        sha256=fixed.checksum,
        data=array,
    )


def _check_layout(head: memoryview, size: int, max_bytes: int) -> tuple[_Fixed, int]:
    """The checks decided by a file's ``size`` and its first 112 bytes (``head``) alone:
    the limit, the magic, the fixed header and the size it implies."""
    if size > max_bytes:
        raise ActivationOversizedError(
            f"activation: file of {size} bytes is over the limit of {max_bytes}"
        )
    # The magic first, on what there is: a file that is not an activation file at all says
    # so, even when it is short.
    magic = bytes(head[: min(size, len(MAGIC))])
    if magic != MAGIC[: len(magic)]:
        raise _corrupt("bad magic: not an activation file")
    if size < FIXED_HEADER_LEN:
        raise ActivationTruncatedError(
            f"activation: {size} bytes, shorter than the {FIXED_HEADER_LEN}-byte fixed header"
        )
    fixed = _parse_fixed(head)
    data_len = _data_len(fixed, max_bytes)
    expected_size = fixed.header_len + data_len
    if size < fixed.header_len:
        raise ActivationTruncatedError(
            f"activation: {size} bytes, shorter than its {fixed.header_len}-byte header"
        )
    if size < expected_size:
        raise ActivationTruncatedError(
            f"activation: {size} bytes, but header and data of shape {fixed.shape} need "
            f"{expected_size}"
        )
    if size > expected_size:
        raise _corrupt(f"trailing data: {size - expected_size} bytes after the end of the data")
    return fixed, data_len


def _parse_fixed(buf: memoryview) -> _Fixed:
    """The 112-byte fixed header, field by field in file order (the magic is checked)."""
    (
        _magic,
        version,
        dtype_code,
        ndim,
        name_len,
        reserved_14,
        header_len,
        reserved_20,
        session,
        seq,
        *slots,
        checksum,
    ) = HEADER.unpack_from(buf)
    if version != VERSION:
        raise _corrupt(f"unsupported version {version} (this embassy reads {VERSION})")
    dtype = DTYPES.get(dtype_code)
    if dtype is None:
        raise _corrupt(f"unknown dtype code {dtype_code} (known: {sorted(DTYPES)})")
    if not 1 <= ndim <= MAX_NDIM:
        raise _corrupt(f"ndim {ndim} is not in 1..{MAX_NDIM}")
    if not 1 <= name_len <= MAX_NAME_LEN:
        raise _corrupt(f"name_len {name_len} is not in 1..{MAX_NAME_LEN}")
    if reserved_14 != 0:
        raise _corrupt(f"reserved field at offset 14 is {reserved_14}, not 0")
    if reserved_20 != 0:
        raise _corrupt(f"reserved field at offset 20 is {reserved_20}, not 0")
    expected_header_len = header_len_for(name_len)
    if header_len != expected_header_len:
        raise _corrupt(
            f"header_len {header_len} but name of {name_len} bytes needs {expected_header_len}"
        )
    shape = tuple(slots[:ndim])
    for axis, dim in enumerate(shape):
        if dim == 0:
            raise _corrupt(f"dimension {axis} of shape {shape} is 0")
    for axis in range(ndim, MAX_NDIM):
        if slots[axis] != 0:
            raise _corrupt(f"unused shape slot {axis} is {slots[axis]}, not 0 (ndim {ndim})")
    return _Fixed(dtype, name_len, header_len, session, seq, shape, checksum)


def _data_len(fixed: _Fixed, max_bytes: int) -> int:
    """The data's size from the header alone, refused as soon as it passes the limit.

    One factor at a time: every dim is >= 1, so the running product only grows, and it
    stops as soon as header and data pass ``max_bytes`` (four u64 dims could otherwise make
    a 256-bit product, and a caller could allocate from it).
    """
    data_len = np.dtype(fixed.dtype).itemsize
    for dim in fixed.shape:
        data_len *= dim
        if fixed.header_len + data_len > max_bytes:
            raise ActivationOversizedError(
                f"activation: header claims shape {fixed.shape} of {fixed.dtype}, more than "
                f"the limit of {max_bytes} bytes"
            )
    return data_len


def _parse_name(buf: memoryview, fixed: _Fixed) -> str:
    """The tensor name, and the zero padding after it."""
    end = FIXED_HEADER_LEN + fixed.name_len
    raw_name = bytes(buf[FIXED_HEADER_LEN:end])
    if NAME.fullmatch(raw_name) is None:
        raise _corrupt(f"tensor name {raw_name!r} is not 1..{MAX_NAME_LEN} of [A-Za-z0-9_.:/-]")
    padding = buf[end : fixed.header_len]
    if padding != bytes(len(padding)):
        raise _corrupt("nonzero header padding after the name")
    return raw_name.decode("ascii")


def _check_checksum(buf: memoryview, fixed: _Fixed) -> None:
    digest = hashlib.sha256(buf[:CHECKSUM_OFFSET])
    digest.update(_ZERO_CHECKSUM)
    digest.update(buf[CHECKSUM_OFFSET + CHECKSUM_LEN :])
    if not hmac.compare_digest(digest.digest(), fixed.checksum):
        raise _corrupt("checksum mismatch")


def _check_canonical(buf: memoryview, fixed: _Fixed, name: str) -> None:
    """Belt and braces: the header is exactly the one the SDK writes for its fields.

    Every field is checked above; this makes sure a field a check forgot cannot get through.
    """
    try:
        canonical = pack_header(fixed.session, fixed.seq, name, fixed.dtype, fixed.shape)
    except ValueError as exc:
        raise _corrupt(f"header does not re-encode: {exc}") from None
    received = b"".join(
        (
            buf[:CHECKSUM_OFFSET],
            _ZERO_CHECKSUM,
            buf[CHECKSUM_OFFSET + CHECKSUM_LEN : fixed.header_len],
        )
    )
    if canonical != received:
        raise _corrupt("header is not the canonical encoding of its fields")


def _check_finite(array: npt.NDArray[np.floating[Any]]) -> None:
    flat = array.reshape(-1)
    for start in range(0, flat.size, _FINITE_BLOCK):
        finite = np.isfinite(flat[start : start + _FINITE_BLOCK])
        if not finite.all():
            bad = start + int(np.flatnonzero(~finite)[0])
            index = tuple(int(i) for i in np.unravel_index(bad, array.shape))
            raise _corrupt(f"non-finite value {float(flat[bad])} at index {index}")


def read_activation_file(path: Path, *, max_bytes: int) -> Activation:
    """Read and parse the activation file at ``path``, which the workload controls.

    ``ActivationForeignError`` for a symlink, anything but a regular file, or a file with
    more than one link (a hard link could make root read a file the workload cannot);
    ``ActivationOversizedError`` from the size before any byte is read. Other ``OSError``
    (the file vanished, ...) propagate: they say nothing about the file's contents.
    """
    # O_PATH | O_NOFOLLOW opens the directory entry itself without opening what it names:
    # a symlink, FIFO or device node is never opened (opening some devices does something),
    # and fstat on it decides. Only a regular file is then opened for reading, through
    # /proc/self/fd: the same inode, so a swap of the name in between changes nothing.
    handle = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(handle)
        if stat.S_ISLNK(st.st_mode):
            raise ActivationForeignError("activation: not a regular file (a symlink)")
        if not stat.S_ISREG(st.st_mode):
            raise ActivationForeignError(
                f"activation: not a regular file (mode {stat.filemode(st.st_mode)})"
            )
        fd = os.open(f"/proc/self/fd/{handle}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    finally:
        os.close(handle)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # pragma: no cover (same inode as above)
            raise ActivationForeignError("activation: not a regular file")
        if st.st_nlink != 1:
            raise ActivationForeignError(
                f"activation: {st.st_nlink} links (a hard link is refused)"
            )
        # Cheap checks first: the size (fstat) and the fixed header (one pread) decide
        # oversized, bad magic, truncated and trailing data before the rest is read.
        head = os.pread(fd, FIXED_HEADER_LEN, 0)
        if len(head) < min(st.st_size, FIXED_HEADER_LEN):
            raise ActivationTruncatedError("activation: the file shrank while it was read")
        _check_layout(memoryview(head), st.st_size, max_bytes)
        # read(), never mmap: the workload can truncate the file while it is mapped, and a
        # read from a mapped page past the new end raises SIGBUS, killing the daemon.
        # The file may also grow after fstat: read up to max_bytes + 1 so the parser sees
        # that it is too large, never more.
        data = _read_bounded(fd, st.st_size, max_bytes + 1)
    finally:
        os.close(fd)
    return parse_activation(data, max_bytes=max_bytes)


def _read_bounded(fd: int, expected: int, limit: int) -> bytearray:
    """Read from ``fd`` to end of file or ``limit`` bytes, whichever comes first."""
    buf = bytearray(min(expected + 1, limit))
    got = 0
    while True:
        if got == len(buf):
            if got >= limit:
                break
            # Grown since fstat: make room, in doublings, never past the limit.
            buf.extend(bytes(min(max(len(buf), 1 << 16), limit - got)))
        with memoryview(buf) as view, view[got:] as tail:
            n = os.readv(fd, [tail])
        if n == 0:
            break
        got += n
    del buf[got:]
    return buf
