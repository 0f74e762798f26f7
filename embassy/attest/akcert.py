"""AK certificates: an offline proof that an attestation key lives in a certified TPM.

A quote proves only that *some* AK signed it; the EK certificate proves only that *some* EK
is a genuine TPM's. Credential activation links the two, but only for whoever runs it, live.
An AK certificate carries that link to everyone later: a registrar (a privacy CA) that ran
the activation itself signs an X.509 certificate for the AK's key, naming

- the AK's exact TPM name (nameAlg || H(TPMT_PUBLIC)), so the attributes the registrar
  checked (fixedTPM, restricted, signing-only) are the ones the verifier sees, and
- SHA-256 of the EK certificate it checked, so the verifier knows which TPM, and what kind
  of TPM, the AK is in.

Both extensions are non-critical (a generic X.509 verifier may check the chain itself) and
live under the embassy's own OID arc, a UUID OID (ITU-T X.667, ``2.25.<uuid>``) needing no
registration. A cloud vTPM's own AK certificate has neither: its CA vouches for the AK
directly, and :func:`verify_ak_certificate` says so (``binds_ek`` False).

This module is pure: it builds and checks certificates from values; the registrar's I/O
lives in :mod:`embassy.registrar`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from embassy.attest.chain import Chain, load_der, same_key, verify_chain
from embassy.attest.ek import OID_TPM_MANUFACTURER, OID_TPM_MODEL, tpm_attributes
from embassy.attest.marshal import PublicArea
from embassy.errors import CertificateError, KeyBindingError, WireFormatError

_ARC = "2.25.140602675624440401919560087556271623810"
OID_AK_NAME = x509.ObjectIdentifier(f"{_ARC}.1")
OID_EK_CERTIFICATE_SHA256 = x509.ObjectIdentifier(f"{_ARC}.2")
# TCG: tcg-kp-AIKCertificate, the extended key usage of an attestation identity key.
OID_TCG_KP_AIK = x509.ObjectIdentifier("2.23.133.8.3")
MAX_AK_CHAIN = 4
MAX_CERTIFICATE_SIZE = 16 * 1024


def _octet_string(data: bytes) -> bytes:
    if len(data) > 127:
        raise ValueError("too long for this encoder")
    return bytes([0x04, len(data)]) + data


def _read_octet_string(value: bytes, what: str) -> bytes:
    """Strict DER: one short-form OCTET STRING and nothing after it."""
    if len(value) < 2 or value[0] != 0x04 or value[1] > 127 or len(value) != 2 + value[1]:
        raise CertificateError(f"the AK certificate's {what} extension is not a DER OCTET STRING")
    return value[2:]


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier, what: str) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid).value
    except x509.ExtensionNotFound:
        return None
    if not isinstance(ext, x509.UnrecognizedExtension):
        raise CertificateError(f"the AK certificate's {what} extension has an unexpected type")
    return _read_octet_string(ext.value, what)


@dataclass(frozen=True, slots=True)
class Issuer:
    """A CA that signs AK certificates: the registrar's key and certificate."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


def issue_ak_certificate(
    issuer: Issuer,
    ak: PublicArea,
    ek_certificate: bytes,
    *,
    now: datetime,
    lifetime: timedelta,
    serial: int,
) -> x509.Certificate:
    """Sign a certificate for ``ak``, naming its TPM name and the EK certificate it was
    activated against. The caller has already checked the EK certificate and run the
    credential activation: this only writes down what was proved."""
    ak_key = ak.public_key()
    name = ak.name()
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"TPM AK {name[2:18].hex()}")])
        )
        .issuer_name(issuer.certificate.subject)
        .public_key(ak_key)
        .serial_number(serial)
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([OID_TCG_KP_AIK]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ak_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
        .add_extension(x509.UnrecognizedExtension(OID_AK_NAME, _octet_string(name)), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(
                OID_EK_CERTIFICATE_SHA256,
                _octet_string(hashlib.sha256(ek_certificate).digest()),
            ),
            critical=False,
        )
    )
    # The TPM's maker and model, copied from the EK certificate, for people reading it.
    attributes = tpm_attributes(load_der(ek_certificate, "the EK certificate"))
    if attributes.manufacturer or attributes.model:
        names = [
            x509.NameAttribute(oid, value)
            for oid, value in (
                (OID_TPM_MANUFACTURER, attributes.manufacturer),
                (OID_TPM_MODEL, attributes.model),
            )
            if value
        ]
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DirectoryName(x509.Name(names))]), critical=False
        )
    # RFC 6979 nonces: no signing-time randomness to get wrong, and reproducible vectors.
    return builder.sign(issuer.key, hashes.SHA256(), ecdsa_deterministic=True)


@dataclass(frozen=True, slots=True)
class CertifiedAk:
    """An AK certificate chain that verified: for which AK, by whom, binding which EK."""

    chain: Chain
    binds_ek: bool

    @property
    def anchor(self) -> x509.Certificate:
        return self.chain.anchor


def parse_ak_chain(items: Sequence[bytes]) -> list[x509.Certificate]:
    if not items:
        raise WireFormatError("the AK certificate chain is empty")
    if len(items) > MAX_AK_CHAIN:
        raise WireFormatError(f"the AK certificate chain has more than {MAX_AK_CHAIN} entries")
    out = []
    for i, der in enumerate(items):
        if len(der) > MAX_CERTIFICATE_SIZE:
            raise WireFormatError(f"AK certificate chain entry {i} is over 16 KiB")
        out.append(load_der(der, f"AK certificate chain entry {i}"))
    return out


def _check_leaf_usage(leaf: x509.Certificate) -> None:
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            raise CertificateError("the AK certificate is a CA certificate")
    except x509.ExtensionNotFound:
        pass
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
        if not usage.digital_signature:
            raise CertificateError("the AK certificate's key usage does not allow signing")
    except x509.ExtensionNotFound:
        pass
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return
    if OID_TCG_KP_AIK not in eku:
        raise CertificateError(
            "the AK certificate's extended key usage lacks tcg-kp-AIKCertificate (2.23.133.8.3)"
        )


def verify_ak_certificate(
    chain_der: Sequence[bytes],
    trusted: Sequence[x509.Certificate],
    ak: PublicArea,
    ek_certificate: bytes,
    *,
    at: datetime | None = None,
) -> CertifiedAk:
    """Check that ``chain_der`` (leaf first) chains to ``trusted`` and certifies ``ak``.

    Raises CertificateError for a chain that does not verify, KeyBindingError when it
    certifies another key or TPM object than ``ak``, or names another EK certificate than
    ``ek_certificate``.
    """
    certs = parse_ak_chain(chain_der)
    chain = verify_chain(certs[0], trusted, "the AK certificate", intermediates=certs[1:], at=at)
    binds_ek = check_certifies(chain.leaf, ak, ek_certificate)
    return CertifiedAk(chain, binds_ek=binds_ek)


def check_certifies(leaf: x509.Certificate, ak: PublicArea, ek_certificate: bytes) -> bool:
    """Check ``leaf`` is a signing certificate for exactly ``ak`` (its key and, when named,
    its TPM object), and names ``ek_certificate`` if it names one. Returns whether it does
    (a registrar's certificate) or not (a vTPM's own). Trust in the issuer is not checked."""
    try:
        leaf_key = leaf.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the AK certificate's public key is unusable: {exc}") from None
    if not same_key(leaf_key, ak.public_key()):
        raise KeyBindingError("the AK certificate certifies another key than the document's AK")
    _check_leaf_usage(leaf)
    name = _extension(leaf, OID_AK_NAME, "AK name")
    if name is not None and not hmac.compare_digest(name, ak.name()):
        raise KeyBindingError(
            f"the AK certificate names TPM object {name.hex()}, but the document's AK is "
            f"{ak.name().hex()} (same key, other attributes)"
        )
    ek_digest = _extension(leaf, OID_EK_CERTIFICATE_SHA256, "EK certificate")
    if ek_digest is not None:
        actual = hashlib.sha256(ek_certificate).digest()
        if not hmac.compare_digest(ek_digest, actual):
            raise KeyBindingError(
                f"the AK certificate vouches for an AK in the TPM whose EK certificate has "
                f"SHA-256 {ek_digest.hex()}, but the document carries {actual.hex()}"
            )
    return ek_digest is not None
