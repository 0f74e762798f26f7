"""MakeCredential, checked against an ActivateCredential written here from the spec."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode

from embassy.attest import marshal as m
from embassy.attest.credential import check_activation, kdfa, kdfe, make_credential
from embassy.errors import KeyBindingError, WireFormatError

AK_NAME = b"\x00\x0b" + hashlib.sha256(b"an AK public area").digest()
SECRET = b"challenge-secret-0123456789abcde"


@pytest.fixture(scope="module")
def rsa_ek_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def ecc_ek_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


class IntegrityError(Exception):
    """The test-side TPM refuses the credential (TPM_RC_INTEGRITY)."""


def _hand_kdfa(key: bytes, label: bytes, u: bytes, v: bytes, bits: int) -> bytes:
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        msg = counter.to_bytes(4, "big") + label + b"\x00" + u + v + bits.to_bytes(4, "big")
        out += hmac.digest(key, msg, "sha256")
        counter += 1
    return out[: bits // 8]


def _activate(seed: bytes, ak_name: bytes, blob: bytes) -> bytes:
    """The TPM's side of TPM2_ActivateCredential, once the seed is recovered."""
    hmac_size = int.from_bytes(blob[:2], "big")
    outer, enc_identity = blob[2 : 2 + hmac_size], blob[2 + hmac_size :]
    hmac_key = _hand_kdfa(seed, b"INTEGRITY", b"", b"", 256)
    if not hmac.compare_digest(outer, hmac.digest(hmac_key, enc_identity + ak_name, "sha256")):
        raise IntegrityError
    sym_key = _hand_kdfa(seed, b"STORAGE", ak_name, b"", 128)
    decryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    size = int.from_bytes(plain[:2], "big")
    assert len(plain) == 2 + size
    return plain[2:]


def _rsa_seed(key: rsa.RSAPrivateKey, encrypted_secret: bytes) -> bytes:
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"IDENTITY\x00")
    return key.decrypt(encrypted_secret, oaep)


def _ecc_seed(key: ec.EllipticCurvePrivateKey, encrypted_secret: bytes, ek_x: bytes) -> bytes:
    x_size = int.from_bytes(encrypted_secret[:2], "big")
    x = encrypted_secret[2 : 2 + x_size]
    y_size = int.from_bytes(encrypted_secret[2 + x_size : 4 + x_size], "big")
    y = encrypted_secret[4 + x_size :]
    assert len(y) == y_size
    point = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, b"\x04" + x + y)
    z = key.exchange(ec.ECDH(), point)
    concat = ConcatKDFHash(hashes.SHA256(), 32, otherinfo=b"IDENTITY\x00" + x + ek_x)
    return concat.derive(z)


# --- KDFs ----------------------------------------------------------------------------------


def test_kdfa_matches_cryptography_kbkdf() -> None:
    seed = bytes(range(32))
    reference = KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=16,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=b"STORAGE",  # KBKDF puts the 0x00 separator after the label, as the TPM does
        context=AK_NAME,
        fixed=None,
    ).derive(seed)
    assert kdfa(m.TPM_ALG_SHA256, seed, b"STORAGE", AK_NAME, b"", 128) == reference


def test_kdfa_multi_block_known_answer() -> None:
    key = b"k" * 32
    expected = _hand_kdfa(key, b"INTEGRITY", b"u", b"v", 512)
    assert len(expected) == 64
    assert kdfa(m.TPM_ALG_SHA256, key, b"INTEGRITY", b"u", b"v", 512) == expected
    assert kdfa(m.TPM_ALG_SHA256, key, b"INTEGRITY\x00", b"u", b"v", 512) == expected
    assert kdfa(m.TPM_ALG_SHA256, key, b"INTEGRITX", b"u", b"v", 512) != expected


def test_kdfa_masks_partial_byte() -> None:
    full = hmac.digest(b"k", b"\x00\x00\x00\x01L\x00\x00\x00\x00\x0c", "sha256")
    out = kdfa(m.TPM_ALG_SHA256, b"k", b"L", b"", b"", 12)
    assert out == bytes([full[0] & 0x0F, full[1]])


def test_kdfe_matches_concat_kdf() -> None:
    z, u, v = b"z" * 32, b"u" * 32, b"v" * 32
    reference = ConcatKDFHash(hashes.SHA256(), 32, otherinfo=b"IDENTITY\x00" + u + v).derive(z)
    assert kdfe(m.TPM_ALG_SHA256, z, b"IDENTITY", u, v, 256) == reference


def test_kdf_unknown_hash() -> None:
    with pytest.raises(KeyBindingError, match="0x0010"):
        kdfa(m.TPM_ALG_NULL, b"k", b"L", b"", b"", 128)


# --- MakeCredential, RSA EK ----------------------------------------------------------------


def test_rsa_round_trip(rsa_ek_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    blob, encrypted_secret = make_credential(ek, AK_NAME, SECRET)
    assert len(encrypted_secret) == 256
    seed = _rsa_seed(rsa_ek_key, encrypted_secret)
    recovered = _activate(seed, AK_NAME, blob)
    assert recovered == SECRET
    check_activation(SECRET, recovered)


def test_rsa_fixed_seed_is_deterministic(rsa_ek_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    seed = b"s" * 32
    blob, encrypted_secret = make_credential(ek, AK_NAME, b"x", seed=seed)
    assert _rsa_seed(rsa_ek_key, encrypted_secret) == seed
    assert blob == make_credential(ek, AK_NAME, b"x", seed=seed)[0]
    # TPM2B(hmac) || AES-CFB(TPM2B(secret)): 2 + 32 + 2 + 1 bytes
    assert len(blob) == 37
    assert blob[:2] == b"\x00\x20"


def test_tampered_blob_fails_integrity(rsa_ek_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    blob, encrypted_secret = make_credential(ek, AK_NAME, SECRET)
    seed = _rsa_seed(rsa_ek_key, encrypted_secret)
    tampered = bytearray(blob)
    tampered[-1] ^= 1
    with pytest.raises(IntegrityError):
        _activate(seed, AK_NAME, bytes(tampered))


def test_wrong_ak_name_fails_integrity(rsa_ek_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    blob, encrypted_secret = make_credential(ek, AK_NAME, SECRET)
    seed = _rsa_seed(rsa_ek_key, encrypted_secret)
    other_name = b"\x00\x0b" + hashlib.sha256(b"another AK").digest()
    with pytest.raises(IntegrityError):
        _activate(seed, other_name, blob)


def test_other_ek_cannot_recover_seed(rsa_ek_key: rsa.RSAPrivateKey) -> None:
    other = rsa.generate_private_key(65537, 2048)
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    _, encrypted_secret = make_credential(ek, AK_NAME, SECRET)
    with pytest.raises(ValueError, match="Decryption failed"):
        _rsa_seed(other, encrypted_secret)


# --- MakeCredential, ECC EK ----------------------------------------------------------------


def test_ecc_round_trip(ecc_ek_key: ec.EllipticCurvePrivateKey) -> None:
    ek = m.ek_public_from_key(ecc_ek_key.public_key())
    blob, encrypted_secret = make_credential(ek, AK_NAME, SECRET)
    assert len(encrypted_secret) == 2 + 32 + 2 + 32
    seed = _ecc_seed(ecc_ek_key, encrypted_secret, ek.x)
    assert _activate(seed, AK_NAME, blob) == SECRET
    other_name = b"\x00\x0b" + bytes(32)
    with pytest.raises(IntegrityError):
        _activate(seed, other_name, blob)


def test_ecc_wrong_ek_fails(ecc_ek_key: ec.EllipticCurvePrivateKey) -> None:
    ek = m.ek_public_from_key(ecc_ek_key.public_key())
    blob, encrypted_secret = make_credential(ek, AK_NAME, SECRET)
    other = ec.generate_private_key(ec.SECP256R1())
    seed = _ecc_seed(other, encrypted_secret, ek.x)
    with pytest.raises(IntegrityError):
        _activate(seed, AK_NAME, blob)


# --- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("secret", [b"", bytes(33)])
def test_secret_size(rsa_ek_key: rsa.RSAPrivateKey, secret: bytes) -> None:
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    with pytest.raises(ValueError, match=r"1\.\.32"):
        make_credential(ek, AK_NAME, secret)


@pytest.mark.parametrize("name", [b"", b"\x00\x0b" + bytes(31), b"\x00\x10" + bytes(32)])
def test_bad_ak_name(rsa_ek_key: rsa.RSAPrivateKey, name: bytes) -> None:
    ek = m.ek_public_from_key(rsa_ek_key.public_key())
    with pytest.raises(WireFormatError, match="not a TPM object name"):
        make_credential(ek, name, SECRET)


def test_keyedhash_ek_refused() -> None:
    area = m.PublicArea(
        raw=b"",
        type=m.TPM_ALG_KEYEDHASH,
        name_alg=m.TPM_ALG_SHA256,
        attributes=0,
        symmetric=m.AES128_CFB,
    )
    with pytest.raises(KeyBindingError, match="cannot receive credentials"):
        make_credential(area, AK_NAME, SECRET)


def test_ek_without_aes_cfb_refused(rsa_ek_key: rsa.RSAPrivateKey) -> None:
    ek = m.public_from_key(rsa_ek_key.public_key(), attributes=m.EK_ATTRIBUTES)
    with pytest.raises(KeyBindingError, match="AES"):
        make_credential(ek, AK_NAME, SECRET)


def test_check_activation() -> None:
    check_activation(SECRET, SECRET)
    with pytest.raises(KeyBindingError, match="the AK is not in that TPM"):
        check_activation(SECRET, SECRET[:-1] + b"\x00")
