"""Strict TPM marshalling: round trips, known layouts, and every way bytes can be wrong."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from embassy.attest import marshal as m
from embassy.attest.types import ClockInfo
from embassy.errors import KeyBindingError, WireFormatError


def _attest(**changes: object) -> m.Attest:
    fields: dict[str, object] = {
        "magic": m.TPM_GENERATED_VALUE,
        "type": m.TPM_ST_ATTEST_QUOTE,
        "qualified_signer": b"\x00\x0b" + bytes(32),
        "extra_data": b"nonce-1234",
        "clock": ClockInfo(clock=123456, reset_count=3, restart_count=1, safe=True),
        "firmware_version": 0x0102030405060708,
        "pcr_selection": (m.PcrSelection(m.TPM_ALG_SHA256, (0, 7, 16, 23)),),
        "pcr_digest": bytes(range(32)),
    }
    fields.update(changes)
    return m.Attest(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


# --- TPMS_ATTEST ---------------------------------------------------------------------------


def test_attest_round_trips() -> None:
    attest = _attest()
    assert m.parse_attest(m.encode_attest(attest)) == attest


def test_attest_known_layout() -> None:
    data = m.encode_attest(_attest())
    assert data[:6] == bytes.fromhex("ff5443478018")
    # count=1, SHA-256 bank, 3 select bytes: PCRs 0 and 7 -> 0x81, 16 and 23 -> 0x81
    assert bytes.fromhex("00000001000b03810081") in data
    assert data.endswith(b"\x00\x20" + bytes(range(32)))


def test_attest_header_reads_magic_and_type() -> None:
    data = m.encode_attest(_attest(magic=0x01020304, type=0x8014))
    assert m.attest_header(data) == (0x01020304, 0x8014)


def test_attest_every_truncation_is_rejected() -> None:
    data = m.encode_attest(_attest())
    for cut in range(len(data)):
        with pytest.raises(WireFormatError, match="truncated"):
            m.parse_attest(data[:cut])


def test_attest_trailing_bytes_rejected() -> None:
    data = m.encode_attest(_attest())
    with pytest.raises(WireFormatError, match=r"1 trailing bytes at offset \d+"):
        m.parse_attest(data + b"\x00")


def test_attest_oversize_tpm2b_rejected() -> None:
    with pytest.raises(WireFormatError, match="extraData at offset"):
        m.parse_attest(m.encode_attest(_attest(extra_data=bytes(67))))


def test_attest_other_type_rejected() -> None:
    with pytest.raises(WireFormatError, match="0x8014"):
        m.parse_attest(m.encode_attest(_attest(type=0x8014)))


def test_attest_bad_yes_no_rejected() -> None:
    data = bytearray(m.encode_attest(_attest()))
    safe_offset = 4 + 2 + 2 + 34 + 2 + 10 + 8 + 4 + 4
    assert data[safe_offset] == 1
    data[safe_offset] = 2
    with pytest.raises(WireFormatError, match=r"clockInfo\.safe"):
        m.parse_attest(bytes(data))


def test_reader_rejects_tpm2b_over_1024() -> None:
    r = m._Reader((1025).to_bytes(2, "big") + bytes(1025), "X")
    with pytest.raises(WireFormatError, match="at most 1024"):
        r.tpm2b("blob")


def test_reader_done_and_fields() -> None:
    r = m._Reader(bytes.fromhex("01 0203 04050607 08090a0b0c0d0e0f 0001aa"), "X")
    assert (r.u8("a"), r.u16("b"), r.u32("c")) == (1, 0x0203, 0x04050607)
    assert r.u64("d") == 0x08090A0B0C0D0E0F
    assert r.tpm2b("e") == b"\xaa"
    r.done()


# --- TPMT_SIGNATURE ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig",
    [
        m.Signature(m.TPM_ALG_ECDSA, m.TPM_ALG_SHA256, r=5, s=2**255 + 1),
        m.Signature(m.TPM_ALG_RSASSA, m.TPM_ALG_SHA256, rsa_sig=b"\x01" * 256),
        m.Signature(m.TPM_ALG_RSAPSS, m.TPM_ALG_SHA384, rsa_sig=b"\x02" * 384),
    ],
)
def test_signature_round_trips(sig: m.Signature) -> None:
    data = m.encode_signature(sig)
    assert m.parse_signature(data) == sig
    with pytest.raises(WireFormatError, match="trailing"):
        m.parse_signature(data + b"\x00")
    with pytest.raises(WireFormatError, match="truncated"):
        m.parse_signature(data[:-1])


def test_signature_ecdsa_layout() -> None:
    data = m.encode_signature(m.Signature(m.TPM_ALG_ECDSA, m.TPM_ALG_SHA256, r=1, s=2))
    assert data == bytes.fromhex("0018000b0020") + (1).to_bytes(32, "big") + bytes.fromhex(
        "0020"
    ) + (2).to_bytes(32, "big")


@pytest.mark.parametrize("alg", [m.TPM_ALG_NULL, m.TPM_ALG_HMAC, 0x001A])
def test_signature_unknown_alg_rejected(alg: int) -> None:
    with pytest.raises(WireFormatError, match="sigAlg"):
        m.parse_signature(alg.to_bytes(2, "big") + bytes.fromhex("000b0000"))


# --- TPMT_PUBLIC ---------------------------------------------------------------------------


def test_rsa_ek_template_known_layout(rsa_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_key.public_key())
    modulus = rsa_key.public_key().public_numbers().n.to_bytes(256, "big")
    expected = (
        bytes.fromhex("0001 000b 000300b2 0020")
        + m.EK_POLICY_SHA256
        + bytes.fromhex("0006 0080 0043 0010 0800 00000000 0100")
        + modulus
    )
    assert ek.raw == expected
    assert ek.name() == b"\x00\x0b" + hashlib.sha256(expected).digest()
    assert ek.has(m.EK_ATTRIBUTES)
    assert not ek.has(m.TPMA_OBJECT_SIGN)
    assert (ek.key_bits, ek.exponent, ek.symmetric) == (2048, 0, m.AES128_CFB)
    key = ek.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.public_numbers() == rsa_key.public_key().public_numbers()


def test_ecc_ak_round_trips(ec_key: ec.EllipticCurvePrivateKey) -> None:
    ak = m.ak_public_from_key(ec_key.public_key())
    assert m.parse_public(ak.raw) == ak
    assert m.encode_public(ak) == ak.raw
    assert (ak.type, ak.curve, ak.scheme, ak.scheme_hash) == (
        m.TPM_ALG_ECC,
        m.TPM_ECC_NIST_P256,
        m.TPM_ALG_ECDSA,
        m.TPM_ALG_SHA256,
    )
    assert ak.raw[:8] == bytes.fromhex("0023000b00050072")
    key = ak.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert key.public_numbers() == ec_key.public_key().public_numbers()


def test_public_2b(ec_key: ec.EllipticCurvePrivateKey) -> None:
    ak = m.ak_public_from_key(ec_key.public_key())
    framed = len(ak.raw).to_bytes(2, "big") + ak.raw
    assert m.parse_public_2b(framed) == ak
    with pytest.raises(WireFormatError, match="TPM2B_PUBLIC"):
        m.parse_public_2b(framed + b"\x00")
    with pytest.raises(WireFormatError, match="truncated"):
        m.parse_public_2b(framed[:-1])


def test_public_truncation_and_trailing(rsa_key: rsa.RSAPrivateKey) -> None:
    raw = m.ek_public_from_key(rsa_key.public_key()).raw
    for cut in (0, 1, 5, 10, 40, 48, 60, len(raw) - 1):
        with pytest.raises(WireFormatError, match="truncated"):
            m.parse_public(raw[:cut])
    with pytest.raises(WireFormatError, match="trailing"):
        m.parse_public(raw + b"\x00")


def test_keyedhash_round_trips() -> None:
    area = m.PublicArea(
        raw=b"",
        type=m.TPM_ALG_KEYEDHASH,
        name_alg=m.TPM_ALG_SHA256,
        attributes=m.TPMA_OBJECT_SIGN,
        scheme=m.TPM_ALG_HMAC,
        scheme_hash=m.TPM_ALG_SHA256,
        unique=bytes(32),
    )
    raw = m.encode_public(area)
    parsed = m.parse_public(raw)
    assert parsed.scheme == m.TPM_ALG_HMAC
    assert parsed.unique == bytes(32)
    with pytest.raises(KeyBindingError):
        parsed.public_key()


def _ecc_raw(ec_key: ec.EllipticCurvePrivateKey) -> bytearray:
    return bytearray(m.ak_public_from_key(ec_key.public_key()).raw)


def test_unknown_type_rejected(ec_key: ec.EllipticCurvePrivateKey) -> None:
    raw = _ecc_raw(ec_key)
    raw[0:2] = (0x0025).to_bytes(2, "big")
    with pytest.raises(WireFormatError, match="type 0x0025"):
        m.parse_public(bytes(raw))


def test_unknown_curve_rejected(ec_key: ec.EllipticCurvePrivateKey) -> None:
    raw = _ecc_raw(ec_key)
    # type, nameAlg, attributes, empty authPolicy, NULL symmetric, ECDSA+SHA256
    curve_offset = 2 + 2 + 4 + 2 + 2 + 4
    assert raw[curve_offset : curve_offset + 2] == b"\x00\x03"
    raw[curve_offset : curve_offset + 2] = b"\x00\x20"
    with pytest.raises(WireFormatError, match="curveID"):
        m.parse_public(bytes(raw))


def test_unknown_symmetric_and_scheme_rejected(ec_key: ec.EllipticCurvePrivateKey) -> None:
    raw = _ecc_raw(ec_key)
    bad_sym = bytes(raw[:10]) + b"\x00\x0a" + bytes(raw[12:])
    with pytest.raises(WireFormatError, match="block cipher"):
        m.parse_public(bad_sym)
    bad_scheme = bytes(raw[:12]) + b"\x00\x1a" + bytes(raw[14:])
    with pytest.raises(WireFormatError, match=r"parameters\.scheme\.scheme 0x001a"):
        m.parse_public(bad_scheme)


def test_point_off_curve_rejected(ec_key: ec.EllipticCurvePrivateKey) -> None:
    raw = _ecc_raw(ec_key)
    raw[-1] ^= 1
    area = m.parse_public(bytes(raw))
    with pytest.raises(WireFormatError, match="not on its curve"):
        area.public_key()


def test_rsa_key_bits_must_match_modulus(rsa_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_key.public_key())
    lying = m.parse_public(m.encode_public(replace(ek, key_bits=3072)))
    with pytest.raises(WireFormatError, match="keyBits"):
        lying.public_key()


def test_name_needs_hash_name_alg(rsa_key: rsa.RSAPrivateKey) -> None:
    ek = m.ek_public_from_key(rsa_key.public_key())
    odd = m.parse_public(m.encode_public(replace(ek, name_alg=0x0010)))
    with pytest.raises(WireFormatError, match="nameAlg"):
        odd.name()
