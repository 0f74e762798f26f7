"""Enrol an embassy: check its EK certificate, prove its AK is in that TPM, certify the AK.

The registrar trusts nothing the embassy says about itself. It checks the EK certificate
against the EK CAs it trusts (and learns the TPM's kind from the chain), refuses an AK whose
attributes would let it sign what the TPM did not make, then encrypts a fresh secret to the
EK bound to the AK's name (TPM2_MakeCredential): only a TPM holding both gives it back. Only
then does it sign the AK certificate, which carries that proof to every later verifier.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from embassy.attest.akcert import Issuer, issue_ak_certificate
from embassy.attest.credential import check_activation, make_credential
from embassy.attest.ek import CertifiedEk, verify_ek_certificate
from embassy.attest.marshal import parse_public
from embassy.attest.quote import verify_ak_attributes
from embassy.attest.types import TpmMode
from embassy.errors import SoftwareTpmError
from embassy.verify.identity import identity_tpm_unverified

_LOG = logging.getLogger(__name__)


class Attester(Protocol):
    """The embassy being enrolled, however it is reached (its socket, or a relay)."""

    def identity_document(self) -> dict[str, Any]: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class EkTrust:
    """The EK CAs a registrar accepts, by the kind of TPM they vouch for."""

    hardware: tuple[x509.Certificate, ...]
    software: tuple[x509.Certificate, ...] = ()
    allow_software_tpm: bool = False


@dataclass(frozen=True, slots=True)
class Enrollment:
    certificate: x509.Certificate
    ek: CertifiedEk
    ak_name: bytes


def enroll(
    attester: Attester,
    issuer: Issuer,
    trust: EkTrust,
    *,
    now: datetime,
    lifetime: timedelta,
) -> Enrollment:
    """Run the whole enrolment against ``attester``; return the AK certificate or raise."""
    ak_raw, ek_raw, ek_cert = identity_tpm_unverified(attester.identity_document())
    ak, ek = parse_public(ak_raw), parse_public(ek_raw)
    verify_ak_attributes(ak)
    certified = verify_ek_certificate(
        ek_cert, trust.hardware, ek, software_cas=trust.software, at=now
    )
    if certified.kind is TpmMode.SOFTWARE:
        if not trust.allow_software_tpm:
            raise SoftwareTpmError(
                f"the EK certificate is a software TPM's ({certified.attributes.describe()}); "
                "a registrar certifies one only with --allow-software-tpm"
            )
        _LOG.warning("allow_software_tpm: certifying an AK in a software TPM")
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek, ak.name(), secret)
    check_activation(secret, attester.activate_credential(blob, encrypted))
    certificate = issue_ak_certificate(
        issuer, ak, ek_cert, now=now, lifetime=lifetime, serial=x509.random_serial_number()
    )
    return Enrollment(certificate, certified, ak.name())


def chain_for(
    enrollment: Enrollment, intermediates: Sequence[x509.Certificate] = ()
) -> list[bytes]:
    """The chain an identity document carries: the AK certificate, then any intermediates."""
    return [c.public_bytes(Encoding.DER) for c in (enrollment.certificate, *intermediates)]
