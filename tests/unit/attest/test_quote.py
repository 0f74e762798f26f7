"""Quote verification: signed vectors built here, then broken one link at a time."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from embassy.attest import marshal as m
from embassy.attest.quote import (
    check_qualifying_data,
    pcr_digest,
    verify_ak_attributes,
    verify_quote,
)
from embassy.attest.types import ClockInfo, Quote
from embassy.errors import (
    FreshnessError,
    KeyBindingError,
    PcrMismatchError,
    QuoteError,
    SignatureError,
    WireFormatError,
)

PCRS = {0: b"\x00" * 32, 7: b"\x07" * 32, 16: b"\x10" * 32}
NONCE = bytes(range(32))

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


def _attest_bytes(pcrs: dict[int, bytes], **changes: object) -> bytes:
    selection = (m.PcrSelection(m.TPM_ALG_SHA256, tuple(sorted(pcrs))),)
    fields: dict[str, object] = {
        "magic": m.TPM_GENERATED_VALUE,
        "type": m.TPM_ST_ATTEST_QUOTE,
        "qualified_signer": b"\x00\x0b" + bytes(32),
        "extra_data": NONCE,
        "clock": ClockInfo(clock=1000, reset_count=2, restart_count=0, safe=True),
        "firmware_version": 42,
        "pcr_selection": selection,
        "pcr_digest": hashlib.sha256(b"".join(pcrs[i] for i in sorted(pcrs))).digest(),
    }
    fields.update(changes)
    return m.encode_attest(m.Attest(**fields))  # type: ignore[arg-type]


def _sign(key: PrivateKey, attest: bytes, alg: int = 0, *, salt: int = 32) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(attest, ec.ECDSA(hashes.SHA256())))
        return m.encode_signature(m.Signature(m.TPM_ALG_ECDSA, m.TPM_ALG_SHA256, r=r, s=s))
    if alg == m.TPM_ALG_RSAPSS:
        pss = padding.PSS(padding.MGF1(hashes.SHA256()), salt)
        sig = key.sign(attest, pss, hashes.SHA256())
    else:
        alg = m.TPM_ALG_RSASSA
        sig = key.sign(attest, padding.PKCS1v15(), hashes.SHA256())
    return m.encode_signature(m.Signature(alg, m.TPM_ALG_SHA256, rsa_sig=sig))


def _quote(key: PrivateKey, pcrs: dict[int, bytes] = PCRS, **changes: object) -> Quote:
    attest = _attest_bytes(pcrs, **changes)
    return Quote(attest=attest, signature=_sign(key, attest), pcrs=dict(pcrs))


def _ak(key: PrivateKey) -> m.PublicArea:
    return m.ak_public_from_key(key.public_key())


def test_good_ecc_quote_passes(ec_key: ec.EllipticCurvePrivateKey) -> None:
    attest = verify_quote(_quote(ec_key), _ak(ec_key))
    assert attest.extra_data == NONCE
    assert attest.pcr_selection[0].pcrs == (0, 7, 16)
    assert attest.clock.reset_count == 2


def test_good_rsassa_quote_passes(rsa_key: rsa.RSAPrivateKey) -> None:
    verify_quote(_quote(rsa_key), _ak(rsa_key))


@pytest.mark.parametrize("salt", [32, padding.PSS.MAX_LENGTH])
def test_good_rsapss_quote_passes(rsa_key: rsa.RSAPrivateKey, salt: int) -> None:
    ak = m.public_from_key(
        rsa_key.public_key(),
        attributes=m.AK_ATTRIBUTES,
        scheme=m.TPM_ALG_RSAPSS,
        scheme_hash=m.TPM_ALG_SHA256,
    )
    attest = _attest_bytes(PCRS)
    sig = _sign(rsa_key, attest, m.TPM_ALG_RSAPSS, salt=salt)
    verify_quote(Quote(attest, sig, dict(PCRS)), ak)


def test_flipped_attest_byte_fails_signature(ec_key: ec.EllipticCurvePrivateKey) -> None:
    quote = _quote(ec_key)
    for index in (0, 10, len(quote.attest) - 1):
        tampered = bytearray(quote.attest)
        tampered[index] ^= 0x01
        with pytest.raises(SignatureError):
            verify_quote(replace(quote, attest=bytes(tampered)), _ak(ec_key))


def test_flipped_rsa_signature_fails(rsa_key: rsa.RSAPrivateKey) -> None:
    quote = _quote(rsa_key)
    tampered = bytearray(quote.signature)
    tampered[-1] ^= 0x80
    with pytest.raises(SignatureError):
        verify_quote(replace(quote, signature=bytes(tampered)), _ak(rsa_key))


def test_other_ak_fails_signature(ec_key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(SignatureError):
        verify_quote(_quote(ec_key), _ak(other))


def test_changed_pcr_value_fails(ec_key: ec.EllipticCurvePrivateKey) -> None:
    quote = _quote(ec_key)
    pcrs = dict(quote.pcrs)
    pcrs[7] = b"\x08" * 32
    with pytest.raises(PcrMismatchError, match="do not hash to its pcrDigest"):
        verify_quote(replace(quote, pcrs=pcrs), _ak(ec_key))


def test_wrong_magic_is_quote_error(ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(QuoteError, match="magic"):
        verify_quote(_quote(ec_key, magic=0xFF544346), _ak(ec_key))


def test_wrong_type_is_quote_error(ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(QuoteError, match="type is 0x8017"):
        verify_quote(_quote(ec_key, type=0x8017), _ak(ec_key))


def test_signed_garbage_is_wire_format_error(ec_key: ec.EllipticCurvePrivateKey) -> None:
    attest = _attest_bytes(PCRS) + b"\x00"
    quote = Quote(attest, _sign(ec_key, attest), dict(PCRS))
    with pytest.raises(WireFormatError, match="trailing"):
        verify_quote(quote, _ak(ec_key))


def test_truncated_signature_is_wire_format_error(ec_key: ec.EllipticCurvePrivateKey) -> None:
    quote = _quote(ec_key)
    with pytest.raises(WireFormatError, match="truncated"):
        verify_quote(replace(quote, signature=quote.signature[:-3]), _ak(ec_key))


def test_signature_scheme_must_match_ak(rsa_key: rsa.RSAPrivateKey) -> None:
    attest = _attest_bytes(PCRS)
    pss = _sign(rsa_key, attest, m.TPM_ALG_RSAPSS)
    with pytest.raises(QuoteError, match="AK's scheme"):
        verify_quote(Quote(attest, pss, dict(PCRS)), _ak(rsa_key))


def test_selection_must_match_supplied_pcrs(ec_key: ec.EllipticCurvePrivateKey) -> None:
    quote = _quote(ec_key)
    extra = dict(quote.pcrs) | {8: bytes(32)}
    with pytest.raises(QuoteError, match="values were supplied"):
        verify_quote(replace(quote, pcrs=extra), _ak(ec_key))


def test_selection_must_be_sha256(ec_key: ec.EllipticCurvePrivateKey) -> None:
    sha1 = (m.PcrSelection(m.TPM_ALG_SHA1, (0, 7, 16)),)
    with pytest.raises(QuoteError, match="bank 0x0004"):
        verify_quote(_quote(ec_key, pcr_selection=sha1), _ak(ec_key))


def test_empty_selection_refused(ec_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(QuoteError, match="no PCRs"):
        verify_quote(_quote(ec_key, pcrs={}, pcr_selection=()), _ak(ec_key))


def test_pcr_values_must_be_32_bytes(ec_key: ec.EllipticCurvePrivateKey) -> None:
    short = dict(PCRS) | {7: b"\x07" * 20}
    with pytest.raises(QuoteError, match="PCR 7 is 20 bytes"):
        verify_quote(_quote(ec_key, pcrs=short), _ak(ec_key))


def test_pcr_digest_order_is_per_selection_then_ascending() -> None:
    values = {1: b"a" * 32, 2: b"b" * 32, 9: b"c" * 32}
    selection = [
        m.PcrSelection(m.TPM_ALG_SHA256, (9, 2)),
        m.PcrSelection(m.TPM_ALG_SHA256, (1,)),
    ]
    expected = hashlib.sha256(b"b" * 32 + b"c" * 32 + b"a" * 32).digest()
    assert pcr_digest(selection, values) == expected
    with pytest.raises(QuoteError, match="PCR 3"):
        pcr_digest([m.PcrSelection(m.TPM_ALG_SHA256, (3,))], values)


def test_qualifying_data(ec_key: ec.EllipticCurvePrivateKey) -> None:
    attest = verify_quote(_quote(ec_key), _ak(ec_key))
    check_qualifying_data(attest, NONCE, FreshnessError)
    with pytest.raises(FreshnessError, match=r"expected ffff.*\(32 bytes\)"):
        check_qualifying_data(attest, b"\xff" * 32, FreshnessError)
    with pytest.raises(QuoteError, match=r"expected \(empty\)"):
        check_qualifying_data(attest, b"", QuoteError)


def test_good_ak_attributes(ec_key: ec.EllipticCurvePrivateKey) -> None:
    verify_ak_attributes(_ak(ec_key))


@pytest.mark.parametrize(
    ("attributes", "name_alg", "message"),
    [
        (m.AK_ATTRIBUTES & ~m.TPMA_OBJECT_RESTRICTED, m.TPM_ALG_SHA256, "restricted"),
        (m.AK_ATTRIBUTES & ~m.TPMA_OBJECT_SIGN, m.TPM_ALG_SHA256, "sign"),
        (m.AK_ATTRIBUTES & ~m.TPMA_OBJECT_FIXEDTPM, m.TPM_ALG_SHA256, "fixedTPM"),
        (m.AK_ATTRIBUTES & ~m.TPMA_OBJECT_FIXEDPARENT, m.TPM_ALG_SHA256, "fixedParent"),
        (
            m.AK_ATTRIBUTES & ~m.TPMA_OBJECT_SENSITIVEDATAORIGIN,
            m.TPM_ALG_SHA256,
            "sensitiveDataOrigin",
        ),
        (m.AK_ATTRIBUTES | m.TPMA_OBJECT_DECRYPT, m.TPM_ALG_SHA256, "decrypt"),
        (m.AK_ATTRIBUTES, m.TPM_ALG_SHA1, "nameAlg"),
    ],
)
def test_bad_ak_attributes(
    ec_key: ec.EllipticCurvePrivateKey, attributes: int, name_alg: int, message: str
) -> None:
    ak = m.public_from_key(
        ec_key.public_key(),
        attributes=attributes,
        scheme=m.TPM_ALG_ECDSA,
        scheme_hash=m.TPM_ALG_SHA256,
        name_alg=name_alg,
    )
    with pytest.raises(KeyBindingError, match=message):
        verify_ak_attributes(ak)
