"""Encrypted model files (format v1, docs/protocol.md "Encrypted model files"), and the loader.

The model owner turns a safetensors file into one of these with ``embassy weights encrypt``
(``embassy.weights``, which builds on the definitions below: the format is defined here,
once). The workload loads it with :func:`load_encrypted` once the key has been released to
it. All integers in the fixed prefix are little-endian::

    offset          size   field
    0               8      magic        b"\\x89EMBWTS\\n"
    8               4      version      u32 = 1
    12              4      header_len   u32: 2..16 MiB
    16              H      header       canonical JSON (below)
    16+H            32     header_mac   HMAC-SHA256(mac_key, bytes[0:16+H])
    48+H            T      table chunk  only when the table is hidden: AES-256-GCM, T bytes
    ...                    data chunks  ciphertext || 16-byte tag each, in order; EOF

    header = {"chunk_size":N,"cipher":"AES-256-GCM","key_commitment":"<hex 32 B>",
              "key_id":"<id>","model_id":"<id>","salt":"<hex 32 B>","table":TABLE}
    TABLE  = {"metadata":{str:str},"tensors":[{"dtype":D,"name":str,"shape":[int]}, ...]}
           | {"encrypted_size":T}        (hide_names: the table is the plaintext of the
                                          table chunk, itself canonical JSON of the first form)

Keys: ``okm = HKDF-SHA256(ikm=key, salt=salt, info=b"embassy-weights-v1\\0" || model_id ||
b"\\0" || key_id, length=96)``; ``enc_key = okm[0:32]``, ``mac_key = okm[32:64]``,
``key_commitment = okm[64:96]``. The 32-byte random salt gives every file its own keys, so
chunk nonces never repeat across files encrypted under one key, however many there are.

Chunks: each tensor's bytes (C order, little-endian) are cut into ``chunk_size`` pieces (the
last one shorter; an empty tensor has none); chunk ``i`` counts over the whole file. Its
nonce is ``u32be(2) || u64be(i)`` and its associated data is ``SHA-256(bytes[0:16+H]) ||
u64le(i) || u32le(tensor index) || u64le(offset in tensor) || u8(1 on the file's last chunk,
else 0)``. The table chunk's nonce is ``u32be(1) || u64be(0)`` and its associated data
``SHA-256(bytes[0:16+H]) || b"table"``.

Checks, in this order, each with its own :class:`WeightsError` code: the prefix and header
parse (``weights-malformed``), ``model_id`` and ``key_id`` are the ones expected
(``weights-wrong-model``, ``weights-wrong-key``), the key's commitment
(``weights-wrong-key``), the header MAC (``weights-header-tampered``), the table chunk, the
file's exact length (``weights-truncated``; trailing bytes are ``weights-malformed``), then
every chunk (``weights-chunk-tampered``, naming the chunk, its tensor and offset).

This module runs inside the workload container (Debian bookworm: python3, numpy,
python3-cryptography 38), so it uses only the standard library, numpy and cryptography APIs
that 38 has. It must not import ``embassy``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    import numpy.typing as npt

MAGIC = b"\x89EMBWTS\n"
VERSION = 1
PREFIX = struct.Struct("<8sII")  # magic, version, header_len
CIPHER = "AES-256-GCM"
KEY_LEN = 32
SALT_LEN = 32
MAC_LEN = 32
TAG_LEN = 16
MAX_HEADER_LEN = 16 * 1024 * 1024
MAX_TABLE_LEN = MAX_HEADER_LEN + TAG_LEN
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
READ_SIZE = 256 * 1024  # the loader reads a chunk in pieces this big (one buffer per thread)
MAX_NDIM = 16
MAX_TENSOR_BYTES = 2**48
MAX_NAME_LEN = 1024
KDF_INFO = b"embassy-weights-v1\x00"
NONCE_TABLE = 1
NONCE_DATA = 2
# What safetensors calls its dtypes: (bytes per element, the numpy dtype of the arrays the
# loader returns). numpy has no bfloat16 or 8-bit floats: those come back as their raw bits
# (uint16, uint8); ``as_torch=True`` views them as the torch dtype.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "|b1"),
    "U8": (1, "|u1"),
    "I8": (1, "|i1"),
    "F8_E5M2": (1, "|u1"),
    "F8_E4M3": (1, "|u1"),
    "I16": (2, "<i2"),
    "U16": (2, "<u2"),
    "F16": (2, "<f2"),
    "BF16": (2, "<u2"),
    "I32": (4, "<i4"),
    "U32": (4, "<u4"),
    "F32": (4, "<f4"),
    "F64": (8, "<f8"),
    "I64": (8, "<i8"),
    "U64": (8, "<u8"),
    "C64": (8, "<c8"),
}
_TORCH_VIEWS = {"BF16": "bfloat16", "F8_E5M2": "float8_e5m2", "F8_E4M3": "float8_e4m3fn"}
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_HEX32 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEADER_FIELDS = frozenset(
    {"chunk_size", "cipher", "key_commitment", "key_id", "model_id", "salt", "table"}
)


class WeightsError(Exception):
    """An encrypted model file that is not an authentic file for this key and model.

    ``code`` is stable and machine-readable: ``weights-malformed``, ``weights-truncated``,
    ``weights-wrong-model``, ``weights-wrong-key``, ``weights-header-tampered``,
    ``weights-chunk-tampered``. ``chunk`` is the failing data chunk's index, if any.
    """

    def __init__(self, code: str, message: str, *, chunk: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.chunk = chunk


def _malformed(message: str) -> WeightsError:
    return WeightsError("weights-malformed", message)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * DTYPES[self.dtype][0]

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class TensorTable:
    tensors: tuple[TensorInfo, ...]
    metadata: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"metadata": dict(self.metadata), "tensors": [t.to_json() for t in self.tensors]}


@dataclass(frozen=True)
class Chunk:
    """One data chunk: where its ciphertext is and which bytes of which tensor it holds."""

    index: int
    tensor: int
    offset: int  # in the tensor's bytes
    length: int  # plaintext bytes (the ciphertext has TAG_LEN more)
    position: int  # of its ciphertext in the file
    last: bool


@dataclass(frozen=True)
class Header:
    """A parsed header. ``raw`` is ``bytes[0:16+H]``, exactly as read (what the MAC covers)."""

    model_id: str
    key_id: str
    chunk_size: int
    salt: bytes
    key_commitment: bytes
    table: TensorTable | None  # None: hidden in the table chunk
    encrypted_table_size: int  # 0 when the table is in the clear
    raw: bytes

    @property
    def digest(self) -> bytes:
        """SHA-256 of the prefix and header: bound into every chunk's associated data."""
        return hashlib.sha256(self.raw).digest()

    @property
    def table_position(self) -> int:
        return len(self.raw) + MAC_LEN

    @property
    def data_position(self) -> int:
        return self.table_position + self.encrypted_table_size

    def public_json(self) -> dict[str, Any]:
        """What anyone can read without the key (``embassy weights inspect``)."""
        out: dict[str, Any] = {
            "format": "embassy-weights",
            "version": VERSION,
            "model_id": self.model_id,
            "key_id": self.key_id,
            "cipher": CIPHER,
            "chunk_size": self.chunk_size,
            "salt": self.salt.hex(),
            "key_commitment": self.key_commitment.hex(),
            "header_sha256": self.digest.hex(),
            "names_hidden": self.table is None,
        }
        if self.table is None:
            out["encrypted_table_size"] = self.encrypted_table_size
        else:
            out["metadata"] = dict(self.table.metadata)
            out["tensors"] = [t.to_json() for t in self.table.tensors]
        return out


@dataclass(frozen=True)
class Keys:
    enc: bytes
    mac: bytes
    commitment: bytes


# -- encoding (the owner's side uses these too) ---------------------------------------------


def canonical(value: Mapping[str, Any]) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def derive_keys(key: bytes | bytearray, salt: bytes, model_id: str, key_id: str) -> Keys:
    """HKDF-SHA256 (RFC 5869) of the file's keys, written out with hmac: 38 has HKDF too, but
    this way the key material passes through one function the loader controls."""
    if len(key) != KEY_LEN:
        raise WeightsError("weights-wrong-key", f"the key must be {KEY_LEN} bytes, got {len(key)}")
    info = KDF_INFO + model_id.encode() + b"\x00" + key_id.encode()
    prk = hmac.new(salt, bytes(key), hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in (1, 2, 3):
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
    return Keys(enc=okm[0:32], mac=okm[32:64], commitment=okm[64:96])


def encode_prefix_and_header(header: Mapping[str, Any]) -> bytes:
    """``bytes[0:16+H]``: magic, version, header length and the header's canonical JSON."""
    body = canonical(header)
    if len(body) > MAX_HEADER_LEN:
        raise ValueError(f"the header is {len(body)} bytes, more than {MAX_HEADER_LEN}")
    return PREFIX.pack(MAGIC, VERSION, len(body)) + body


def header_mac(mac_key: bytes, raw: bytes) -> bytes:
    return hmac.new(mac_key, raw, hashlib.sha256).digest()


def data_nonce(index: int) -> bytes:
    return struct.pack(">IQ", NONCE_DATA, index)


TABLE_NONCE = struct.pack(">IQ", NONCE_TABLE, 0)


def data_aad(digest: bytes, chunk: Chunk) -> bytes:
    return digest + struct.pack("<QIQB", chunk.index, chunk.tensor, chunk.offset, chunk.last)


def table_aad(digest: bytes) -> bytes:
    return digest + b"table"


def layout(table: TensorTable, chunk_size: int, data_position: int) -> list[Chunk]:
    """Every data chunk of a file with this table, in file order."""
    chunks: list[Chunk] = []
    position = data_position
    for t, info in enumerate(table.tensors):
        size = info.nbytes
        for offset in range(0, size, chunk_size):
            length = min(chunk_size, size - offset)
            chunks.append(Chunk(len(chunks), t, offset, length, position, False))
            position += length + TAG_LEN
    if chunks:
        end = chunks[-1]
        chunks[-1] = Chunk(end.index, end.tensor, end.offset, end.length, end.position, True)
    return chunks


def file_size(header: Header, table: TensorTable) -> int:
    """How long a file with this header and table is, exactly."""
    size = header.data_position
    for info in table.tensors:
        n = info.nbytes
        size += n + TAG_LEN * (-(-n // header.chunk_size))
    return size


# -- strict parsing ----------------------------------------------------------------------------


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _malformed(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_float(text: str) -> Any:
    raise _malformed(f"a number that is not an integer ({text})")


def _no_constant(text: str) -> Any:
    raise _malformed(f"{text} is not JSON")


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_float=_no_float,
            parse_constant=_no_constant,
        )
    except UnicodeDecodeError:
        raise _malformed(f"{what}: not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, WeightsError):
            raise WeightsError(exc.code, f"{what}: {exc.message}") from None
        raise _malformed(f"{what}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise _malformed(f"{what}: not a JSON object")
    if canonical(value) != data:
        raise _malformed(f"{what}: not canonical JSON (sorted keys, no spaces, UTF-8)")
    return value


def _int(value: Any, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _malformed(f"{what}: must be an integer in [{low}, {high}], got {value!r}")
    return value


def _fields(obj: Any, wanted: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _malformed(f"{what}: not an object")
    if set(obj) != wanted:
        missing, extra = sorted(wanted - set(obj)), sorted(set(obj) - wanted)
        raise _malformed(f"{what}: missing {missing}, unknown {extra}")
    return obj


def _id(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise _malformed(f"{what}: must match {_ID.pattern}, got {value!r}")
    return value


def _hex32(value: Any, what: str) -> bytes:
    if not isinstance(value, str) or not _HEX32.fullmatch(value):
        raise _malformed(f"{what}: must be 64 lowercase hex digits")
    return bytes.fromhex(value)


def parse_table(obj: Any, what: str = "table") -> TensorTable:
    fields = _fields(obj, frozenset({"metadata", "tensors"}), what)
    metadata = fields["metadata"]
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _malformed(f"{what}.metadata: must map strings to strings")
    entries = fields["tensors"]
    if not isinstance(entries, list):
        raise _malformed(f"{what}.tensors: not a list")
    tensors: list[TensorInfo] = []
    names: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"{what}.tensors[{i}]"
        e = _fields(entry, frozenset({"dtype", "name", "shape"}), where)
        name = e["name"]
        if (
            not isinstance(name, str)
            or not 1 <= len(name) <= MAX_NAME_LEN
            or _CONTROL.search(name) is not None
        ):
            raise _malformed(f"{where}.name: 1..{MAX_NAME_LEN} characters, no control ones")
        if name in names:
            raise _malformed(f"{where}.name: {name!r} appears twice")
        names.add(name)
        if e["dtype"] not in DTYPES:
            raise _malformed(f"{where}.dtype: {e['dtype']!r} is not one of {sorted(DTYPES)}")
        shape = e["shape"]
        if not isinstance(shape, list) or len(shape) > MAX_NDIM:
            raise _malformed(f"{where}.shape: a list of at most {MAX_NDIM} integers")
        dims = tuple(_int(d, f"{where}.shape", 0, MAX_TENSOR_BYTES) for d in shape)
        info = TensorInfo(name, e["dtype"], dims)
        if info.nbytes > MAX_TENSOR_BYTES:
            raise _malformed(f"{where}: {info.nbytes} bytes, more than {MAX_TENSOR_BYTES}")
        tensors.append(info)
    return TensorTable(tuple(tensors), tuple(sorted(metadata.items())))


def parse_prefix(data: bytes) -> int:
    """The header length from the 16-byte prefix."""
    if len(data) < PREFIX.size:
        raise WeightsError("weights-truncated", f"{len(data)} bytes: shorter than the prefix")
    magic, version, header_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise _malformed("magic: not an encrypted model file")
    if version != VERSION:
        raise _malformed(f"version: {version}, this reader knows {VERSION}")
    _int(header_len, "header_len", 2, MAX_HEADER_LEN)
    return int(header_len)


def parse_header(raw: bytes) -> Header:
    """Parse ``bytes[0:16+H]`` strictly (nothing is authenticated yet: that needs the key)."""
    header_len = parse_prefix(raw)
    if len(raw) != PREFIX.size + header_len:
        raise WeightsError(
            "weights-truncated", f"header_len says {header_len} bytes, {len(raw) - 16} present"
        )
    obj = _fields(_json(raw[PREFIX.size :], "header"), _HEADER_FIELDS, "header")
    if obj["cipher"] != CIPHER:
        raise _malformed(f"header.cipher: {obj['cipher']!r}, expected {CIPHER!r}")
    chunk_size = _int(obj["chunk_size"], "header.chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE)
    if chunk_size & (chunk_size - 1):
        raise _malformed(f"header.chunk_size: {chunk_size} is not a power of two")
    table_obj = obj["table"]
    table: TensorTable | None = None
    encrypted_size = 0
    if isinstance(table_obj, dict) and set(table_obj) == {"encrypted_size"}:
        encrypted_size = _int(
            table_obj["encrypted_size"], "header.table.encrypted_size", TAG_LEN + 2, MAX_TABLE_LEN
        )
    else:
        table = parse_table(table_obj, "header.table")
    return Header(
        model_id=_id(obj["model_id"], "header.model_id"),
        key_id=_id(obj["key_id"], "header.key_id"),
        chunk_size=chunk_size,
        salt=_hex32(obj["salt"], "header.salt"),
        key_commitment=_hex32(obj["key_commitment"], "header.key_commitment"),
        table=table,
        encrypted_table_size=encrypted_size,
        raw=raw,
    )


# -- reading a file ------------------------------------------------------------------------


def _pread(fd: int, size: int, position: int, what: str) -> bytes:
    data = os.pread(fd, size, position)
    if len(data) != size:
        raise WeightsError("weights-truncated", f"{what}: the file ends before it")
    return data


def read_header(fd: int) -> Header:
    """The header of the open file ``fd`` (parsed, not authenticated)."""
    header_len = parse_prefix(os.pread(fd, PREFIX.size, 0))
    return parse_header(_pread(fd, PREFIX.size + header_len, 0, "header"))


def open_file(
    fd: int, key: bytes | bytearray, *, model_id: str, key_id: str
) -> tuple[Header, TensorTable, Keys, list[Chunk]]:
    """Read and authenticate everything but the data chunks, and check the file's length."""
    header = read_header(fd)
    if header.model_id != model_id:
        raise WeightsError(
            "weights-wrong-model",
            f"model_id: the file is for {header.model_id!r}, expected {model_id!r}",
        )
    if header.key_id != key_id:
        raise WeightsError(
            "weights-wrong-key", f"key_id: the file is under {header.key_id!r}, expected {key_id!r}"
        )
    keys = derive_keys(key, header.salt, header.model_id, header.key_id)
    if not hmac.compare_digest(keys.commitment, header.key_commitment):
        raise WeightsError(
            "weights-wrong-key",
            f"key_commitment: the key given is not the key {key_id!r} this file was sealed with",
        )
    mac = _pread(fd, MAC_LEN, len(header.raw), "header_mac")
    if not hmac.compare_digest(header_mac(keys.mac, header.raw), mac):
        raise WeightsError("weights-header-tampered", "header_mac: the header was changed")
    table = header.table
    if table is None:
        sealed = _pread(fd, header.encrypted_table_size, header.table_position, "table chunk")
        try:
            plain = AESGCM(keys.enc).decrypt(TABLE_NONCE, sealed, table_aad(header.digest))
        except InvalidTag:
            raise WeightsError(
                "weights-chunk-tampered", "the tensor table chunk does not authenticate"
            ) from None
        table = parse_table(_json(plain, "table chunk"), "table chunk")
    expected = file_size(header, table)
    actual = os.fstat(fd).st_size
    if actual < expected:
        raise WeightsError(
            "weights-truncated", f"the file has {actual} bytes, its header describes {expected}"
        )
    if actual > expected:
        raise _malformed(f"{actual - expected} bytes after the last chunk")
    return header, table, keys, layout(table, header.chunk_size, header.data_position)


# -- the loader -------------------------------------------------------------------------------


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class _Decryptor:
    """Decrypts chunks straight into their tensors' bytes, one small read buffer per thread."""

    def __init__(
        self, fd: int, keys: Keys, header: Header, table: TensorTable, views: list[memoryview]
    ) -> None:
        self._fd = fd
        self._algorithm = algorithms.AES(keys.enc)
        self._digest = header.digest
        self._table = table
        self._views = views
        self._chunk_size = header.chunk_size
        self._local = threading.local()

    def _scratch(self) -> memoryview:
        view = getattr(self._local, "view", None)
        if view is None:
            view = memoryview(bytearray(min(self._chunk_size, READ_SIZE)))
            self._local.view = view
        return view

    def __call__(self, chunk: Chunk) -> None:
        fd, scratch = self._fd, self._scratch()
        tag = os.pread(fd, TAG_LEN, chunk.position + chunk.length)
        if len(tag) != TAG_LEN:
            raise WeightsError("weights-truncated", f"chunk {chunk.index}: the file ends in it")
        decryptor = Cipher(self._algorithm, modes.GCM(data_nonce(chunk.index), tag)).decryptor()
        decryptor.authenticate_additional_data(data_aad(self._digest, chunk))
        out = self._views[chunk.tensor][chunk.offset : chunk.offset + chunk.length]
        # The chunk is read in pieces the size of the scratch buffer, each decrypted straight
        # into the tensor while it is still in the CPU's cache. update_into wants room for a
        # cipher block beyond its data (cryptography 38 and later): a piece with fewer than
        # 15 bytes of the chunk after it sends its last 15 bytes through update() instead.
        done = 0
        while done < chunk.length:
            n = min(len(scratch), chunk.length - done)
            piece = scratch[:n]
            if os.preadv(fd, [piece], chunk.position + done) != n:
                raise WeightsError("weights-truncated", f"chunk {chunk.index}: the file ends in it")
            head = n if chunk.length - done - n >= 15 else max(0, n - 15)
            if head:
                decryptor.update_into(piece[:head], out[done : done + head + 15])
            if head < n:
                out[done + head : done + n] = decryptor.update(piece[head:])
            done += n
        try:
            decryptor.finalize()
        except InvalidTag:
            out[:] = bytes(len(out))
            info = self._table.tensors[chunk.tensor]
            raise WeightsError(
                "weights-chunk-tampered",
                f"chunk {chunk.index} (tensor {chunk.tensor} {info.name!r}, offset "
                f"{chunk.offset}) does not authenticate: changed, moved or from another file",
                chunk=chunk.index,
            ) from None


def _run(work: Callable[[Chunk], None], chunks: list[Chunk], threads: int) -> None:
    """Run ``work`` over every chunk; raise the failure of the lowest chunk that failed.

    Chunks start in order, so when chunk i fails every chunk before it has started and will
    finish: the lowest failing chunk is always found, whatever the threads' timing."""
    if threads <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            work(chunk)
        return
    failures: list[tuple[int, BaseException]] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="weights") as pool:
        futures: list[Future[None]] = [pool.submit(work, chunk) for chunk in chunks]

        def stop(done: Future[None]) -> None:
            if not done.cancelled() and done.exception() is not None:
                for future in futures:
                    future.cancel()

        for future in futures:
            future.add_done_callback(stop)
    for chunk, future in zip(chunks, futures, strict=True):
        if not future.cancelled() and (exc := future.exception()) is not None:
            failures.append((chunk.index, exc))
    if failures:
        raise min(failures, key=lambda f: f[0])[1]


def load_encrypted(
    path: str | os.PathLike[str],
    key: bytes | bytearray,
    *,
    model_id: str,
    key_id: str,
    threads: int | None = None,
    as_torch: bool = False,
    wipe_key: bool = False,
) -> dict[str, Any]:
    """Verify and decrypt an encrypted model file into ``{name: numpy array}``.

    Each tensor's array is allocated once and its chunks are decrypted in parallel
    (``threads``, default: the CPUs this process may use) straight into its memory, each
    chunk read with ``pread`` in pieces of at most ``READ_SIZE`` (256 KiB) into one buffer
    per thread, each piece decrypted while still in cache: extra memory is about ``threads x
    min(chunk_size, READ_SIZE)``, whatever the model's size. Every chunk is authenticated
    before this returns; on any failure every array is zeroed and a :class:`WeightsError` is
    raised, so no unauthenticated bytes escape. ``as_torch=True`` returns torch tensors
    sharing the arrays' memory (BF16 and 8-bit floats viewed as their torch dtypes; numpy
    gets their raw bits).

    ``wipe_key=True`` overwrites ``key`` (a bytearray) with zeros when done, success or not.
    This is best effort: Python and OpenSSL may hold copies of the key and of the keys
    derived from it (immutable ``bytes``) that nothing here can reach.
    """
    if wipe_key and not isinstance(key, bytearray):
        raise TypeError("wipe_key=True needs the key as a bytearray (bytes cannot be wiped)")
    try:
        return _load(
            Path(path), key, model_id=model_id, key_id=key_id, threads=threads, as_torch=as_torch
        )
    finally:
        if wipe_key:
            assert isinstance(key, bytearray)
            key[:] = bytes(len(key))


def _load(
    path: Path,
    key: bytes | bytearray,
    *,
    model_id: str,
    key_id: str,
    threads: int | None,
    as_torch: bool,
) -> dict[str, Any]:
    import numpy as np

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        header, table, keys, chunks = open_file(fd, key, model_id=model_id, key_id=key_id)
        arrays: list[npt.NDArray[Any]] = [
            np.empty(t.shape, dtype=np.dtype(DTYPES[t.dtype][1])) for t in table.tensors
        ]
        flat = [a.reshape(-1).view(np.uint8) for a in arrays]  # the arrays' own bytes
        try:
            work = _Decryptor(fd, keys, header, table, [f.data for f in flat])
            _run(work, chunks, threads or _default_threads())
        except BaseException:
            for f in flat:
                f[:] = 0
            raise
    finally:
        os.close(fd)
    result = {t.name: a for t, a in zip(table.tensors, arrays, strict=True)}
    return _to_torch(table.tensors, result) if as_torch else dict(result)


def _to_torch(tensors: Iterable[TensorInfo], arrays: dict[str, npt.NDArray[Any]]) -> dict[str, Any]:
    import importlib

    torch: Any = importlib.import_module("torch")
    out: dict[str, Any] = {}
    for info in tensors:
        tensor = torch.from_numpy(arrays[info.name])
        if info.dtype in _TORCH_VIEWS:
            tensor = tensor.view(getattr(torch, _TORCH_VIEWS[info.dtype]))
        out[info.name] = tensor
    return out
