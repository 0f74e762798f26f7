"""Forgeries of the TPM's identity, each refused offline with its own reason.

The attacker here holds a TPM of its own (a FakeTpm) and every public byte of a genuine
one: its EK public, its EK certificate, its AK certificate.
"""

from __future__ import annotations

import copy
import datetime
from dataclasses import replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from embassy.attest.akcert import issue_ak_certificate
from embassy.attest.marshal import parse_public
from embassy.attest.types import TpmMode
from embassy.daemon.runtime import Embassy
from embassy.errors import (
    AkNotCertifiedError,
    CertificateError,
    KeyBindingError,
    SoftwareTpmError,
    TpmKindError,
    WireFormatError,
)
from embassy.verify.identity import VerifiedIdentity, verify_identity_document
from embassy.verify.policy import TrustPolicy
from embassy.wire.codec import b64encode, canonical_json
from tests.fakes import FakeTpm, ak_chain_for, fake_registrar, make_ca
from tests.unit.conftest import AT, REGISTRAR, policy_for

BOOT = dict.fromkeys((4, 11, 12), bytes(32))


def check(doc: dict[str, Any], policy: TrustPolicy) -> VerifiedIdentity:
    return verify_identity_document(canonical_json(doc), policy)


class Impostor(FakeTpm):
    """The attacker's own TPM, presenting a genuine TPM's EK and EK certificate."""

    def __init__(self, genuine: FakeTpm) -> None:
        super().__init__(b"attacker", mode=genuine.mode)
        self._genuine = genuine

    def ek_public(self) -> bytes:
        return self._genuine.ek_public()

    def ek_certificate(self) -> bytes:
        return self._genuine.ek_certificate()


def test_genuine_identity_with_registrar_certificate(embassy: Embassy, tpm: FakeTpm) -> None:
    verified = check(embassy.identity_document(), policy_for(tpm))
    assert {"ek-certificate", "ak-certificate", "tpm-kind"} <= set(verified.checks)
    assert verified.tpm is not None
    assert verified.tpm.ak_certificate is not None
    assert verified.tpm.ak_certificate.binds_ek
    assert verified.tpm_mode is TpmMode.SOFTWARE


def test_ak_of_one_tpm_with_another_tpms_ek_has_no_certificate(
    make_embassy: Any, tpm: FakeTpm
) -> None:
    impostor = make_embassy(Impostor(tpm), name="impostor", certify_ak=False)
    with pytest.raises(AkNotCertifiedError, match="carries no AK certificate"):
        check(impostor.identity_document(), policy_for(tpm))


def test_genuine_ak_certificate_spliced_onto_another_ak(make_embassy: Any, tpm: FakeTpm) -> None:
    genuine = make_embassy(tpm, name="genuine")
    impostor = make_embassy(Impostor(tpm), name="impostor", certify_ak=False)
    doc = copy.deepcopy(impostor.identity_document())
    doc["ak_certificates"] = genuine.identity_document()["ak_certificates"]
    with pytest.raises(KeyBindingError, match="certifies another key than the document's AK"):
        check(doc, policy_for(tpm))
    # The daemon will not even serve it.
    with pytest.raises(KeyBindingError):
        impostor.install_ak_chain(ak_chain_for(tpm, REGISTRAR), None)


def test_ak_certificate_from_a_registrar_nobody_trusts(make_embassy: Any, tpm: FakeTpm) -> None:
    impostor = make_embassy(Impostor(tpm), name="impostor", certify_ak=False)
    rogue = fake_registrar(b"rogue")
    impostor.install_ak_chain(ak_chain_for(impostor_tpm(impostor), rogue), None)
    with pytest.raises(CertificateError, match="does not verify with any trusted"):
        check(impostor.identity_document(), policy_for(tpm))


def impostor_tpm(embassy: Embassy) -> FakeTpm:
    device = embassy.tpm
    assert isinstance(device, FakeTpm)
    return device


def test_ak_certificate_for_another_ek_certificate(make_embassy: Any, tpm: FakeTpm) -> None:
    """A registrar that certified the attacker's AK against the attacker's own EK: the
    document swaps in a genuine EK certificate, which the AK certificate does not name."""
    attacker = FakeTpm(b"attacker", ca=(tpm.ca_key, tpm.ca_cert))
    impostor = make_embassy(Impostor(tpm), name="impostor", certify_ak=False)
    cert = issue_ak_certificate(
        REGISTRAR,
        parse_public(attacker.ak_public()),
        attacker.ek_certificate(),
        now=AT,
        lifetime=datetime.timedelta(days=30),
        serial=5,
    )
    doc = copy.deepcopy(impostor.identity_document())
    doc["ak_certificates"] = [b64encode(cert.public_bytes(serialization.Encoding.DER))]
    with pytest.raises(KeyBindingError, match="EK certificate has SHA-256"):
        check(doc, policy_for(tpm))


def test_software_tpm_claiming_hardware(make_embassy: Any) -> None:
    """A software TPM whose statements say ``hardware``: its EK CA is swtpm's, so the
    evidence says software and the claim is a contradiction, even with pinned boot PCRs."""
    liar = FakeTpm(b"liar", mode=TpmMode.HARDWARE)
    embassy = make_embassy(liar, name="liar")
    policy = replace(
        policy_for(liar),
        ek_cas=(),
        software_ek_cas=(liar.ca_cert,),
        allow_software_tpm=False,
        expected_pcrs=BOOT,
    )
    with pytest.raises(TpmKindError, match="claims a hardware TPM but its EK certificate proves"):
        check(embassy.identity_document(), policy)


def test_hardware_tpm_evidence_passes_without_allow_software(make_embassy: Any) -> None:
    hardware = FakeTpm(b"hw", mode=TpmMode.HARDWARE)
    embassy = make_embassy(hardware, name="hw")
    policy = replace(policy_for(hardware), allow_software_tpm=False, expected_pcrs=BOOT)
    verified = check(embassy.identity_document(), policy)
    assert verified.tpm_mode is TpmMode.HARDWARE


def test_software_tpm_evidence_needs_allow(embassy: Embassy, tpm: FakeTpm) -> None:
    with pytest.raises(SoftwareTpmError):
        check(embassy.identity_document(), replace(policy_for(tpm), allow_software_tpm=False))


def test_skipping_the_ek_ca_proves_no_kind(embassy: Embassy, tpm: FakeTpm) -> None:
    policy = replace(policy_for(tpm), software_ek_cas=(), insecure_skip_ek_ca=True)
    verified = check(embassy.identity_document(), policy)
    assert verified.tpm_mode is TpmMode.SOFTWARE
    assert "ek-certificate" not in verified.checks


def test_live_activation_stands_in_for_a_certificate(make_embassy: Any, tpm: FakeTpm) -> None:
    embassy = make_embassy(tpm, name="live", certify_ak=False)
    name = parse_public(tpm.ak_public()).name()
    verified = check(embassy.identity_document(), replace(policy_for(tpm), activated_aks={name}))
    assert "ak-live-activation" in verified.checks
    with pytest.raises(AkNotCertifiedError, match="live credential activation was for another"):
        check(
            embassy.identity_document(),
            replace(policy_for(tpm), activated_aks=frozenset({b"\x00\x0b" + bytes(32)})),
        )


def test_insecure_skip_ak_certificate_is_named_and_warned(
    make_embassy: Any, tpm: FakeTpm, caplog: pytest.LogCaptureFixture
) -> None:
    embassy = make_embassy(tpm, name="skip", certify_ak=False)
    policy = replace(policy_for(tpm), insecure_skip_ak_certificate=True)
    verified = check(embassy.identity_document(), policy)
    assert "ak-certificate" not in verified.checks
    assert "insecure_skip_ak_certificate" in caplog.text


def test_vtpm_ak_certificate_without_ek_binding(make_embassy: Any, tpm: FakeTpm) -> None:
    """A cloud vTPM's own AK certificate names no EK: only a vTPM AK CA may vouch so."""
    key, ca_cert = make_ca(b"cloud", "cloud-vtpm-ak-ca")
    ak = parse_public(tpm.ak_public())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vtpm ak")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(ak.public_key())
        .serial_number(9)
        .not_valid_before(AT - datetime.timedelta(days=1))
        .not_valid_after(AT + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    embassy = make_embassy(tpm, name="vtpm", certify_ak=False)
    embassy.install_ak_chain([cert.public_bytes(serialization.Encoding.DER)], None)
    doc = embassy.identity_document()
    verified = check(doc, replace(policy_for(tpm), ak_cas=(), vtpm_ak_cas=(ca_cert,)))
    assert verified.tpm is not None
    assert verified.tpm.ak_certificate is not None
    assert not verified.tpm.ak_certificate.binds_ek
    with pytest.raises(AkNotCertifiedError, match="does not name the EK certificate"):
        check(doc, replace(policy_for(tpm), ak_cas=(ca_cert,)))


def test_identity_document_v2_shape(embassy: Embassy, tpm: FakeTpm) -> None:
    doc = copy.deepcopy(embassy.identity_document())
    doc["extra"] = 1
    with pytest.raises(WireFormatError, match="extra"):
        check(doc, policy_for(tpm))
    doc = copy.deepcopy(embassy.identity_document())
    doc["ak_certificates"] = ["AAAA"] * 5
    with pytest.raises(WireFormatError, match="more than 4"):
        check(doc, policy_for(tpm))
    doc["ak_certificates"] = ["AAAA"]
    with pytest.raises(WireFormatError, match="not DER"):
        check(doc, policy_for(tpm))
