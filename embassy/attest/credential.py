"""TPM2_MakeCredential in pure Python: prove an AK and an EK live in the same TPM.

The EK certificate vouches for the EK; the quote is signed by the AK. Nothing links the
two until the challenger encrypts a secret to the EK, bound to the AK's name, and the TPM
gives it back: TPM2_ActivateCredential releases the secret only if the EK's private key is
in that TPM *and* an object with exactly that name (the AK) is loaded beside it. This
module is the challenger's half (TPM 2.0 Part 1, "Credential Protection"), so the
auditor needs no TPM to issue the challenge.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from embassy.attest.marshal import (
    CURVES,
    HASH_NAMES,
    TPM_ALG_AES,
    TPM_ALG_CFB,
    TPM_ALG_ECC,
    TPM_ALG_RSA,
    TPM_ALG_SHA1,
    PublicArea,
)
from embassy.errors import KeyBindingError, WireFormatError

MAX_SECRET = 32
_IDENTITY = b"IDENTITY"
_STORAGE = b"STORAGE"
_INTEGRITY = b"INTEGRITY"


def _nul_terminated(label: bytes) -> bytes:
    return label if label.endswith(b"\x00") else label + b"\x00"


def _hash_name(hash_alg: int) -> str:
    name = HASH_NAMES.get(hash_alg)
    if name is None:
        raise KeyBindingError(f"hash algorithm {hash_alg:#06x} is not supported")
    return name


def _truncate(stream: bytes, bits: int) -> bytes:
    out = bytearray(stream[: (bits + 7) // 8])
    if bits % 8:
        out[0] &= (1 << (bits % 8)) - 1
    return bytes(out)


def kdfa(  # noqa: PLR0917 - the argument order of KDFa in TPM 2.0 Part 1
    hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """KDFa: SP800-108 counter-mode HMAC, with ``label`` NUL-terminated as the TPM does."""
    name = _hash_name(hash_alg)
    fixed = _nul_terminated(label) + context_u + context_v + bits.to_bytes(4, "big")
    size = hashlib.new(name).digest_size
    blocks = (bits + 8 * size - 1) // (8 * size)
    stream = b"".join(
        hmac.new(key, i.to_bytes(4, "big") + fixed, name).digest() for i in range(1, blocks + 1)
    )
    return _truncate(stream, bits)


def kdfe(  # noqa: PLR0917 - the argument order of KDFe in TPM 2.0 Part 1
    hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int
) -> bytes:
    """KDFe: the SP800-56A concatenation KDF the TPM uses to derive seeds from ECDH."""
    name = _hash_name(hash_alg)
    fixed = z + _nul_terminated(label) + party_u + party_v
    size = hashlib.new(name).digest_size
    blocks = (bits + 8 * size - 1) // (8 * size)
    stream = b"".join(
        hashlib.new(name, i.to_bytes(4, "big") + fixed).digest() for i in range(1, blocks + 1)
    )
    return _truncate(stream, bits)


def _check_ek(ek: PublicArea) -> None:
    if ek.name_alg == TPM_ALG_SHA1:
        raise KeyBindingError("EKs with a SHA-1 nameAlg are not supported")
    _hash_name(ek.name_alg)
    sym = ek.symmetric
    if sym.alg != TPM_ALG_AES or sym.mode != TPM_ALG_CFB or sym.key_bits not in (128, 256):
        raise KeyBindingError("the EK's symmetric algorithm is not AES-128/256 in CFB mode")


def _check_name(ak_name: bytes) -> None:
    alg = int.from_bytes(ak_name[:2], "big")
    hash_name = HASH_NAMES.get(alg)
    if hash_name is None or len(ak_name) != 2 + hashlib.new(hash_name).digest_size:
        raise WireFormatError(f"{ak_name.hex()!r} is not a TPM object name (alg || digest)")


def _cryptography_hash(hash_alg: int) -> hashes.HashAlgorithm:
    name = _hash_name(hash_alg)
    if name == "sha384":
        return hashes.SHA384()
    if name == "sha512":
        return hashes.SHA512()
    return hashes.SHA256()  # _check_ek has refused SHA-1


def _rsa_seed(ek: PublicArea, seed: bytes | None) -> tuple[bytes, bytes]:
    key = ek.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    size = hashlib.new(_hash_name(ek.name_alg)).digest_size
    seed = os.urandom(size) if seed is None else seed
    if len(seed) != size:
        raise ValueError(f"the seed must be {size} bytes (the EK nameAlg's digest size)")
    algorithm = _cryptography_hash(ek.name_alg)
    oaep = padding.OAEP(padding.MGF1(algorithm), algorithm, _nul_terminated(_IDENTITY))
    return seed, key.encrypt(seed, oaep)


def _ecc_seed(ek: PublicArea, ephemeral: ec.EllipticCurvePrivateKey | None) -> tuple[bytes, bytes]:
    key = ek.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    size = CURVES[ek.curve][1]
    eph = ec.generate_private_key(key.curve) if ephemeral is None else ephemeral
    z = eph.exchange(ec.ECDH(), key)
    numbers = eph.public_key().public_numbers()
    eph_x, eph_y = numbers.x.to_bytes(size, "big"), numbers.y.to_bytes(size, "big")
    bits = 8 * hashlib.new(_hash_name(ek.name_alg)).digest_size
    seed = kdfe(ek.name_alg, z, _IDENTITY, eph_x, ek.x, bits)
    point = len(eph_x).to_bytes(2, "big") + eph_x + len(eph_y).to_bytes(2, "big") + eph_y
    return seed, point


def _protect(ek: PublicArea, seed: bytes, ak_name: bytes, secret: bytes) -> bytes:
    sym_key = kdfa(ek.name_alg, seed, _STORAGE, ak_name, b"", ek.symmetric.key_bits)
    plain = len(secret).to_bytes(2, "big") + secret
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(plain) + encryptor.finalize()
    digest_bits = 8 * hashlib.new(_hash_name(ek.name_alg)).digest_size
    hmac_key = kdfa(ek.name_alg, seed, _INTEGRITY, b"", b"", digest_bits)
    outer = hmac.new(hmac_key, enc_identity + ak_name, _hash_name(ek.name_alg)).digest()
    return len(outer).to_bytes(2, "big") + outer + enc_identity


def make_credential(
    ek: PublicArea,
    ak_name: bytes,
    secret: bytes,
    *,
    seed: bytes | None = None,
    ephemeral: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential: (credential_blob, encrypted_secret) for ActivateCredential.

    Both are the payloads of TPM2B_ID_OBJECT and TPM2B_ENCRYPTED_SECRET, without their
    outer size. ``seed`` (RSA EKs) and ``ephemeral`` (ECC EKs) are for deterministic tests.
    """
    if not 1 <= len(secret) <= MAX_SECRET:
        raise ValueError(f"the secret must be 1..{MAX_SECRET} bytes, not {len(secret)}")
    _check_name(ak_name)
    _check_ek(ek)
    if ek.type == TPM_ALG_RSA:
        if ephemeral is not None:
            raise ValueError("an ephemeral ECC key makes no sense for an RSA EK")
        used_seed, encrypted_secret = _rsa_seed(ek, seed)
    elif ek.type == TPM_ALG_ECC:
        if seed is not None:
            raise ValueError("the seed of an ECC EK comes from ECDH; pass ephemeral instead")
        used_seed, encrypted_secret = _ecc_seed(ek, ephemeral)
    else:
        raise KeyBindingError(f"an EK of type {ek.type:#06x} cannot receive credentials")
    return _protect(ek, used_seed, ak_name, secret), encrypted_secret


def check_activation(expected_secret: bytes, returned: bytes) -> None:
    """Raise unless the TPM gave back exactly the secret (compared in constant time)."""
    if not hmac.compare_digest(expected_secret, returned):
        raise KeyBindingError(
            "the TPM that holds the EK did not recover the credential: the AK is not in that TPM"
        )
