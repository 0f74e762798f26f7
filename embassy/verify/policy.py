"""What an auditor decides to trust, given once to every verification."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrustPolicy:
    """The auditor's expectations.

    ``ek_cas``: hardware TPM makers' CAs the EK certificate may chain to;
    ``software_ek_cas``: software TPMs' CAs (swtpm's local CA), whose TPMs are software TPMs
    whatever the embassy claims. ``ak_cas``: registrars' CAs, whose AK certificates name the
    EK certificate they activated against; ``vtpm_ak_cas``: cloud vTPM AK CAs that vouch for
    an AK directly. An AK needs one of them (or a live activation the caller ran).
    ``expected_measurement``:
    the measurement the auditor rebuilt. ``expected_pcrs``: boot PCR values to pin (e.g.
    from the image's expected.json); hardware-TPM evidence needs at least one, since the
    embassy's own PCRs mean something only on a known boot. The ``insecure_*``/``allow_*``
    switches are named for what they give up; each use logs a warning.
    """

    ek_cas: tuple[x509.Certificate, ...] = ()
    software_ek_cas: tuple[x509.Certificate, ...] = ()
    ak_cas: tuple[x509.Certificate, ...] = ()
    vtpm_ak_cas: tuple[x509.Certificate, ...] = ()
    expected_measurement: bytes | None = None
    expected_pcrs: Mapping[int, bytes] = field(default_factory=dict)
    allow_software_tpm: bool = False
    insecure_skip_ek_ca: bool = False
    insecure_skip_ak_certificate: bool = False
    # TPM names of AKs the caller proved itself, by a live credential activation: each
    # stands in for an AK certificate, for this caller only.
    activated_aks: frozenset[bytes] = frozenset()
    insecure_any_measurement: bool = False
    insecure_any_boot: bool = False
    at: datetime | None = None
    # The workload beside the embassy (embassy/verify/workload.py): its image ID
    # ("sha256:<hex>") and its launch digest. None: not pinned.
    expected_image_digest: str | None = None
    expected_launch_digest: bytes | None = None

    def warn_insecure(self) -> None:
        if self.allow_software_tpm:
            _LOG.warning(
                "allow_software_tpm: accepting evidence from a software TPM, which "
                "has no hardware root of trust"
            )
        if self.insecure_skip_ek_ca:
            _LOG.warning("insecure_skip_ek_ca: the EK certificate is not checked against a CA")
        if self.insecure_skip_ak_certificate:
            _LOG.warning(
                "insecure_skip_ak_certificate: the AK is not proven to be in the TPM the EK "
                "certificate names; a document could pair another TPM's AK with it"
            )
        if self.insecure_any_measurement:
            _LOG.warning("insecure_any_measurement: any embassy measurement is accepted")
        if self.insecure_any_boot:
            _LOG.warning(
                "insecure_any_boot: hardware-TPM evidence is accepted without pinned boot "
                "PCRs, so any kernel and system could have measured the embassy"
            )
