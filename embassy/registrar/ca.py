"""The registrar's CA: an ECDSA P-256 key, encrypted at rest, and its self-signed certificate.

The key file is PKCS#8 encrypted under a passphrase the operator gives (never written in the
clear); the certificate is what auditors pin (``embassy verify --ak-ca``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from embassy.attest.akcert import Issuer
from embassy.attest.chain import load_pem_bundle
from embassy.daemon.atomic import create_private, write_atomic
from embassy.errors import ConfigError

KEY_FILE = "registrar-ca.key"
CERT_FILE = "registrar-ca.pem"


def make_ca(name: str, *, now: datetime, lifetime: timedelta) -> Issuer:
    """Pure apart from key generation: a new CA key and its self-signed certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(key, cert)


def init_ca(
    directory: Path, passphrase: bytes, *, name: str, now: datetime, lifetime: timedelta
) -> Issuer:
    """Create the registrar's CA in ``directory``; refuses to replace an existing one."""
    if not passphrase:
        raise ConfigError("the registrar's CA key needs a passphrase (it is never stored clear)")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if (directory / CERT_FILE).exists():
        raise ConfigError(f"{directory / CERT_FILE}: exists; refusing to replace a CA")
    issuer = make_ca(name, now=now, lifetime=lifetime)
    encrypted = issuer.key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    try:
        create_private(directory / KEY_FILE, encrypted)
    except FileExistsError:
        raise ConfigError(
            f"{directory / KEY_FILE}: exists; refusing to overwrite a CA key"
        ) from None
    write_atomic(
        directory / CERT_FILE,
        issuer.certificate.public_bytes(serialization.Encoding.PEM),
        mode=0o644,
    )
    return issuer


def load_ca(directory: Path, passphrase: bytes) -> Issuer:
    """The CA from ``directory``: its key decrypted with ``passphrase``, checked against the
    certificate beside it."""
    try:
        key_pem = (directory / KEY_FILE).read_bytes()
        cert_pem = (directory / CERT_FILE).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"{directory}: no registrar CA ({exc.strerror}); create one with "
            "`embassy registrar init`"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, passphrase)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{directory / KEY_FILE}: cannot be decrypted (wrong passphrase, or not a key)"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{directory / KEY_FILE}: not an EC key")
    cert = load_pem_bundle(cert_pem)[0]
    if cert.public_key() != key.public_key():
        raise ConfigError(f"{directory}: the CA certificate is not the key's")
    return Issuer(key, cert)
