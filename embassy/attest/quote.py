"""Check a TPM2_Quote against its attestation key and the PCR values sent with it.

A quote proves "this TPM's AK signed these PCR values" only if every link is checked: the
AK is a restricted signing key that lives in a TPM (so it signs only TPM-generated data),
the signature verifies over the exact TPMS_ATTEST bytes, the attest is a TPM-generated quote,
and the supplied PCR values hash to the digest the TPM signed. Freshness (the nonce in
extraData) is the caller's to check, with :func:`check_qualifying_data`, because only the
caller knows which nonce it sent and which error that failure should be.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from embassy.attest.marshal import (
    TPM_ALG_ECDSA,
    TPM_ALG_RSAPSS,
    TPM_ALG_RSASSA,
    TPM_ALG_SHA256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    TPMA_OBJECT_DECRYPT,
    TPMA_OBJECT_FIXEDPARENT,
    TPMA_OBJECT_FIXEDTPM,
    TPMA_OBJECT_RESTRICTED,
    TPMA_OBJECT_SENSITIVEDATAORIGIN,
    TPMA_OBJECT_SIGN,
    Attest,
    PcrSelection,
    PublicArea,
    Signature,
    attest_header,
    parse_attest,
    parse_signature,
)
from embassy.attest.types import Quote
from embassy.errors import (
    KeyBindingError,
    PcrMismatchError,
    QuoteError,
    SignatureError,
    VerificationError,
)

_REQUIRED_AK_BITS = (
    ("restricted", TPMA_OBJECT_RESTRICTED),
    ("sign", TPMA_OBJECT_SIGN),
    ("fixedTPM", TPMA_OBJECT_FIXEDTPM),
    ("fixedParent", TPMA_OBJECT_FIXEDPARENT),
    ("sensitiveDataOrigin", TPMA_OBJECT_SENSITIVEDATAORIGIN),
)
_PCR_VALUE_SIZE = 32
_HEX_SHOWN = 32


def pcr_digest(selection: Sequence[PcrSelection], values: Mapping[int, bytes]) -> bytes:
    """SHA-256 over the selected PCR values in the TPM's order (per bank, PCRs ascending)."""
    h = hashlib.sha256()
    for sel in selection:
        for pcr in sorted(sel.pcrs):
            if pcr not in values:
                raise QuoteError(f"the quote selects PCR {pcr} but no value was supplied for it")
            h.update(values[pcr])
    return h.digest()


def verify_ak_attributes(ak: PublicArea) -> None:
    """Refuse an AK that could sign data the TPM did not generate, or that could leave it."""
    missing = [name for name, bit in _REQUIRED_AK_BITS if not ak.has(bit)]
    if missing:
        raise KeyBindingError(f"the AK lacks required attributes: {', '.join(missing)}")
    if ak.has(TPMA_OBJECT_DECRYPT):
        raise KeyBindingError("the AK has the decrypt attribute; an AK must be signing-only")
    if ak.name_alg != TPM_ALG_SHA256:
        raise KeyBindingError(f"the AK's nameAlg is {ak.name_alg:#06x}, not SHA-256 (0x000b)")


def _check_scheme(sig: Signature, ak: PublicArea) -> None:
    if sig.alg != ak.scheme or sig.hash_alg != ak.scheme_hash:
        raise QuoteError(
            f"the quote is signed with scheme {sig.alg:#06x}/hash {sig.hash_alg:#06x}, but the "
            f"AK's scheme is {ak.scheme:#06x}/hash {ak.scheme_hash:#06x}"
        )
    if sig.hash_alg != TPM_ALG_SHA256:
        raise QuoteError(f"the quote's signature hash is {sig.hash_alg:#06x}; only SHA-256")


def _verify_signature(sig: Signature, ak: PublicArea, message: bytes) -> None:
    key = ak.public_key()
    try:
        if sig.alg == TPM_ALG_ECDSA and isinstance(key, ec.EllipticCurvePublicKey):
            der = encode_dss_signature(sig.r, sig.s)
            key.verify(der, message, ec.ECDSA(hashes.SHA256()))
        elif sig.alg == TPM_ALG_RSASSA and isinstance(key, rsa.RSAPublicKey):
            key.verify(sig.rsa_sig, message, padding.PKCS1v15(), hashes.SHA256())
        elif sig.alg == TPM_ALG_RSAPSS and isinstance(key, rsa.RSAPublicKey):
            # TPMs use either the digest length or the maximum salt; AUTO accepts both.
            pss = padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.AUTO)
            key.verify(sig.rsa_sig, message, pss, hashes.SHA256())
        else:
            raise QuoteError(f"signature algorithm {sig.alg:#06x} does not fit the AK's key type")
    except InvalidSignature:
        raise SignatureError("the quote's signature does not verify with the AK") from None


def _check_header(attest_bytes: bytes) -> None:
    magic, attest_type = attest_header(attest_bytes)
    if magic != TPM_GENERATED_VALUE:
        raise QuoteError(f"attest magic is {magic:#010x}, not TPM_GENERATED_VALUE (0xff544347)")
    if attest_type != TPM_ST_ATTEST_QUOTE:
        raise QuoteError(f"attest type is {attest_type:#06x}, not TPM_ST_ATTEST_QUOTE (0x8018)")


def _check_selection(attest: Attest, quote: Quote) -> None:
    selected: list[int] = []
    for sel in attest.pcr_selection:
        if sel.hash_alg != TPM_ALG_SHA256:
            raise QuoteError(f"the quote selects PCR bank {sel.hash_alg:#06x}; only SHA-256")
        selected.extend(sel.pcrs)
    if not selected:
        raise QuoteError("the quote selects no PCRs")
    if len(set(selected)) != len(selected):
        raise QuoteError(f"the quote selects a PCR twice: {sorted(selected)}")
    if sorted(selected) != sorted(quote.pcrs):
        raise QuoteError(
            f"the quote selects PCRs {sorted(selected)} but values were supplied for "
            f"{sorted(quote.pcrs)}"
        )
    for pcr, value in quote.pcrs.items():
        if len(value) != _PCR_VALUE_SIZE:
            raise QuoteError(f"the value supplied for PCR {pcr} is {len(value)} bytes, not 32")


def verify_quote(quote: Quote, ak: PublicArea) -> Attest:
    """Verify ``quote`` was signed by ``ak`` over the supplied PCR values; return its attest.

    Does not check the AK's attributes (:func:`verify_ak_attributes`) nor the qualifying
    data (:func:`check_qualifying_data`).
    """
    sig = parse_signature(quote.signature)
    _check_scheme(sig, ak)
    _verify_signature(sig, ak, quote.attest)
    _check_header(quote.attest)
    attest = parse_attest(quote.attest)
    _check_selection(attest, quote)
    expected = pcr_digest(attest.pcr_selection, quote.pcrs)
    if not hmac.compare_digest(expected, attest.pcr_digest):
        raise PcrMismatchError(
            "pcrDigest: the PCR values supplied with the quote do not hash to its pcrDigest "
            f"(they hash to {expected.hex()}, the quote signed {attest.pcr_digest.hex()})"
        )
    return attest


def _short_hex(data: bytes) -> str:
    text = data.hex()
    if len(text) <= _HEX_SHOWN:
        return text or "(empty)"
    return f"{text[:_HEX_SHOWN]}... ({len(data)} bytes)"


def check_qualifying_data(attest: Attest, expected: bytes, error: type[VerificationError]) -> None:
    """Raise ``error`` unless the quote's extraData equals ``expected`` (constant time)."""
    if not hmac.compare_digest(attest.extra_data, expected):
        raise error(
            f"the quote's qualifying data is {_short_hex(attest.extra_data)}, "
            f"expected {_short_hex(expected)}"
        )
