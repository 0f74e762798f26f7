"""Which TPM the identity's keys live in, and what kind it is, from evidence alone.

Two questions, each answered by a certificate the auditor's policy trusts, never by the
embassy's word:

1. *Is this AK in a genuine TPM?* An AK certificate chain to a trusted AK CA: a registrar
   that ran credential activation against the EK (its certificate names that EK
   certificate), or a cloud vTPM's AK CA that vouches for the AK directly. A live activation
   the verifier ran itself (``policy.activated_aks``) also answers it, for that verifier only.
   Without either, a document could pair one TPM's EK certificate with another TPM's AK.
2. *What kind of TPM?* The EK certificate's chain: to a hardware vendor's CA or to a
   software TPM's CA (:mod:`embassy.attest.ek`). The statements' ``tpm_mode`` is the
   embassy's claim; a claim that contradicts the evidence is a failure.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from embassy.attest.akcert import CertifiedAk, verify_ak_certificate
from embassy.attest.ek import CertifiedEk, verify_ek_certificate
from embassy.attest.marshal import PublicArea
from embassy.attest.types import TpmMode
from embassy.errors import (
    AkNotCertifiedError,
    CertificateError,
    SoftwareTpmError,
    TpmKindError,
)
from embassy.verify.policy import TrustPolicy

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TpmBinding:
    """What was proved about the TPM: its kind, and how the AK is tied to it."""

    kind: TpmMode
    ek: CertifiedEk | None
    ak_certificate: CertifiedAk | None
    ak_activated_live: bool
    checks: tuple[str, ...]

    def describe(self) -> list[str]:
        facts = []
        if self.ek is not None:
            facts.append(
                f"TPM kind {self.kind.value} (EK certificate: {self.ek.attributes.describe()}; "
                f"EK CA {self.ek.anchor.subject.rfc4514_string() or '(empty name)'})"
            )
        else:
            facts.append(f"TPM kind {self.kind.value}: NOT proven (EK CA check skipped)")
        if self.ak_certificate is not None:
            how = "registrar" if self.ak_certificate.binds_ek else "vTPM AK CA"
            facts.append(
                f"AK certified by {how} "
                f"{self.ak_certificate.anchor.subject.rfc4514_string() or '(empty name)'}"
            )
        elif self.ak_activated_live:
            facts.append("AK proven by a live credential activation this verifier ran")
        else:
            facts.append("AK-EK link: NOT proven (insecure_skip_ak_certificate)")
        return facts


def _classify(
    ek_cert: bytes, ek: PublicArea, policy: TrustPolicy
) -> tuple[CertifiedEk | None, TpmMode | None]:
    if policy.insecure_skip_ek_ca:
        return None, None
    if not policy.ek_cas and not policy.software_ek_cas:
        raise CertificateError(
            "no EK CA certificate given: name the TPM manufacturer's CA (--ek-ca) or, for a "
            "software TPM, swtpm's local CA (--swtpm-ca)"
        )
    certified = verify_ek_certificate(
        ek_cert, policy.ek_cas, ek, software_cas=policy.software_ek_cas, at=policy.at
    )
    return certified, certified.kind


def _certify_ak(
    chain: Sequence[bytes],
    ak: PublicArea,
    ek_cert: bytes,
    policy: TrustPolicy,
) -> tuple[CertifiedAk | None, bool]:
    if chain and (policy.ak_cas or policy.vtpm_ak_cas):
        certified = verify_ak_certificate(
            chain, [*policy.ak_cas, *policy.vtpm_ak_cas], ak, ek_cert, at=policy.at
        )
        if not certified.binds_ek and not any(c == certified.anchor for c in policy.vtpm_ak_cas):
            raise AkNotCertifiedError(
                "the AK certificate does not name the EK certificate it was activated "
                "against, and its CA is not trusted as a vTPM's own AK CA (--vtpm-ak-ca)"
            )
        return certified, False
    if policy.activated_aks:
        if not any(hmac.compare_digest(name, ak.name()) for name in policy.activated_aks):
            raise AkNotCertifiedError(
                f"the live credential activation was for another AK than the document's "
                f"({ak.name().hex()})"
            )
        return None, True
    if policy.insecure_skip_ak_certificate:
        return None, False
    if not chain:
        raise AkNotCertifiedError(
            "the identity document carries no AK certificate: nothing proves offline that its "
            "AK is in the TPM its EK certificate names; enrol the embassy with a registrar "
            "(`embassy registrar enroll`) or verify live (--activate SOCKET)"
        )
    raise AkNotCertifiedError(
        "the identity document carries an AK certificate but no AK CA is trusted: name the "
        "registrar's CA (--ak-ca) or the cloud vTPM's AK CA (--vtpm-ak-ca)"
    )


def verify_tpm_binding(
    *,
    ak: PublicArea,
    ek: PublicArea,
    ek_certificate: bytes,
    ak_chain: Sequence[bytes],
    claimed: TpmMode,
    policy: TrustPolicy,
) -> TpmBinding:
    """Prove the AK is in a TPM of a known kind, or raise why not."""
    checks = []
    certified_ek, kind = _classify(ek_certificate, ek, policy)
    if certified_ek is not None:
        checks.append("ek-certificate")
    certified_ak, live = _certify_ak(ak_chain, ak, ek_certificate, policy)
    if certified_ak is not None:
        checks.append("ak-certificate")
        if not certified_ak.binds_ek:
            # A vTPM's AK CA vouches for the AK itself: the kind is the cloud's TPM, whatever
            # EK certificate the document carries beside it.
            kind = TpmMode.HARDWARE if kind is None else kind
    elif live:
        checks.append("ak-live-activation")
    if kind is None:
        # Nothing proves the kind: treat it as the weaker one.
        kind = TpmMode.SOFTWARE
    elif kind is not claimed:
        raise TpmKindError(
            f"the embassy claims a {claimed.value} TPM but its EK certificate proves a "
            f"{kind.value} TPM"
        )
    if kind is TpmMode.SOFTWARE:
        if not policy.allow_software_tpm:
            raise SoftwareTpmError(
                "the TPM is a software TPM (no hardware root of trust), or its kind is not "
                "proven; pass --allow-software-tpm to accept it for testing"
            )
        _LOG.warning("allow_software_tpm: the identity's TPM is a software TPM")
    checks.append("tpm-kind")
    return TpmBinding(kind, certified_ek, certified_ak, live, tuple(checks))
