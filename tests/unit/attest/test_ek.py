"""EK certificate chains shaped like swtpm's (root CA, intermediate, odd-looking EK leaf), and
the TPM kind they prove."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from embassy.attest import marshal as m
from embassy.attest.ek import CertifiedEk, load_pem_bundle, verify_ek_certificate
from embassy.attest.types import TpmMode
from embassy.errors import CertificateError, KeyBindingError, WireFormatError

NOW = datetime(2025, 6, 1, tzinfo=UTC)
TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")


@dataclass(frozen=True)
class Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(
    cn: str,
    issuer: Ca | None = None,
    *,
    ca: bool = True,
    not_after: datetime = NOW + timedelta(days=3650),
) -> Ca:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.cert.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=365))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    signer = issuer.key if issuer else key
    return Ca(builder.sign(signer, hashes.SHA256()), key)


def _ek_cert(
    issuer: Ca,
    key: rsa.RSAPublicKey,
    *,
    not_after: datetime = NOW + timedelta(days=365),
    model: str = "swtpm",
) -> bytes:
    tpm_info = x509.Name(
        [
            x509.RelativeDistinguishedName(
                [
                    x509.NameAttribute(TPM_MANUFACTURER, "id:00001014"),
                    x509.NameAttribute(TPM_MODEL, model),
                    x509.NameAttribute(TPM_VERSION, "id:20191023"),
                ]
            )
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=30))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_info)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(issuer.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def ek_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, 2048)


@pytest.fixture(scope="module")
def root() -> Ca:
    return _ca("Test TPM Root CA")


@pytest.fixture(scope="module")
def intermediate(root: Ca) -> Ca:
    return _ca("Test TPM Manufacturer CA", root)


@pytest.fixture(scope="module")
def ek(ek_key: rsa.RSAPrivateKey) -> m.PublicArea:
    return m.ek_public_from_key(ek_key.public_key())


@pytest.fixture(scope="module")
def leaf(intermediate: Ca, ek_key: rsa.RSAPrivateKey) -> bytes:
    return _ek_cert(intermediate, ek_key.public_key())


def _verify(
    cert: bytes, cas: list[x509.Certificate], ek: m.PublicArea, *, at: datetime | None = None
) -> CertifiedEk:
    """These leaves are swtpm's: their CAs are trusted as software TPMs' CAs."""
    return verify_ek_certificate(cert, [], ek, software_cas=cas, at=at)


def test_chain_to_root_with_intermediate_passes(
    leaf: bytes, root: Ca, intermediate: Ca, ek: m.PublicArea
) -> None:
    certified = _verify(leaf, [root.cert, intermediate.cert], ek, at=NOW)
    assert certified.certificate.subject == x509.Name([])
    assert certified.anchor == root.cert
    assert certified.kind is TpmMode.SOFTWARE
    assert (certified.attributes.manufacturer, certified.attributes.model) == (
        "id:00001014",
        "swtpm",
    )


def test_intermediate_alone_is_an_anchor(leaf: bytes, intermediate: Ca, ek: m.PublicArea) -> None:
    _verify(leaf, [intermediate.cert], ek, at=NOW)


def test_default_time_is_now(root: Ca, ek_key: rsa.RSAPrivateKey, ek: m.PublicArea) -> None:
    current = _ek_cert(root, ek_key.public_key(), not_after=datetime.now(UTC) + timedelta(1))
    _verify(current, [root.cert], ek)


def test_root_alone_cannot_reach_leaf(leaf: bytes, root: Ca, ek: m.PublicArea) -> None:
    with pytest.raises(CertificateError, match="not among the 1 trusted CA certificates"):
        _verify(leaf, [root.cert], ek, at=NOW)


def test_other_ca_is_refused(leaf: bytes, ek: m.PublicArea) -> None:
    other = _ca("Someone Else CA")
    with pytest.raises(CertificateError, match=r"issued by \"CN=Test TPM Manufacturer CA\""):
        _verify(leaf, [other.cert], ek, at=NOW)


def test_same_name_other_key_fails_signature(leaf: bytes, ek: m.PublicArea) -> None:
    impostor = _ca("Test TPM Manufacturer CA")
    with pytest.raises(CertificateError, match="does not verify"):
        _verify(leaf, [impostor.cert], ek, at=NOW)


def test_expired_leaf(root: Ca, ek_key: rsa.RSAPrivateKey, ek: m.PublicArea) -> None:
    old = _ek_cert(root, ek_key.public_key(), not_after=NOW - timedelta(days=1))
    with pytest.raises(CertificateError, match="EK certificate expired"):
        _verify(old, [root.cert], ek, at=NOW)


def test_not_yet_valid(leaf: bytes, intermediate: Ca, ek: m.PublicArea) -> None:
    with pytest.raises(CertificateError, match="not yet valid"):
        _verify(leaf, [intermediate.cert], ek, at=NOW - timedelta(days=60))


def test_expired_root_fails_whole_chain(ek_key: rsa.RSAPrivateKey, ek: m.PublicArea) -> None:
    old_root = _ca("Old Root", not_after=NOW - timedelta(days=1))
    inter = _ca("Inter", old_root)
    cert = _ek_cert(inter, ek_key.public_key())
    with pytest.raises(CertificateError, match='"CN=Old Root" expired'):
        _verify(cert, [old_root.cert, inter.cert], ek, at=NOW)


def test_issuer_must_be_a_ca(ek_key: rsa.RSAPrivateKey, ek: m.PublicArea) -> None:
    not_ca = _ca("Not A CA", ca=False)
    cert = _ek_cert(not_ca, ek_key.public_key())
    with pytest.raises(CertificateError, match="not a CA"):
        _verify(cert, [not_ca.cert], ek, at=NOW)


def test_key_mismatch(leaf: bytes, intermediate: Ca) -> None:
    other_ek = m.ek_public_from_key(rsa.generate_private_key(65537, 2048).public_key())
    with pytest.raises(KeyBindingError, match="different key"):
        _verify(leaf, [intermediate.cert], other_ek, at=NOW)


def test_junk_der(intermediate: Ca, ek: m.PublicArea) -> None:
    with pytest.raises(WireFormatError, match="not DER"):
        _verify(b"\x30\x03junk", [intermediate.cert], ek, at=NOW)


def test_naive_time_refused(leaf: bytes, intermediate: Ca, ek: m.PublicArea) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _verify(leaf, [intermediate.cert], ek, at=datetime(2025, 6, 1))


def test_load_pem_bundle(root: Ca, intermediate: Ca) -> None:
    pem = b"".join(c.cert.public_bytes(serialization.Encoding.PEM) for c in (root, intermediate))
    assert load_pem_bundle(pem) == [root.cert, intermediate.cert]
    with pytest.raises(WireFormatError):
        load_pem_bundle(b"")
    with pytest.raises(WireFormatError):
        load_pem_bundle(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")


# -- the TPM's kind, from evidence ---------------------------------------------------------


def test_hardware_ca_and_hardware_model_is_hardware(
    root: Ca, ek_key: rsa.RSAPrivateKey, ek: m.PublicArea
) -> None:
    cert = _ek_cert(root, ek_key.public_key(), model="SLB9670")
    certified = verify_ek_certificate(cert, [root.cert], ek, at=NOW)
    assert certified.kind is TpmMode.HARDWARE
    assert certified.attributes.model == "SLB9670"


def test_swtpm_certificate_under_a_hardware_ca_is_a_contradiction(
    leaf: bytes, intermediate: Ca, ek: m.PublicArea
) -> None:
    with pytest.raises(CertificateError, match=r"names a software TPM.*model swtpm"):
        verify_ek_certificate(leaf, [intermediate.cert], ek, at=NOW)


def test_ca_in_both_groups_counts_as_software(
    root: Ca, ek_key: rsa.RSAPrivateKey, ek: m.PublicArea
) -> None:
    cert = _ek_cert(root, ek_key.public_key(), model="SLB9670")
    certified = verify_ek_certificate(cert, [root.cert], ek, software_cas=[root.cert], at=NOW)
    assert certified.kind is TpmMode.SOFTWARE


def test_software_ca_does_not_vouch_for_a_hardware_chain(
    leaf: bytes, intermediate: Ca, ek: m.PublicArea
) -> None:
    other = _ca("Vendor CA")
    with pytest.raises(CertificateError, match="not among the 2 trusted"):
        verify_ek_certificate(leaf, [other.cert], ek, software_cas=[_ca("x").cert], at=NOW)
