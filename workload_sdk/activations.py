"""Activation files: how a workload hands its hidden states to the embassy (format v1).

The workload writes one file per tensor into the shared activation directory; the embassy
reads, checks and deletes it (``embassy.metering.activation`` parses it, importing the
constants below: the format is defined here, once). All integers are little-endian::

    offset  size      field
    0       8         magic        b"\\x89EMBACT\\n"
    8       2         version      u16 = 1
    10      1         dtype        u8: 1 = float32 '<f4', 2 = float16 '<f2', 3 = float64 '<f8'
    11      1         ndim         u8: 1..4
    12      2         name_len     u16: 1..128
    14      2         reserved     0
    16      4         header_len   u32: 112 + name_len rounded up to a multiple of 64
    20      4         reserved     0
    24      16        session      the session id the activations belong to
    40      8         seq          u64: 0, 1, 2, ... per session
    48      32        shape        4 x u64: the first ndim are the dims (each >= 1), the rest 0
    80      32        checksum     SHA-256(header with this field zeroed || data)
    112     name_len  name         ASCII [A-Za-z0-9_.:/-]{1,128}
    ...               padding      zeros up to header_len
    header_len        data         prod(shape) * itemsize bytes, C order; the file ends here

The data starts 64-byte aligned, so a reader can map it as an array without a copy. The
checksum covers every byte of the file (its own field as zeros), so it names the file.

:class:`ActivationWriter` writes a file with one copy of the array: into a memory map of a
temporary file (``.<session hex>-<seq>.tmp``), hashed in place (for a large array, block by
block on a second thread while the next block is copied), then renamed to
:func:`file_name` so the embassy never sees a partial ``.act`` file. Files appear in ``seq``
order. One writer per session and directory: the rename replaces a file of the same name.

Needs only the standard library and numpy; it must not import ``embassy``. The embassy,
not the writer, decides about NaN and infinity: such values are written as they are.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import threading
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

MAGIC = b"\x89EMBACT\n"
VERSION = 1
FIXED_HEADER_LEN = 112
HEADER_ALIGN = 64
SESSION_LEN = 16
MAX_NDIM = 4
MAX_NAME_LEN = 128
MAX_SEQ = 2**64 - 1
CHECKSUM_OFFSET = 80
CHECKSUM_LEN = 32
SUFFIX = ".act"
# dtype code <-> numpy dtype string (always little-endian).
DTYPES: Mapping[int, str] = {1: "<f4", 2: "<f2", 3: "<f8"}
DTYPE_CODES: Mapping[str, int] = {text: code for code, text in DTYPES.items()}
# The tensor name: a whole-string match on bytes, so non-ASCII can never slip through.
NAME = re.compile(rb"[A-Za-z0-9_.:/-]{1,128}")
# magic, version, dtype, ndim, name_len, reserved, header_len, reserved, session, seq,
# shape[4], checksum: exactly the 112 bytes of the table above, no implicit padding.
HEADER = struct.Struct("<8sHBBHHII16sQ4Q32s")
assert HEADER.size == FIXED_HEADER_LEN

_ZERO_CHECKSUM = bytes(CHECKSUM_LEN)
# The writer copies and hashes in blocks of about this size (they stay in cache between the
# two), on two threads from _PIPELINE_MIN bytes of data on: below that a thread costs more
# than it saves.
_BLOCK = 1 << 20
_PIPELINE_MIN = 4 * _BLOCK


class ActivationWriteError(ValueError):
    """An activation the format cannot carry; nothing was written.

    ``reason`` is a stable word: ``bad-name``, ``bad-session``, ``bad-seq``, ``bad-dtype``,
    ``bad-shape``, ``bad-array``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def check_name(name: str) -> bytes:
    """The ASCII bytes of tensor name ``name``; :class:`ActivationWriteError` if not valid."""
    if not isinstance(name, str):
        raise ActivationWriteError("bad-name", f"tensor name must be a str, got {name!r}")
    raw = name.encode("ascii") if name.isascii() else b""
    if NAME.fullmatch(raw) is None:
        raise ActivationWriteError(
            "bad-name",
            f"tensor name {name!r} must be 1..{MAX_NAME_LEN} characters of [A-Za-z0-9_.:/-]",
        )
    return raw


def header_len_for(name: str | int) -> int:
    """The header length (= data offset) for tensor name ``name``, or a name of that length."""
    size = name if isinstance(name, int) else len(check_name(name))
    unaligned = FIXED_HEADER_LEN + size
    return -(-unaligned // HEADER_ALIGN) * HEADER_ALIGN


def file_name(session: bytes, seq: int) -> str:
    """The final name of activation ``seq`` of ``session``: ``<session hex>-<seq:012d>.act``."""
    return f"{bytes(session).hex()}-{seq:012d}{SUFFIX}"


def pack_header(session: bytes, seq: int, name: str, dtype: str, shape: tuple[int, ...]) -> bytes:
    """The whole header (``header_len_for(name)`` bytes) with the checksum field zeroed.

    ``dtype`` is a numpy dtype string of :data:`DTYPES` (``'<f4'``, ``'<f2'``, ``'<f8'``).
    """
    raw_name = check_name(name)
    _check_session(session)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise ActivationWriteError("bad-seq", f"seq must be an int in [0, 2**64), got {seq!r}")
    code = DTYPE_CODES.get(dtype)
    if code is None:
        raise ActivationWriteError(
            "bad-dtype", f"dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}"
        )
    _check_shape(shape)
    hlen = header_len_for(len(raw_name))
    fixed = HEADER.pack(
        MAGIC,
        VERSION,
        code,
        len(shape),
        len(raw_name),
        0,
        hlen,
        0,
        bytes(session),
        seq,
        *shape,
        *(0,) * (MAX_NDIM - len(shape)),
        _ZERO_CHECKSUM,
    )
    return fixed + raw_name + bytes(hlen - FIXED_HEADER_LEN - len(raw_name))


def _check_session(session: bytes) -> None:
    if not isinstance(session, bytes | bytearray) or len(session) != SESSION_LEN:
        raise ActivationWriteError("bad-session", f"session must be {SESSION_LEN} bytes")


def _check_shape(shape: tuple[int, ...]) -> None:
    if not 1 <= len(shape) <= MAX_NDIM:
        raise ActivationWriteError(
            "bad-shape", f"an activation has 1..{MAX_NDIM} dimensions, got shape {shape}"
        )
    if any(isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_SEQ for d in shape):
        raise ActivationWriteError(
            "bad-shape", f"every dimension must be an int >= 1, got shape {shape}"
        )


def _target_dtype(array: npt.NDArray[Any]) -> str:
    """The little-endian float dtype ``array`` is written as: its own kind and width."""
    if not isinstance(array, np.ndarray):
        raise ActivationWriteError(
            "bad-array", f"an activation is a numpy array, got {type(array).__name__}"
        )
    if array.dtype.kind != "f" or f"<f{array.dtype.itemsize}" not in DTYPE_CODES:
        raise ActivationWriteError(
            "bad-dtype", f"an activation is float16, float32 or float64, got {array.dtype}"
        )
    return f"<f{array.dtype.itemsize}"


def _prepare(
    session: bytes, seq: int, name: str, array: npt.NDArray[Any]
) -> tuple[bytes, str, int]:
    """Check everything before touching the disk: (header, dtype, total file size)."""
    dtype = _target_dtype(array)
    shape = tuple(int(d) for d in array.shape)
    header = pack_header(session, seq, name, dtype, shape)
    return header, dtype, len(header) + array.size * array.dtype.itemsize


def _fill(buf: mmap.mmap | bytearray, header: bytes, dtype: str, array: npt.NDArray[Any]) -> None:
    """Write header, data and checksum into ``buf`` (exactly the file's size), in place.

    The data is the one copy of the array: numpy assigns it into a view over ``buf``,
    converting byte order and layout (C order) on the way, with no intermediate bytes. The
    checksum field is still zero in ``header``, so hashing header then data hashes exactly
    the bytes the format says.
    """
    buf[: len(header)] = header
    digest = hashlib.sha256(header)
    view: npt.NDArray[Any] = np.ndarray(array.shape, dtype=dtype, buffer=buf, offset=len(header))
    if view.nbytes < _PIPELINE_MIN:
        view[...] = array
        digest.update(view.data)
    else:
        # SHA-256 and the copy (page faults into the fresh mapping, mostly) cost about the
        # same, and both release the GIL: hash block i on a second thread while block i+1
        # is copied. One worker runs its queue in order, so the hash sees the bytes in order.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-sha256") as pool:
            pending = [
                pool.submit(digest.update, block.data) for block in _copied_blocks(view, array)
            ]
        for future in pending:
            future.result()
    # A live view pins the buffer: mmap.close() refuses while one is exported.
    del view
    buf[CHECKSUM_OFFSET : CHECKSUM_OFFSET + CHECKSUM_LEN] = digest.digest()


def _copied_blocks(dst: npt.NDArray[Any], src: npt.NDArray[Any]) -> Iterator[npt.NDArray[Any]]:
    """Copy ``src`` into ``dst`` about :data:`_BLOCK` bytes at a time; yield each block done.

    ``dst`` is C-contiguous, so every block is one contiguous run of bytes, and the blocks
    come in memory order. Slicing never copies ``src``, whatever its strides.
    """
    if dst.ndim > 1 and dst[0].nbytes > _BLOCK:
        for i in range(dst.shape[0]):
            yield from _copied_blocks(dst[i], src[i])
        return
    step = max(1, _BLOCK // dst[0].nbytes)
    for start in range(0, dst.shape[0], step):
        block = dst[start : start + step]
        block[...] = src[start : start + step]
        yield block


def encode_activation(session: bytes, seq: int, name: str, array: npt.NDArray[Any]) -> bytes:
    """The bytes of activation file ``seq``, in memory (test vectors, small tensors).

    Byte-for-byte what :meth:`ActivationWriter.write` puts on disk (they share the code).
    """
    header, dtype, total = _prepare(session, seq, name, array)
    buf = bytearray(total)
    _fill(buf, header, dtype, array)
    return bytes(buf)


class ActivationWriter:
    """Writes a session's activations into ``directory`` as ``.act`` files, seq 0, 1, ...

    Thread-safe: writes are serialised, so files appear in ``seq`` order even when hooks
    fire from several threads (the embassy refuses a sequence out of order).
    """

    def __init__(self, directory: Path, session: bytes) -> None:
        _check_session(session)
        self._directory = Path(directory)
        self._session = bytes(session)
        self._seq = 0
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def session(self) -> bytes:
        return self._session

    @property
    def count(self) -> int:
        """Files written so far (= the ``seq`` of the next one)."""
        return self._seq

    def write(self, name: str, array: npt.NDArray[Any]) -> Path:
        """Write ``array`` as tensor ``name``; return the final path.

        :class:`ActivationWriteError` (a ``ValueError``) for a name, dtype or shape the
        format cannot carry; ``OSError`` from the file system. Either way no file is left
        behind and ``seq`` does not advance.
        """
        with self._lock:
            seq = self._seq
            header, dtype, total = _prepare(self._session, seq, name, array)
            tmp = self._directory / f".{self._session.hex()}-{seq}.tmp"
            final = self._directory / file_name(self._session, seq)
            # O_EXCL: never reuse (or follow) a file someone else put under the temp name.
            fd = os.open(
                tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                try:
                    # Allocated, not just sized: on a full spool (a size-limited tmpfs) this
                    # fails with ENOSPC here, where a sparse file would fault (SIGBUS) on a
                    # page of the mapping below and kill the workload.
                    os.posix_fallocate(fd, 0, total)
                    with mmap.mmap(fd, total) as mapped:
                        try:
                            _fill(mapped, header, dtype, array)
                        except BaseException as exc:
                            # The traceback's frames hold views of the mapping, and
                            # mmap.close() refuses while one exists: drop their locals
                            # (the stack trace stays) so the mapping closes cleanly.
                            traceback.clear_frames(exc.__traceback__)
                            raise
                        # No msync: the embassy reads through the same page cache (the
                        # directory is a local bind mount it made), and writing every file
                        # back to disk first would halve the throughput on ext4.
                finally:
                    os.close(fd)
                os.rename(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            self._seq = seq + 1
            return final


def capture_layers(
    writer: ActivationWriter, names: Collection[str]
) -> Callable[[str, npt.NDArray[Any]], None]:
    """A ``(layer name, array)`` callback for a numpy model that writes only ``names``.

    The names are checked now, so a typo fails before the model runs, not halfway through.
    """
    wanted = frozenset(names)
    for name in wanted:
        check_name(name)

    def callback(layer: str, array: npt.NDArray[Any]) -> None:
        if layer in wanted:
            writer.write(layer, array)

    return callback
