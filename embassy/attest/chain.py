"""X.509 chains for TPM credentials, checked by hand.

EK and AK certificates are not web-PKI certificates: swtpm and several vendors issue them
with an empty subject, a critical subjectAltName holding a directoryName of TPM
manufacturer, model and version attributes, and key usages a browser policy would reject.
So chains are built and checked here: names, signatures, validity windows and the CA flag
of every issuer, and nothing that only makes sense for TLS servers. Every certificate the
caller trusts is an anchor, so a bundle may hold roots and intermediates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from embassy.errors import CertificateError, WireFormatError

MAX_CHAIN_DEPTH = 5


def describe(name: x509.Name) -> str:
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


def load_der(cert_der: bytes, what: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise WireFormatError(f"{what} is not DER X.509: {exc}") from None


def aware(at: datetime | None) -> datetime:
    when = at if at is not None else datetime.now(UTC)
    if when.tzinfo is None:
        raise ValueError("certificate checks need a timezone-aware time")
    return when


def _check_can_issue(issuer: x509.Certificate) -> None:
    try:
        constraints = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and not constraints.ca:
        raise CertificateError(
            f"{describe(issuer.subject)} issued a certificate but is not a CA (cA=false)"
        )
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise CertificateError(f"{describe(issuer.subject)} may not sign certificates")


def _find_issuer(cert: x509.Certificate, pool: Sequence[x509.Certificate]) -> x509.Certificate:
    candidates = [c for c in pool if c.subject == cert.issuer]
    if not candidates:
        raise CertificateError(
            f"{describe(cert.subject)} is issued by {describe(cert.issuer)}, which is not "
            f"among the {len(pool)} trusted CA certificates"
        )
    for candidate in candidates:
        try:
            cert.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError):
            continue
        _check_can_issue(candidate)
        return candidate
    raise CertificateError(
        f"the signature of {describe(cert.subject)} does not verify with any trusted "
        f"certificate named {describe(cert.issuer)}"
    )


@dataclass(frozen=True, slots=True)
class Chain:
    """A verified chain: ``certificates[0]`` is the leaf, the last is the trusted anchor
    it ends at (or the last trusted issuer, when the bundle holds no self-issued root)."""

    certificates: tuple[x509.Certificate, ...]

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    @property
    def anchor(self) -> x509.Certificate:
        return self.certificates[-1]


def verify_chain(
    leaf: x509.Certificate,
    trusted: Sequence[x509.Certificate],
    what: str,
    *,
    intermediates: Sequence[x509.Certificate] = (),
    at: datetime | None = None,
) -> Chain:
    """Chain ``leaf`` through untrusted ``intermediates`` to a certificate in ``trusted``.

    The chain ends at the first trusted certificate reached (every trusted certificate is an
    anchor) or goes on through trusted issuers up to a self-issued root. Every certificate
    on it must be valid at ``at`` (timezone-aware; default now).
    """
    when = aware(at)
    pool = [*trusted, *intermediates]
    chain = [leaf]
    cert = leaf
    while True:
        issuer = _find_issuer(cert, pool)
        if issuer in chain:
            raise CertificateError(f"the chain loops at {describe(issuer.subject)}")
        chain.append(issuer)
        if len(chain) > MAX_CHAIN_DEPTH:
            raise CertificateError(f"the chain is longer than {MAX_CHAIN_DEPTH} certificates")
        if issuer in trusted and (
            issuer.issuer == issuer.subject or not any(c.subject == issuer.issuer for c in trusted)
        ):
            break
        cert = issuer
    for i, cert in enumerate(chain):
        who = what if i == 0 else describe(cert.subject)
        if when < cert.not_valid_before_utc:
            raise CertificateError(
                f"{who} is not yet valid at {when.isoformat()} "
                f"(valid from {cert.not_valid_before_utc.isoformat()})"
            )
        if when > cert.not_valid_after_utc:
            raise CertificateError(
                f"{who} expired at {cert.not_valid_after_utc.isoformat()} "
                f"(checked at {when.isoformat()})"
            )
    return Chain(tuple(chain))


def same_key(a: object, b: object) -> bool:
    """Whether two RSA or EC public keys are the same key."""
    if isinstance(a, rsa.RSAPublicKey) and isinstance(b, rsa.RSAPublicKey):
        return a.public_numbers() == b.public_numbers()
    if isinstance(a, ec.EllipticCurvePublicKey) and isinstance(b, ec.EllipticCurvePublicKey):
        return a.curve.name == b.curve.name and a.public_numbers() == b.public_numbers()
    return False
