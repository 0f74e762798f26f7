"""TpmDevice against a real swtpm, checked by independent verifiers (tpm2_checkquote, cryptography).

A swtpm serves one client connection at a time, so every test closes its TpmDevice before
talking to the TPM through a raw ESAPI context.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from embassy.attest.marshal import parse_attest
from embassy.attest.types import Quote, TpmMode
from embassy.errors import TpmError

_IN_CI = os.environ.get("CI") == "true"
if not _IN_CI:
    pytest.importorskip("tpm2_pytss")

from tpm2_pytss import (  # noqa: E402
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_SE,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import make_credential  # noqa: E402

from embassy.tpm.device import TpmDevice  # noqa: E402
from embassy.tpm.swtpm import LOCALCA_TOOL, Swtpm  # noqa: E402

pytestmark = pytest.mark.integration

_TOOLS = ("swtpm", "swtpm_setup", "tpm2_checkquote")
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
_BOOT = (4, 11, 12)  # sealed to their values now; a PCR change is tested in test_keys_bound.py


def require_swtpm() -> None:
    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if not os.path.exists(LOCALCA_TOOL):
        missing.append(LOCALCA_TOOL)
    if missing:
        msg = f"swtpm integration tools missing: {', '.join(missing)}"
        if _IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    require_swtpm()
    sw = Swtpm(tmp_path_factory.mktemp("data") / "swtpm")
    try:
        sw.ensure_running()
        yield sw
    finally:
        sw.stop()


@pytest.fixture(scope="session")
def other_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    require_swtpm()
    sw = Swtpm(tmp_path_factory.mktemp("other") / "swtpm")
    try:
        sw.ensure_running()
        yield sw
    finally:
        sw.stop()


def _open(sw: Swtpm) -> TpmDevice:
    name, conf = sw.tcti()
    return TpmDevice.open(name, conf, TpmMode.SOFTWARE)


@pytest.fixture
def tpm(swtpm: Swtpm) -> Iterator[TpmDevice]:
    dev = _open(swtpm)
    try:
        yield dev
    finally:
        dev.close()


def _raw(sw: Swtpm) -> ESAPI:
    name, conf = sw.tcti()
    return ESAPI(f"{name}:{conf}")


def _transient_and_sessions(ectx: ESAPI) -> list[int]:
    out: list[int] = []
    for first in (TPM2_HC.TRANSIENT_FIRST, TPM2_HC.LOADED_SESSION_FIRST):
        _, data = ectx.get_capability(TPM2_CAP.HANDLES, first, 64)
        out.extend(int(h) for h in data.data.handles)
    return out


def _public(blob: bytes) -> TPMT_PUBLIC:
    pub, used = TPMT_PUBLIC.unmarshal(blob)
    assert used == len(blob)
    return pub


def _ak_pem(ak_public: bytes) -> bytes:
    pub = _public(ak_public)
    x = int.from_bytes(bytes(pub.unique.ecc.x), "big")
    y = int.from_bytes(bytes(pub.unique.ecc.y), "big")
    key = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _checkquote(
    workdir: Path, ak_pem: bytes, attest: bytes, sig: bytes, pcrs: bytes, nonce: bytes
) -> subprocess.CompletedProcess[bytes]:
    """tpm2-tools as the independent verifier: -f is the raw PCR values (tpm2_pcrread -o)."""
    (workdir / "ak.pem").write_bytes(ak_pem)
    (workdir / "quote.msg").write_bytes(attest)
    (workdir / "quote.sig").write_bytes(sig)
    (workdir / "quote.pcrs").write_bytes(pcrs)
    argv = ["tpm2_checkquote", "-u", "ak.pem", "-m", "quote.msg", "-s", "quote.sig"]
    argv += ["-f", "quote.pcrs", "-l", "sha256:13,14", "-g", "sha256", "-q", nonce.hex()]
    return subprocess.run(argv, cwd=workdir, env=_ENV, capture_output=True, timeout=30, check=False)


def test_quote_verifies_with_tpm2_checkquote(tpm: TpmDevice, tmp_path: Path) -> None:
    tpm.extend(13, hashlib.sha256(b"statement log head").digest())
    tpm.extend(14, secrets.token_bytes(32))
    nonce = secrets.token_bytes(32)
    q = tpm.quote([14, 13], nonce)

    assert set(q.pcrs) == {13, 14}
    assert q.pcrs == tpm.read_pcrs([13, 14])
    pcr_file = q.pcrs[13] + q.pcrs[14]
    pem = _ak_pem(tpm.ak_public())

    ok = _checkquote(tmp_path, pem, q.attest, q.signature, pcr_file, nonce)
    assert ok.returncode == 0, ok.stdout + ok.stderr

    tampered = bytearray(q.attest)
    tampered[-1] ^= 0x01
    bad = _checkquote(tmp_path, pem, bytes(tampered), q.signature, pcr_file, nonce)
    assert bad.returncode != 0

    wrong_pcrs = _checkquote(tmp_path, pem, q.attest, q.signature, bytes(64), nonce)
    assert wrong_pcrs.returncode != 0
    wrong_nonce = _checkquote(tmp_path, pem, q.attest, q.signature, pcr_file, bytes(32))
    assert wrong_nonce.returncode != 0


def test_a_quote_carries_exactly_the_values_it_signed(tpm: TpmDevice) -> None:
    """The device returns the PCR values it knows (read, then moved by its own extends)
    only when they hash to the signed pcrDigest; an extend it did not make is caught."""

    def check(q: Quote) -> None:
        signed = parse_attest(q.attest).pcr_digest
        assert hashlib.sha256(q.pcrs[13] + q.pcrs[14]).digest() == signed
        assert q.pcrs == tpm.read_pcrs([13, 14])

    check(tpm.quote([13, 14], b"first"))
    tpm.extend(14, secrets.token_bytes(32))  # known values move along
    check(tpm.quote([13, 14], b"own extend"))
    # Another TPM user extends behind the device's back (here: on its own connection).
    outside = secrets.token_bytes(32)
    before = tpm.read_pcrs([13])[13]
    value = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
    value.digest.sha256 = outside
    tpm._ctx().pcr_extend(ESYS_TR.PCR13, TPML_DIGEST_VALUES([value]))
    q = tpm.quote([13, 14], b"outside extend")
    check(q)
    assert q.pcrs[13] == hashlib.sha256(before + outside).digest()


def test_quote_rejects_bad_arguments(tpm: TpmDevice) -> None:
    with pytest.raises(TpmError):
        tpm.quote([], b"n")
    with pytest.raises(TpmError):
        tpm.quote([13], bytes(65))
    with pytest.raises(TpmError):
        tpm.quote([24], b"n")


def test_extend_is_sha256_of_old_and_digest(tpm: TpmDevice) -> None:
    old = tpm.read_pcrs([15])[15]
    digest = secrets.token_bytes(32)
    tpm.extend(15, digest)
    assert tpm.read_pcrs([15]) == {15: hashlib.sha256(old + digest).digest()}


def test_extend_and_read_reject_bad_input(tpm: TpmDevice) -> None:
    with pytest.raises(TpmError):
        tpm.extend(15, b"\x00" * 31)
    with pytest.raises(TpmError):
        tpm.extend(15, hashlib.sha1(b"x").digest())
    with pytest.raises(TpmError):
        tpm.extend(24, bytes(32))
    with pytest.raises(TpmError):
        tpm.extend(-1, bytes(32))
    with pytest.raises(TpmError):
        tpm.read_pcrs([0, 24])
    with pytest.raises(TpmError):
        tpm.read_pcrs([True])


def test_read_many_pcrs(tpm: TpmDevice) -> None:
    values = tpm.read_pcrs(range(24))
    assert sorted(values) == list(range(24))
    assert all(len(v) == 32 for v in values.values())


def test_reopen_keeps_the_same_boot(swtpm: Swtpm) -> None:
    """A daemon restart on a running TPM: same reset/restart counts, same PCRs, same keys."""
    dev = _open(swtpm)
    try:
        dev.extend(12, secrets.token_bytes(32))
        before, pcrs, ak, ek = dev.clock(), dev.read_pcrs([12]), dev.ak_public(), dev.ek_public()
    finally:
        dev.close()
    dev = _open(swtpm)
    try:
        after = dev.clock()
        assert (after.reset_count, after.restart_count) == (
            before.reset_count,
            before.restart_count,
        )
        assert after.clock >= before.clock
        assert dev.read_pcrs([12]) == pcrs
        assert (dev.ak_public(), dev.ek_public()) == (ak, ek)
    finally:
        dev.close()


def test_seal_unseal_round_trip(tpm: TpmDevice) -> None:
    for data in (b"k", secrets.token_bytes(128)):
        blob = tpm.seal(data, _BOOT)
        assert blob.startswith(b"EMBSEAL2")
        assert len(data) < 16 or data not in blob
        assert tpm.unseal(blob) == data


def test_seal_rejects_bad_sizes(tpm: TpmDevice) -> None:
    with pytest.raises(TpmError):
        tpm.seal(bytes(129), _BOOT)
    with pytest.raises(TpmError):
        tpm.seal(b"", _BOOT)
    with pytest.raises(TpmError):
        tpm.seal(b"k", [])


def test_unseal_rejects_corrupted_blobs(tpm: TpmDevice) -> None:
    blob = tpm.seal(b"the workload key", _BOOT)
    flipped = bytearray(blob)
    flipped[-5] ^= 0x40  # inside the encrypted private area
    for bad in (
        bytes(flipped),
        blob[:-1],
        blob + b"\x00",
        b"EMBSEAL0" + blob[8:],
        b"",
        blob[:20],
    ):
        with pytest.raises(TpmError):
            tpm.unseal(bad)
    assert tpm.unseal(blob) == b"the workload key"


def test_blob_from_another_tpm_does_not_unseal(swtpm: Swtpm, other_swtpm: Swtpm) -> None:
    dev = _open(other_swtpm)
    try:
        foreign = dev.seal(b"not for you", _BOOT)
    finally:
        dev.close()
    dev = _open(swtpm)
    try:
        with pytest.raises(TpmError):
            dev.unseal(foreign)
    finally:
        dev.close()


def _ak_name(ak_public: bytes) -> bytes:
    return b"\x00\x0b" + hashlib.sha256(ak_public).digest()  # nameAlg SHA-256 || digest


def test_activate_credential(tpm: TpmDevice) -> None:
    secret = secrets.token_bytes(32)
    ek = _public(tpm.ek_public())
    id_object, enc_secret = make_credential(ek, secret, _ak_name(tpm.ak_public()))
    got = tpm.activate_credential(bytes(id_object.credential), bytes(enc_secret.secret))
    assert got == secret


def test_activate_credential_for_another_name_fails(tpm: TpmDevice) -> None:
    ek = _public(tpm.ek_public())
    other = _ak_name(b"some other key")
    id_object, enc_secret = make_credential(ek, secrets.token_bytes(32), other)
    with pytest.raises(TpmError):
        tpm.activate_credential(bytes(id_object.credential), bytes(enc_secret.secret))
    with pytest.raises(TpmError):
        tpm.activate_credential(b"junk", b"junk")
    with pytest.raises(TpmError):
        tpm.activate_credential(bytes(5000), b"junk")


def test_ek_certificate_matches_ek_and_chains_to_local_ca(tpm: TpmDevice, swtpm: Swtpm) -> None:
    cert = x509.load_der_x509_certificate(tpm.ek_certificate())
    ek = _public(tpm.ek_public())
    assert ek.type == TPM2_ALG.RSA
    key = cert.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    assert key.public_numbers().n == int.from_bytes(bytes(ek.unique.rsa), "big")
    assert key.public_numbers().e == (ek.parameters.rsaDetail.exponent or 65537)

    cas = x509.load_pem_x509_certificates(swtpm.ca_certificates_pem())
    assert len(cas) == 2
    root, issuer = cas
    assert root.subject == root.issuer
    root.verify_directly_issued_by(root)
    issuer.verify_directly_issued_by(root)
    cert.verify_directly_issued_by(issuer)


def test_ak_public_attributes(tpm: TpmDevice) -> None:
    ak = _public(tpm.ak_public())
    attrs = int(ak.objectAttributes)
    for flag in (
        TPMA_OBJECT.NODA,
        TPMA_OBJECT.RESTRICTED,
        TPMA_OBJECT.SIGN_ENCRYPT,
        TPMA_OBJECT.FIXEDTPM,
        TPMA_OBJECT.FIXEDPARENT,
        TPMA_OBJECT.SENSITIVEDATAORIGIN,
        TPMA_OBJECT.USERWITHAUTH,
    ):
        assert attrs & flag, flag
    assert not attrs & TPMA_OBJECT.DECRYPT
    assert ak.type == TPM2_ALG.ECC
    assert ak.nameAlg == TPM2_ALG.SHA256
    assert ak.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA
    assert ak.parameters.eccDetail.scheme.details.ecdsa.hashAlg == TPM2_ALG.SHA256


def test_leftover_handles_are_flushed_on_open(swtpm: Swtpm) -> None:
    with _raw(swtpm) as ectx:
        ectx.create_primary(None, "ecc256", ESYS_TR.OWNER)
        ectx.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.HMAC,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        assert len(_transient_and_sessions(ectx)) >= 2  # left behind, as by a crash
    dev = _open(swtpm)
    dev.close()
    with _raw(swtpm) as ectx:
        assert _transient_and_sessions(ectx) == []


def test_concurrent_callers(tpm: TpmDevice) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(10):
                q = tpm.quote([13, 14], secrets.token_bytes(16))
                assert set(q.pcrs) == {13, 14}
                tpm.clock()
        except BaseException as e:  # collected and re-raised in the main thread
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_closed_device_raises(swtpm: Swtpm) -> None:
    dev = _open(swtpm)
    dev.close()
    dev.close()  # idempotent
    with pytest.raises(TpmError):
        dev.clock()
    assert dev.mode is TpmMode.SOFTWARE
