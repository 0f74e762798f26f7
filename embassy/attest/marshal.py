"""Big-endian TPM 2.0 marshalling of the few structures the verifier reads.

The auditor's verifier must parse TPMS_ATTEST, TPMT_SIGNATURE and TPMT_PUBLIC exactly as the
TPM wrote them, without tpm2-pytss, so an offline machine can check evidence with nothing but
``cryptography``. Parsing is strict: truncation, trailing bytes, oversized TPM2B fields and
algorithms whose layout we do not know are all :class:`WireFormatError`, each naming the
field and offset, because a lenient parser is where signature-checking code gets fooled.
The encoders exist to build test vectors; they ignore nothing the parsers read.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from embassy.attest.types import ClockInfo
from embassy.errors import KeyBindingError, WireFormatError

TPM_GENERATED_VALUE: Final = 0xFF544347
TPM_ST_ATTEST_QUOTE: Final = 0x8018

TPM_ALG_RSA: Final = 0x0001
TPM_ALG_SHA1: Final = 0x0004
TPM_ALG_HMAC: Final = 0x0005
TPM_ALG_AES: Final = 0x0006
TPM_ALG_MGF1: Final = 0x0007
TPM_ALG_KEYEDHASH: Final = 0x0008
TPM_ALG_XOR: Final = 0x000A
TPM_ALG_SHA256: Final = 0x000B
TPM_ALG_SHA384: Final = 0x000C
TPM_ALG_SHA512: Final = 0x000D
TPM_ALG_NULL: Final = 0x0010
TPM_ALG_SM4: Final = 0x0013
TPM_ALG_RSASSA: Final = 0x0014
TPM_ALG_RSAES: Final = 0x0015
TPM_ALG_RSAPSS: Final = 0x0016
TPM_ALG_OAEP: Final = 0x0017
TPM_ALG_ECDSA: Final = 0x0018
TPM_ALG_ECDH: Final = 0x0019
TPM_ALG_SM2: Final = 0x001B
TPM_ALG_ECSCHNORR: Final = 0x001C
TPM_ALG_KDF1_SP800_56A: Final = 0x0020
TPM_ALG_KDF2: Final = 0x0021
TPM_ALG_KDF1_SP800_108: Final = 0x0022
TPM_ALG_ECC: Final = 0x0023
TPM_ALG_SYMCIPHER: Final = 0x0025
TPM_ALG_CAMELLIA: Final = 0x0026
TPM_ALG_CFB: Final = 0x0043

TPM_ECC_NIST_P256: Final = 0x0003
TPM_ECC_NIST_P384: Final = 0x0004
TPM_ECC_NIST_P521: Final = 0x0005

TPMA_OBJECT_FIXEDTPM: Final = 1 << 1
TPMA_OBJECT_STCLEAR: Final = 1 << 2
TPMA_OBJECT_FIXEDPARENT: Final = 1 << 4
TPMA_OBJECT_SENSITIVEDATAORIGIN: Final = 1 << 5
TPMA_OBJECT_USERWITHAUTH: Final = 1 << 6
TPMA_OBJECT_ADMINWITHPOLICY: Final = 1 << 7
TPMA_OBJECT_NODA: Final = 1 << 10
TPMA_OBJECT_ENCRYPTEDDUPLICATION: Final = 1 << 11
TPMA_OBJECT_RESTRICTED: Final = 1 << 16
TPMA_OBJECT_DECRYPT: Final = 1 << 17
TPMA_OBJECT_SIGN: Final = 1 << 18

#: PolicySecret(TPM_RH_ENDORSEMENT), the authPolicy of the TCG default EK templates.
EK_POLICY_SHA256: Final = bytes.fromhex(
    "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
)
EK_ATTRIBUTES: Final = (
    TPMA_OBJECT_FIXEDTPM
    | TPMA_OBJECT_FIXEDPARENT
    | TPMA_OBJECT_SENSITIVEDATAORIGIN
    | TPMA_OBJECT_ADMINWITHPOLICY
    | TPMA_OBJECT_RESTRICTED
    | TPMA_OBJECT_DECRYPT
)
AK_ATTRIBUTES: Final = (
    TPMA_OBJECT_FIXEDTPM
    | TPMA_OBJECT_FIXEDPARENT
    | TPMA_OBJECT_SENSITIVEDATAORIGIN
    | TPMA_OBJECT_USERWITHAUTH
    | TPMA_OBJECT_RESTRICTED
    | TPMA_OBJECT_SIGN
)

MAX_TPM2B: Final = 1024
_MAX_DIGEST: Final = 64
_MAX_NAME: Final = 66  # sizeof(TPMU_NAME): a TPMT_HA with a SHA-512 digest
_MAX_RSA_BYTES: Final = 512
_MAX_ECC_BYTES: Final = 128
_MAX_PCR_SELECT: Final = 32
_MAX_PCR_BANKS: Final = 16

#: hashlib names of the hash algorithms a name or digest may use.
HASH_NAMES: Final = MappingProxyType(
    {
        TPM_ALG_SHA1: "sha1",
        TPM_ALG_SHA256: "sha256",
        TPM_ALG_SHA384: "sha384",
        TPM_ALG_SHA512: "sha512",
    }
)
#: TPM curve identifier -> (cryptography curve class, coordinate size in bytes).
CURVES: Final = MappingProxyType(
    {
        TPM_ECC_NIST_P256: (ec.SECP256R1, 32),
        TPM_ECC_NIST_P384: (ec.SECP384R1, 48),
        TPM_ECC_NIST_P521: (ec.SECP521R1, 66),
    }
)
_BLOCK_CIPHERS: Final = frozenset({TPM_ALG_AES, TPM_ALG_SM4, TPM_ALG_CAMELLIA})
_RSA_SCHEMES_WITH_HASH: Final = frozenset({TPM_ALG_RSASSA, TPM_ALG_RSAPSS, TPM_ALG_OAEP})
_ECC_SCHEMES_WITH_HASH: Final = frozenset(
    {TPM_ALG_ECDSA, TPM_ALG_ECDH, TPM_ALG_SM2, TPM_ALG_ECSCHNORR}
)
_KDFS: Final = frozenset(
    {TPM_ALG_MGF1, TPM_ALG_KDF1_SP800_56A, TPM_ALG_KDF2, TPM_ALG_KDF1_SP800_108}
)


class _Reader:
    """A cursor over ``data`` whose every failure names the structure, field and offset."""

    __slots__ = ("_data", "_offset", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._offset = 0
        self._what = what

    @property
    def offset(self) -> int:
        return self._offset

    def fail(self, message: str) -> WireFormatError:
        return WireFormatError(f"{self._what}: {message}")

    def take(self, n: int, field: str) -> bytes:
        left = len(self._data) - self._offset
        if n > left:
            raise self.fail(
                f"truncated at offset {self._offset} reading {field}: need {n} bytes, {left} left"
            )
        chunk = self._data[self._offset : self._offset + n]
        self._offset += n
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, max_size: int = MAX_TPM2B) -> bytes:
        at = self._offset
        size = self.u16(f"{field}.size")
        if size > max_size:
            raise self.fail(f"{field} at offset {at} is {size} bytes; at most {max_size} allowed")
        return self.take(size, field)

    def done(self) -> None:
        left = len(self._data) - self._offset
        if left:
            raise self.fail(f"{left} trailing bytes at offset {self._offset}")


class _Writer:
    """Accumulates big-endian fields; out-of-range values raise ValueError."""

    __slots__ = ("_parts",)

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def _int(self, value: int, size: int) -> _Writer:
        try:
            self._parts.append(value.to_bytes(size, "big"))
        except OverflowError:
            raise ValueError(f"{value} does not fit in {size} bytes") from None
        return self

    def u8(self, value: int) -> _Writer:
        return self._int(value, 1)

    def u16(self, value: int) -> _Writer:
        return self._int(value, 2)

    def u32(self, value: int) -> _Writer:
        return self._int(value, 4)

    def u64(self, value: int) -> _Writer:
        return self._int(value, 8)

    def raw(self, data: bytes) -> _Writer:
        self._parts.append(bytes(data))
        return self

    def tpm2b(self, data: bytes) -> _Writer:
        return self.u16(len(data)).raw(data)

    def getvalue(self) -> bytes:
        return b"".join(self._parts)


# --- TPMS_ATTEST ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """TPMS_PCR_SELECTION: one bank and the (ascending) PCR indices selected in it."""

    hash_alg: int
    pcrs: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Attest:
    """TPMS_ATTEST whose ``attested`` member is a TPMS_QUOTE_INFO."""

    magic: int
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: ClockInfo
    firmware_version: int
    pcr_selection: tuple[PcrSelection, ...]
    pcr_digest: bytes


def attest_header(data: bytes) -> tuple[int, int]:
    """(magic, type) of a marshalled TPMS_ATTEST, read before the type-dependent body."""
    r = _Reader(data, "TPMS_ATTEST")
    return r.u32("magic"), r.u16("type")


def _read_pcr_selection(r: _Reader, index: int) -> PcrSelection:
    hash_alg = r.u16(f"pcrSelect[{index}].hash")
    at = r.offset
    size = r.u8(f"pcrSelect[{index}].sizeofSelect")
    if size > _MAX_PCR_SELECT:
        raise r.fail(f"pcrSelect[{index}].sizeofSelect at offset {at} is {size}, too large")
    bitmap = r.take(size, f"pcrSelect[{index}].pcrSelect")
    pcrs = tuple(
        8 * i + bit for i, byte in enumerate(bitmap) for bit in range(8) if byte >> bit & 1
    )
    return PcrSelection(hash_alg, pcrs)


def _read_pcr_selections(r: _Reader) -> tuple[PcrSelection, ...]:
    at = r.offset
    count = r.u32("pcrSelect.count")
    if count > _MAX_PCR_BANKS:
        raise r.fail(f"pcrSelect.count at offset {at} is {count}, too large")
    return tuple(_read_pcr_selection(r, i) for i in range(count))


def _read_clock(r: _Reader) -> ClockInfo:
    clock = r.u64("clockInfo.clock")
    reset_count = r.u32("clockInfo.resetCount")
    restart_count = r.u32("clockInfo.restartCount")
    at = r.offset
    safe = r.u8("clockInfo.safe")
    if safe > 1:
        raise r.fail(f"clockInfo.safe at offset {at} is {safe}, not a TPMI_YES_NO")
    return ClockInfo(clock, reset_count, restart_count, bool(safe))


def parse_attest(data: bytes) -> Attest:
    """Parse a marshalled TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, strictly."""
    r = _Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    attest_type = r.u16("type")
    if attest_type != TPM_ST_ATTEST_QUOTE:
        raise r.fail(f"type is {attest_type:#06x}; only TPM_ST_ATTEST_QUOTE (0x8018) is parsed")
    qualified_signer = r.tpm2b("qualifiedSigner", _MAX_NAME)
    extra_data = r.tpm2b("extraData", _MAX_NAME)
    clock = _read_clock(r)
    firmware_version = r.u64("firmwareVersion")
    selection = _read_pcr_selections(r)
    digest = r.tpm2b("pcrDigest", _MAX_DIGEST)
    r.done()
    return Attest(
        magic, attest_type, qualified_signer, extra_data, clock, firmware_version, selection, digest
    )


def _write_pcr_selection(w: _Writer, sel: PcrSelection) -> None:
    size = max(3, (max(sel.pcrs, default=0) + 8) // 8)
    bitmap = bytearray(size)
    for pcr in sel.pcrs:
        bitmap[pcr // 8] |= 1 << (pcr % 8)
    w.u16(sel.hash_alg).u8(size).raw(bytes(bitmap))


def encode_attest(attest: Attest) -> bytes:
    """Marshal ``attest`` as a TPMS_ATTEST with a TPMS_QUOTE_INFO body."""
    w = _Writer().u32(attest.magic).u16(attest.type)
    w.tpm2b(attest.qualified_signer).tpm2b(attest.extra_data)
    c = attest.clock
    w.u64(c.clock).u32(c.reset_count).u32(c.restart_count).u8(int(c.safe))
    w.u64(attest.firmware_version).u32(len(attest.pcr_selection))
    for sel in attest.pcr_selection:
        _write_pcr_selection(w, sel)
    return w.tpm2b(attest.pcr_digest).getvalue()


# --- TPMT_SIGNATURE ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Signature:
    """TPMT_SIGNATURE: ECDSA carries ``r`` and ``s``; RSASSA and RSAPSS carry ``rsa_sig``."""

    alg: int
    hash_alg: int
    r: int = 0
    s: int = 0
    rsa_sig: bytes = b""


def parse_signature(data: bytes) -> Signature:
    """Parse a marshalled TPMT_SIGNATURE (ECDSA, RSASSA or RSAPSS), strictly."""
    r = _Reader(data, "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    if alg == TPM_ALG_ECDSA:
        hash_alg = r.u16("signature.hash")
        sig_r = int.from_bytes(r.tpm2b("signature.signatureR", _MAX_ECC_BYTES), "big")
        sig_s = int.from_bytes(r.tpm2b("signature.signatureS", _MAX_ECC_BYTES), "big")
        r.done()
        return Signature(alg, hash_alg, r=sig_r, s=sig_s)
    if alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        hash_alg = r.u16("signature.hash")
        sig = r.tpm2b("signature.sig", _MAX_RSA_BYTES)
        r.done()
        return Signature(alg, hash_alg, rsa_sig=sig)
    raise r.fail(f"sigAlg {alg:#06x} is not ECDSA, RSASSA or RSAPSS")


def encode_signature(sig: Signature, *, ecc_size: int = 32) -> bytes:
    """Marshal ``sig``; ECDSA r and s are left-padded to at least ``ecc_size`` bytes."""
    w = _Writer().u16(sig.alg).u16(sig.hash_alg)
    if sig.alg == TPM_ALG_ECDSA:
        for value in (sig.r, sig.s):
            w.tpm2b(value.to_bytes(max(ecc_size, (value.bit_length() + 7) // 8), "big"))
    elif sig.alg in (TPM_ALG_RSASSA, TPM_ALG_RSAPSS):
        w.tpm2b(sig.rsa_sig)
    else:
        raise ValueError(f"cannot encode signature algorithm {sig.alg:#06x}")
    return w.getvalue()


# --- TPMT_PUBLIC ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT; ``alg`` TPM_ALG_NULL means no symmetric algorithm."""

    alg: int
    key_bits: int = 0
    mode: int = TPM_ALG_NULL


NO_SYMMETRIC: Final = SymDef(TPM_ALG_NULL)
AES128_CFB: Final = SymDef(TPM_ALG_AES, 128, TPM_ALG_CFB)


@dataclass(frozen=True, slots=True)
class PublicArea:
    """TPMT_PUBLIC. ``raw`` is the exact marshalled input; the name is computed over it.

    Only the fields of the object's ``type`` are meaningful: RSA uses ``key_bits``,
    ``exponent`` and ``unique`` (the modulus); ECC uses ``curve``, ``kdf``/``kdf_hash`` and
    ``x``/``y``; KEYEDHASH uses ``scheme``/``scheme_hash`` (and ``kdf`` for XOR) and
    ``unique``. :func:`encode_public` ignores ``raw``.
    """

    raw: bytes
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes = b""
    symmetric: SymDef = NO_SYMMETRIC
    scheme: int = TPM_ALG_NULL
    scheme_hash: int = TPM_ALG_NULL
    key_bits: int = 0
    exponent: int = 0
    curve: int = 0
    kdf: int = TPM_ALG_NULL
    kdf_hash: int = TPM_ALG_NULL
    unique: bytes = b""
    x: bytes = b""
    y: bytes = b""

    def has(self, attr_bits: int) -> bool:
        """Whether every TPMA_OBJECT bit in ``attr_bits`` is set."""
        return self.attributes & attr_bits == attr_bits

    def name(self) -> bytes:
        """The TPM name: nameAlg (u16) followed by H_nameAlg(TPMT_PUBLIC)."""
        hash_name = HASH_NAMES.get(self.name_alg)
        if hash_name is None:
            raise WireFormatError(f"TPMT_PUBLIC: nameAlg {self.name_alg:#06x} is not a hash")
        return self.name_alg.to_bytes(2, "big") + hashlib.new(hash_name, self.raw).digest()

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key as a ``cryptography`` object (an RSA exponent of 0 means 65537)."""
        if self.type == TPM_ALG_RSA:
            return self._rsa_key()
        if self.type == TPM_ALG_ECC:
            return self._ecc_key()
        raise KeyBindingError(f"object of type {self.type:#06x} has no asymmetric public key")

    def _rsa_key(self) -> rsa.RSAPublicKey:
        if len(self.unique) * 8 != self.key_bits:
            raise WireFormatError(
                f"TPMT_PUBLIC: RSA modulus is {len(self.unique)} bytes but keyBits is "
                f"{self.key_bits}"
            )
        exponent = self.exponent or 65537
        try:
            numbers = rsa.RSAPublicNumbers(exponent, int.from_bytes(self.unique, "big"))
            return numbers.public_key()
        except ValueError as exc:
            raise WireFormatError(f"TPMT_PUBLIC: not a usable RSA key: {exc}") from None

    def _ecc_key(self) -> ec.EllipticCurvePublicKey:
        curve_cls, size = CURVES[self.curve]  # parse_public admits only known curves
        if len(self.x) > size or len(self.y) > size:
            raise WireFormatError(f"TPMT_PUBLIC: ECC coordinate longer than {size} bytes")
        point = b"\x04" + self.x.rjust(size, b"\x00") + self.y.rjust(size, b"\x00")
        try:
            return ec.EllipticCurvePublicKey.from_encoded_point(curve_cls(), point)
        except ValueError:
            raise WireFormatError("TPMT_PUBLIC: the ECC point is not on its curve") from None


def _read_symdef(r: _Reader, field: str) -> SymDef:
    at = r.offset
    alg = r.u16(f"{field}.algorithm")
    if alg == TPM_ALG_NULL:
        return NO_SYMMETRIC
    if alg not in _BLOCK_CIPHERS:
        raise r.fail(f"{field}.algorithm {alg:#06x} at offset {at} is not a known block cipher")
    return SymDef(alg, r.u16(f"{field}.keyBits"), r.u16(f"{field}.mode"))


def _read_scheme(r: _Reader, field: str, with_hash: frozenset[int]) -> tuple[int, int]:
    at = r.offset
    scheme = r.u16(f"{field}.scheme")
    if scheme in with_hash:
        return scheme, r.u16(f"{field}.details.hashAlg")
    if scheme == TPM_ALG_NULL or (scheme == TPM_ALG_RSAES and TPM_ALG_OAEP in with_hash):
        return scheme, TPM_ALG_NULL
    raise r.fail(f"{field}.scheme {scheme:#06x} at offset {at} is not supported")


def _read_rsa(r: _Reader, base: PublicArea) -> PublicArea:
    symmetric = _read_symdef(r, "parameters.symmetric")
    scheme, scheme_hash = _read_scheme(r, "parameters.scheme", _RSA_SCHEMES_WITH_HASH)
    key_bits = r.u16("parameters.keyBits")
    exponent = r.u32("parameters.exponent")
    unique = r.tpm2b("unique.rsa", _MAX_RSA_BYTES)
    return replace(
        base,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        key_bits=key_bits,
        exponent=exponent,
        unique=unique,
    )


def _read_ecc(r: _Reader, base: PublicArea) -> PublicArea:
    symmetric = _read_symdef(r, "parameters.symmetric")
    scheme, scheme_hash = _read_scheme(r, "parameters.scheme", _ECC_SCHEMES_WITH_HASH)
    at = r.offset
    curve = r.u16("parameters.curveID")
    if curve not in CURVES:
        raise r.fail(f"parameters.curveID {curve:#06x} at offset {at} is not a supported curve")
    kdf, kdf_hash = _read_scheme(r, "parameters.kdf", _KDFS)
    x = r.tpm2b("unique.ecc.x", _MAX_ECC_BYTES)
    y = r.tpm2b("unique.ecc.y", _MAX_ECC_BYTES)
    return replace(
        base,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
        curve=curve,
        kdf=kdf,
        kdf_hash=kdf_hash,
        x=x,
        y=y,
    )


def _read_keyedhash(r: _Reader, base: PublicArea) -> PublicArea:
    at = r.offset
    scheme = r.u16("parameters.scheme.scheme")
    scheme_hash = kdf = TPM_ALG_NULL
    if scheme in (TPM_ALG_HMAC, TPM_ALG_XOR):
        scheme_hash = r.u16("parameters.scheme.details.hashAlg")
    if scheme == TPM_ALG_XOR:
        kdf = r.u16("parameters.scheme.details.kdf")
    elif scheme not in (TPM_ALG_HMAC, TPM_ALG_NULL):
        raise r.fail(f"keyedHash scheme {scheme:#06x} at offset {at} is not supported")
    unique = r.tpm2b("unique.keyedHash", _MAX_DIGEST)
    return replace(base, scheme=scheme, scheme_hash=scheme_hash, kdf=kdf, unique=unique)


def parse_public(data: bytes) -> PublicArea:
    """Parse a marshalled TPMT_PUBLIC (no size prefix), strictly."""
    r = _Reader(data, "TPMT_PUBLIC")
    obj_type = r.u16("type")
    base = PublicArea(
        raw=bytes(data),
        type=obj_type,
        name_alg=r.u16("nameAlg"),
        attributes=r.u32("objectAttributes"),
        auth_policy=r.tpm2b("authPolicy", _MAX_DIGEST),
    )
    if obj_type == TPM_ALG_RSA:
        area = _read_rsa(r, base)
    elif obj_type == TPM_ALG_ECC:
        area = _read_ecc(r, base)
    elif obj_type == TPM_ALG_KEYEDHASH:
        area = _read_keyedhash(r, base)
    else:
        raise r.fail(f"type {obj_type:#06x} at offset 0 is not RSA, ECC or KEYEDHASH")
    r.done()
    return area


def parse_public_2b(data: bytes) -> PublicArea:
    """Parse a TPM2B_PUBLIC: a u16 size followed by exactly that many bytes of TPMT_PUBLIC."""
    r = _Reader(data, "TPM2B_PUBLIC")
    inner = r.tpm2b("publicArea")
    r.done()
    return parse_public(inner)


def _write_symdef(w: _Writer, sym: SymDef) -> None:
    w.u16(sym.alg)
    if sym.alg != TPM_ALG_NULL:
        w.u16(sym.key_bits).u16(sym.mode)


def _write_scheme(w: _Writer, scheme: int, scheme_hash: int) -> None:
    w.u16(scheme)
    if scheme not in (TPM_ALG_NULL, TPM_ALG_RSAES):
        w.u16(scheme_hash)


def encode_public(area: PublicArea) -> bytes:
    """Marshal ``area`` as a TPMT_PUBLIC (``area.raw`` is ignored)."""
    w = _Writer().u16(area.type).u16(area.name_alg).u32(area.attributes).tpm2b(area.auth_policy)
    if area.type == TPM_ALG_RSA:
        _write_symdef(w, area.symmetric)
        _write_scheme(w, area.scheme, area.scheme_hash)
        w.u16(area.key_bits).u32(area.exponent).tpm2b(area.unique)
    elif area.type == TPM_ALG_ECC:
        _write_symdef(w, area.symmetric)
        _write_scheme(w, area.scheme, area.scheme_hash)
        w.u16(area.curve)
        _write_scheme(w, area.kdf, area.kdf_hash)
        w.tpm2b(area.x).tpm2b(area.y)
    elif area.type == TPM_ALG_KEYEDHASH:
        _write_scheme(w, area.scheme, area.scheme_hash)
        if area.scheme == TPM_ALG_XOR:
            w.u16(area.kdf)
        w.tpm2b(area.unique)
    else:
        raise ValueError(f"cannot encode object type {area.type:#06x}")
    return w.getvalue()


def _curve_id(key: ec.EllipticCurvePublicKey) -> tuple[int, int]:
    for curve_id, (curve_cls, size) in CURVES.items():
        if isinstance(key.curve, curve_cls):
            return curve_id, size
    raise ValueError(f"curve {key.curve.name} has no TPM identifier here")


def public_from_key(
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    attributes: int,
    auth_policy: bytes = b"",
    symmetric: SymDef = NO_SYMMETRIC,
    scheme: int = TPM_ALG_NULL,
    scheme_hash: int = TPM_ALG_NULL,
    name_alg: int = TPM_ALG_SHA256,
) -> PublicArea:
    """Build, marshal and re-parse a TPMT_PUBLIC for a ``cryptography`` key (test vectors)."""
    common = PublicArea(
        raw=b"",
        type=TPM_ALG_RSA,
        name_alg=name_alg,
        attributes=attributes,
        auth_policy=auth_policy,
        symmetric=symmetric,
        scheme=scheme,
        scheme_hash=scheme_hash,
    )
    if isinstance(key, rsa.RSAPublicKey):
        n = key.public_numbers().n
        exponent = key.public_numbers().e
        template = replace(
            common,
            key_bits=key.key_size,
            exponent=0 if exponent == 65537 else exponent,
            unique=n.to_bytes(key.key_size // 8, "big"),
        )
    else:
        curve, size = _curve_id(key)
        numbers = key.public_numbers()
        template = replace(
            common,
            type=TPM_ALG_ECC,
            curve=curve,
            x=numbers.x.to_bytes(size, "big"),
            y=numbers.y.to_bytes(size, "big"),
        )
    return parse_public(encode_public(template))


def ak_public_from_key(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> PublicArea:
    """A restricted signing AK: ECDSA-SHA256 for ECC keys, RSASSA-SHA256 for RSA keys."""
    scheme = TPM_ALG_RSASSA if isinstance(key, rsa.RSAPublicKey) else TPM_ALG_ECDSA
    return public_from_key(key, attributes=AK_ATTRIBUTES, scheme=scheme, scheme_hash=TPM_ALG_SHA256)


def ek_public_from_key(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> PublicArea:
    """A TCG default EK (template L-1 for RSA 2048, L-2 for ECC P-256)."""
    return public_from_key(
        key, attributes=EK_ATTRIBUTES, auth_policy=EK_POLICY_SHA256, symmetric=AES128_CFB
    )
