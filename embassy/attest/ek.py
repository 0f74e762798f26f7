"""The endorsement key's certificate: which TPM maker vouches for the EK, and what kind of
TPM that makes it.

The EK certificate ties "some key" to "a TPM from vendor X". The kind of TPM is read from
evidence, never from the embassy's own ``tpm_mode`` claim: the auditor's policy sorts the EK
CAs it trusts into hardware vendors' and software TPMs' (swtpm's local CA), the chain says
which one vouches, and the certificate's TCG attributes (manufacturer, model) must not
contradict it: a chain to a hardware vendor for a certificate whose model is "swtpm" is a
failure, not a hardware TPM.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509

from embassy.attest.chain import load_der, load_pem_bundle, same_key, verify_chain
from embassy.attest.marshal import PublicArea
from embassy.attest.types import TpmMode
from embassy.errors import CertificateError, KeyBindingError

__all__ = ["CertifiedEk", "TpmAttributes", "load_pem_bundle", "verify_ek_certificate"]

# TCG EK Credential Profile: the subjectAltName directoryName attributes.
OID_TPM_MANUFACTURER = x509.ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = x509.ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = x509.ObjectIdentifier("2.23.133.2.3")
# Models that only software TPMs report. A hardware vendor's CA never certifies one.
SOFTWARE_MODELS = ("swtpm",)


@dataclass(frozen=True, slots=True)
class TpmAttributes:
    """The TCG attributes an EK certificate names (empty strings when absent)."""

    manufacturer: str
    model: str
    version: str

    @property
    def claims_software(self) -> bool:
        return any(m in self.model.lower() for m in SOFTWARE_MODELS)

    def describe(self) -> str:
        parts = [f"manufacturer {self.manufacturer or '?'}", f"model {self.model or '?'}"]
        if self.version:
            parts.append(f"version {self.version}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class CertifiedEk:
    """An EK certificate that chains to a trusted CA and certifies the document's EK."""

    certificate: x509.Certificate
    anchor: x509.Certificate
    kind: TpmMode
    attributes: TpmAttributes


def tpm_attributes(cert: x509.Certificate) -> TpmAttributes:
    found: dict[x509.ObjectIdentifier, str] = {}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    except ValueError as exc:
        raise CertificateError(f"the EK certificate's subjectAltName is malformed: {exc}") from None
    for name in san.get_values_for_type(x509.DirectoryName) if san is not None else []:
        for attribute in name:
            value = attribute.value
            if attribute.oid in (OID_TPM_MANUFACTURER, OID_TPM_MODEL, OID_TPM_VERSION):
                text = value if isinstance(value, str) else value.decode("ascii", "replace")
                found.setdefault(attribute.oid, text)
    return TpmAttributes(
        found.get(OID_TPM_MANUFACTURER, ""),
        found.get(OID_TPM_MODEL, ""),
        found.get(OID_TPM_VERSION, ""),
    )


def verify_ek_certificate(
    cert_der: bytes,
    hardware_cas: Sequence[x509.Certificate],
    ek: PublicArea,
    *,
    software_cas: Sequence[x509.Certificate] = (),
    at: datetime | None = None,
) -> CertifiedEk:
    """Check ``cert_der`` chains to a trusted EK CA and certifies ``ek``; classify the TPM.

    A chain to one of ``hardware_cas`` makes a hardware TPM, to one of ``software_cas`` a
    software TPM. Raises CertificateError for a chain to neither, or for a certificate whose
    own attributes contradict the kind its CA vouches for; KeyBindingError when it certifies
    another key than ``ek``.
    """
    leaf = load_der(cert_der, "the EK certificate")
    chain = verify_chain(leaf, [*hardware_cas, *software_cas], "the EK certificate", at=at)
    try:
        cert_key = leaf.public_key()
    except (ValueError, TypeError) as exc:
        raise CertificateError(f"the EK certificate's public key is unusable: {exc}") from None
    if not same_key(cert_key, ek.public_key()):
        raise KeyBindingError("the EK certificate certifies a different key than the TPM's EK")
    attributes = tpm_attributes(leaf)
    # An anchor in both groups counts as software: the weaker claim wins.
    software = any(c == chain.anchor for c in software_cas)
    if not software and attributes.claims_software:
        raise CertificateError(
            f"the EK certificate chains to a hardware EK CA but names a software TPM "
            f"({attributes.describe()}): a contradiction, refused"
        )
    return CertifiedEk(
        leaf, chain.anchor, TpmMode.SOFTWARE if software else TpmMode.HARDWARE, attributes
    )
