"""Check that an endorsement key is certified by a TPM manufacturer CA the auditor trusts.

The EK certificate is what ties "some key" to "a genuine TPM from vendor X". EK
certificates are not web-PKI certificates: swtpm and several vendors issue them with an
empty subject, a critical subjectAltName holding a directoryName of TPM manufacturer,
model and version attributes, and key usages a browser policy would reject. So the chain
is built and checked here by hand: names, signatures, validity windows and the CA flag of
every issuer, and nothing that only makes sense for TLS servers.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from embassy.attest.marshal import PublicArea
from embassy.errors import CertificateError, KeyBindingError, WireFormatError

MAX_CHAIN_DEPTH = 5


def _describe(name: x509.Name) -> str:
    text = name.rfc4514_string()
    return f'"{text}"' if text else "(an empty name)"


def load_pem_bundle(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; junk or an empty bundle is a WireFormatError."""
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise WireFormatError(f"not a PEM certificate bundle: {exc}") from None
    if not certs:
        raise WireFormatError("the PEM bundle holds no certificates")
    return certs


def _load_der(cert_der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise WireFormatError(f"the EK certificate is not DER X.509: {exc}") from None


def _is_self_issued(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject


def _check_can_issue(issuer: x509.Certificate) -> None:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and not constraints.ca:
        raise CertificateError(
            f"{_describe(issuer.subject)} issued a certificate but is not a CA (cA=false)"
        )
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateError(f"{_describe(issuer.subject)} may not sign certificates")


def _find_issuer(cert: x509.Certificate, trusted: Sequence[x509.Certificate]) -> x509.Certificate:
    candidates = [c for c in trusted if c.subject == cert.issuer]
    if not candidates:
        raise CertificateError(
            f"{_describe(cert.subject)} is issued by {_describe(cert.issuer)}, which is not "
            f"among the {len(trusted)} trusted CA certificates"
        )
    for candidate in candidates:
        try:
            cert.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        _check_can_issue(candidate)
        return candidate
    raise CertificateError(
        f"the signature of {_describe(cert.subject)} does not verify with any trusted "
        f"certificate named {_describe(cert.issuer)}"
    )


def _build_chain(
    leaf: x509.Certificate, trusted: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """Leaf first, then issuers from ``trusted`` up to a self-issued root or a dead end."""
    chain = [leaf]
    cert = _find_issuer(leaf, trusted)
    while True:
        if cert in chain:
            raise CertificateError(f"the chain loops at {_describe(cert.subject)}")
        chain.append(cert)
        if len(chain) > MAX_CHAIN_DEPTH:
            raise CertificateError(f"the chain is longer than {MAX_CHAIN_DEPTH} certificates")
        if _is_self_issued(cert) or not any(c.subject == cert.issuer for c in trusted):
            return chain  # every certificate in ``trusted`` is an anchor
        cert = _find_issuer(cert, trusted)


def _check_validity(chain: Sequence[x509.Certificate], at: datetime) -> None:
    for cert in chain:
        who = "the EK certificate" if cert is chain[0] else _describe(cert.subject)
        if at < cert.not_valid_before_utc:
            raise CertificateError(
                f"{who} is not yet valid at {at.isoformat()} "
                f"(valid from {cert.not_valid_before_utc.isoformat()})"
            )
        if at > cert.not_valid_after_utc:
            raise CertificateError(
                f"{who} expired at {cert.not_valid_after_utc.isoformat()} "
                f"(checked at {at.isoformat()})"
            )


def _same_key(a: object, b: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bool:
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()
    return False


def verify_ek_certificate(
    cert_der: bytes,
    trusted: Sequence[x509.Certificate],
    ek: PublicArea,
    *,
    at: datetime | None = None,
) -> x509.Certificate:
    """Check ``cert_der`` chains to ``trusted`` and certifies ``ek``; return the certificate.

    Every certificate in ``trusted`` is a trust anchor, so a bundle may hold roots and
    intermediates; the chain is followed up to a self-issued root when the bundle has one,
    and every certificate on it must be valid at ``at`` (timezone-aware; default now).
    """
    when = at if at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("verify_ek_certificate needs a timezone-aware time")
    leaf = _load_der(cert_der)
    chain = _build_chain(leaf, trusted)
    _check_validity(chain, when)
    try:
        cert_key = leaf.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the EK certificate's public key is unusable: {exc}") from None
    if not _same_key(cert_key, ek.public_key()):
        raise KeyBindingError("the EK certificate certifies a different key than the TPM's EK")
    return leaf
