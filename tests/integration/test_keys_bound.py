"""The master secret against a real swtpm: bound to the boot PCRs, refused to a password.

Each test runs its own swtpm (PCRs it extends must not leak into other tests). A swtpm
serves one client connection at a time, so the TpmDevice is closed before a raw ESAPI
context or tpm2-tools talks to the TPM as the attacker: host root on the same machine.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from embassy.attest.types import TpmMode
from embassy.errors import BootStateChangedError, UnboundSealedKeyError
from tests.integration.conftest import Daemon

_IN_CI = os.environ.get("CI") == "true"
if not _IN_CI:
    pytest.importorskip("tpm2_pytss")

from tpm2_pytss import (  # noqa: E402
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPMT_SYM_DEF,
    TSS2_Exception,
)

from embassy.daemon.keys import SEALED_KEY_FILE, load_or_create_keys  # noqa: E402
from embassy.tpm.device import SRK_ATTRS, TpmDevice, _ecc_template  # noqa: E402
from embassy.tpm.sealed import parse_sealed, policy_pcr_digest  # noqa: E402
from embassy.tpm.swtpm import LOCALCA_TOOL, Swtpm  # noqa: E402

pytestmark = pytest.mark.integration

BOOT = (4, 11, 12)
SECRET = bytes(range(32))
_PERSISTENT = 0x81000010
_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}


def _require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if not os.path.exists(LOCALCA_TOOL):
        missing.append(LOCALCA_TOOL)
    if missing:
        msg = f"swtpm integration tools missing: {', '.join(missing)}"
        if _IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    _require("swtpm", "swtpm_setup")
    sw = Swtpm(tmp_path / "swtpm")
    try:
        sw.ensure_running()
        yield sw
    finally:
        sw.stop()


def _open(sw: Swtpm) -> TpmDevice:
    name, conf = sw.tcti()
    return TpmDevice.open(name, conf, TpmMode.SOFTWARE)


def _raw(sw: Swtpm) -> ESAPI:
    name, conf = sw.tcti()
    return ESAPI(f"{name}:{conf}")


def _seal(sw: Swtpm) -> bytes:
    dev = _open(sw)
    try:
        blob = dev.seal(SECRET, BOOT)
        assert dev.unseal(blob) == SECRET
        return blob
    finally:
        dev.close()


def _load(ectx: ESAPI, blob: bytes) -> ESYS_TR:
    """What host root can do with the blob on disk: load it under the (re-derived) SRK."""
    sealed = parse_sealed(blob)
    srk, *_ = ectx.create_primary(None, _ecc_template(SRK_ATTRS, signing=False), ESYS_TR.OWNER)
    pub, _ = TPM2B_PUBLIC.unmarshal(sealed.public)
    priv, _ = TPM2B_PRIVATE.unmarshal(sealed.private)
    obj = ectx.load(srk, priv, pub)
    ectx.flush_context(srk)
    return obj


def _rc(exc: TSS2_Exception) -> int:
    return int(exc.error)  # the TPM's code without the handle/session/parameter number


def test_the_policy_is_the_one_the_tpm_computes(swtpm: Swtpm) -> None:
    """The pure digest in embassy.tpm.sealed matches a trial PolicyPCR on the TPM."""
    blob = _seal(swtpm)
    sealed = parse_sealed(blob)
    ectx = _raw(swtpm)
    try:
        trial = ectx.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.TRIAL,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        ectx.policy_pcr(trial, None, "sha256:4,11,12")  # the TPM reads the values itself
        assert bytes(ectx.policy_get_digest(trial)) == sealed.policy
        ectx.flush_context(trial)
    finally:
        ectx.close()
    assert sealed.policy == policy_pcr_digest(BOOT, sealed.values)


def test_unseal_after_a_boot_pcr_change_is_refused_naming_it(swtpm: Swtpm) -> None:
    blob = _seal(swtpm)
    dev = _open(swtpm)
    try:
        dev.extend(11, hashlib.sha256(b"a kernel command line with init=/bin/sh").digest())
        with pytest.raises(BootStateChangedError) as caught:
            dev.unseal(blob)
        assert caught.value.code == "sealed-boot-changed"
        assert "PCR 11 was" in caught.value.message
        assert "PCR 4 was" not in caught.value.message
    finally:
        dev.close()


def test_the_tpm_itself_refuses_the_policy_after_a_pcr_change(swtpm: Swtpm) -> None:
    """Not the embassy's own check: a policy session over today's PCR values (what an
    attacker who edits nothing can satisfy) does not match the object's authPolicy."""
    blob = _seal(swtpm)
    ectx = _raw(swtpm)
    try:
        ectx.pcr_extend(ESYS_TR.PCR4, _digest_values(b"another UKI"))
        obj = _load(ectx, blob)
        session = ectx.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        ectx.policy_pcr(session, None, "sha256:4,11,12")
        with pytest.raises(TSS2_Exception) as caught:
            ectx.unseal(obj, session1=session)
        assert _rc(caught.value) == TPM2_RC.POLICY_FAIL
        ectx.flush_context(session)
        # And the values sealed to, asserted in PolicyPCR, are refused as not current.
        session = ectx.start_auth_session(
            ESYS_TR.NONE,
            ESYS_TR.NONE,
            TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
            TPM2_ALG.SHA256,
        )
        selected = hashlib.sha256(b"".join(parse_sealed(blob).values)).digest()
        with pytest.raises(TSS2_Exception) as caught:
            ectx.policy_pcr(session, selected, "sha256:4,11,12")
        assert _rc(caught.value) == TPM2_RC.VALUE
        ectx.flush_context(session)
        ectx.flush_context(obj)
    finally:
        ectx.close()


def test_a_password_session_on_the_loaded_object_is_refused(swtpm: Swtpm) -> None:
    """Host root, same boot, with tpm2-pytss: the empty password no longer unseals."""
    blob = _seal(swtpm)
    ectx = _raw(swtpm)
    try:
        obj = _load(ectx, blob)
        with pytest.raises(TSS2_Exception) as caught:
            ectx.unseal(obj, session1=ESYS_TR.PASSWORD)
        assert _rc(caught.value) == TPM2_RC.AUTH_UNAVAILABLE
        ectx.flush_context(obj)
    finally:
        ectx.close()


def test_tpm2_unseal_with_a_password_is_refused(swtpm: Swtpm) -> None:
    """Host root, same boot, with tpm2-tools: ``tpm2_unseal`` and its default (empty
    password) authorisation gets nothing; the object is made persistent so that the tool
    can name it by handle."""
    _require("tpm2_unseal")
    blob = _seal(swtpm)
    ectx = _raw(swtpm)
    try:
        obj = _load(ectx, blob)
        ectx.evict_control(ESYS_TR.OWNER, obj, _PERSISTENT)
        ectx.flush_context(obj)
    finally:
        ectx.close()
    name, conf = swtpm.tcti()
    tcti = f"{name}:{conf}"
    try:
        for auth in ([], ["-p", ""]):
            out = subprocess.run(
                ["tpm2_unseal", "-T", tcti, "-c", hex(_PERSISTENT), *auth],
                capture_output=True,
                env=_ENV,
                timeout=30,
                check=False,
            )
            assert out.returncode != 0
            assert SECRET not in out.stdout
            assert b"(0x12F)" in out.stderr  # TPM_RC_AUTH_UNAVAILABLE
    finally:
        ectx = _raw(swtpm)
        try:
            handle = ectx.tr_from_tpmpublic(_PERSISTENT)
            ectx.evict_control(ESYS_TR.OWNER, handle, _PERSISTENT)
        finally:
            ectx.close()


def test_the_daemon_keys_survive_a_restart_but_not_another_boot(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    dev = _open(swtpm)
    try:
        first = load_or_create_keys(dev, data, BOOT).public_json()
        dev.extend(13, hashlib.sha256(b"embassy start").digest())  # its own PCR: harmless
        assert load_or_create_keys(dev, data, BOOT).public_json() == first
        dev.extend(12, hashlib.sha256(b"a system extension").digest())
        with pytest.raises(BootStateChangedError, match="PCR 12 was"):
            load_or_create_keys(dev, data, BOOT)
    finally:
        dev.close()
    assert (data / SEALED_KEY_FILE).exists()  # never replaced behind the operator's back


def test_an_old_format_blob_from_this_tpm_is_refused(swtpm: Swtpm) -> None:
    dev = _open(swtpm)
    try:
        with pytest.raises(UnboundSealedKeyError) as caught:
            dev.unseal(b"EMBSEAL1" + bytes(64))
        assert caught.value.code == "sealed-key-unbound"
    finally:
        dev.close()


def _digest_values(label: bytes) -> object:
    from tpm2_pytss import TPML_DIGEST_VALUES, TPMT_HA

    ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
    ha.digest.sha256 = hashlib.sha256(label).digest()
    return TPML_DIGEST_VALUES([ha])


def test_the_daemon_refuses_to_start_on_another_boot(daemon_factory: type[Daemon]) -> None:
    """`embassy serve` end to end: killed (its swtpm, the machine's TPM, stays up), a boot
    PCR moves (another UKI on the same TPM boot), and the next start stops before signing
    anything, naming the PCR, with the TPM's exit code; the blob stays for the operator."""
    daemon = daemon_factory()
    daemon.start()
    blob = (daemon.data_dir / SEALED_KEY_FILE).read_bytes()
    assert blob.startswith(b"EMBSEAL2")
    assert parse_sealed(blob).pcrs == BOOT  # the default pcrs.boot
    log_before = (daemon.data_dir / "log.jsonl").read_bytes()
    assert daemon.stop(signal.SIGKILL) == -signal.SIGKILL
    machine_tpm = Swtpm(daemon.data_dir / "swtpm")
    machine_tpm.ensure_running()  # finds the swtpm the killed daemon left running
    ectx = _raw(machine_tpm)
    try:
        ectx.pcr_extend(ESYS_TR.PCR4, _digest_values(b"another UKI"))
    finally:
        ectx.close()
    with pytest.raises(AssertionError, match="daemon exited 4") as caught:
        daemon.start()
    assert "sealed-boot-changed" in str(caught.value)
    assert "PCR 4 was" in str(caught.value)
    assert (daemon.data_dir / SEALED_KEY_FILE).read_bytes() == blob
    assert (daemon.data_dir / "log.jsonl").read_bytes() == log_before
