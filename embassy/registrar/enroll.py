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


@dataclass(frozen=True, slots=True)
class Challenge:
    """What the registrar sends to the embassy (relayed: the embassy has no network), and
    what it keeps to check the answer. ``secret`` never leaves the registrar: whoever knew
    it could answer without the TPM."""

    ak_public: bytes
    ek_public: bytes
    ek_certificate: bytes
    ek: CertifiedEk
    credential_blob: bytes
    encrypted_secret: bytes
    secret: bytes

    @property
    def ak_name(self) -> bytes:
        return parse_public(self.ak_public).name()


def check_tpm(
    ak_raw: bytes, ek_raw: bytes, ek_cert: bytes, trust: EkTrust, *, now: datetime
) -> CertifiedEk:
    """The registrar's own checks of what an embassy claims: an AK that cannot sign outside
    the TPM, an EK certificate from a CA it trusts for an EK of that key."""
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
    return certified


def make_challenge(
    identity_document: dict[str, Any], trust: EkTrust, *, now: datetime
) -> Challenge:
    """Check what a document claims (:func:`check_tpm`); encrypt a fresh secret to its EK,
    bound to its AK's name (TPM2_MakeCredential)."""
    ak_raw, ek_raw, ek_cert = identity_tpm_unverified(identity_document)
    certified = check_tpm(ak_raw, ek_raw, ek_cert, trust, now=now)
    secret = os.urandom(32)
    blob, encrypted = make_credential(parse_public(ek_raw), parse_public(ak_raw).name(), secret)
    return Challenge(ak_raw, ek_raw, ek_cert, certified, blob, encrypted, secret)


def complete(
    challenge: Challenge,
    answer: bytes,
    issuer: Issuer,
    *,
    now: datetime,
    lifetime: timedelta,
) -> Enrollment:
    """Certify the AK if ``answer`` is the secret only the TPM holding both could recover.

    Only ``ak_public``, ``ek_certificate``, ``ek`` and ``secret`` of ``challenge`` are used:
    a relayed enrolment rebuilds it from what the registrar kept (:mod:`relay`).
    """
    check_activation(challenge.secret, answer)
    ak = parse_public(challenge.ak_public)
    certificate = issue_ak_certificate(
        issuer,
        ak,
        challenge.ek_certificate,
        now=now,
        lifetime=lifetime,
        serial=x509.random_serial_number(),
    )
    return Enrollment(certificate, challenge.ek, ak.name())


def enroll(
    attester: Attester,
    issuer: Issuer,
    trust: EkTrust,
    *,
    now: datetime,
    lifetime: timedelta,
) -> Enrollment:
    """Run the whole enrolment against ``attester``; return the AK certificate or raise."""
    challenge = make_challenge(attester.identity_document(), trust, now=now)
    answer = attester.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    return complete(challenge, answer, issuer, now=now, lifetime=lifetime)


def chain_for(
    enrollment: Enrollment, intermediates: Sequence[x509.Certificate] = ()
) -> list[bytes]:
    """The chain an identity document carries: the AK certificate, then any intermediates."""
    return [c.public_bytes(Encoding.DER) for c in (enrollment.certificate, *intermediates)]
