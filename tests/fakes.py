"""A deterministic software stand-in for a TPM, for fast unit tests and test vectors.

It is *not* a mock of behaviour we hope for: it produces real TPMS_ATTEST / TPMT_SIGNATURE
bytes signed by a real (software) ECDSA key, real PCR extends and a real EK certificate
chain, so the pure verifier checks it exactly as it checks a hardware TPM. Integration
tests use the real swtpm instead.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from embassy.attest.akcert import Issuer, issue_ak_certificate
from embassy.attest.marshal import (
    TPM_ALG_ECDSA,
    TPM_ALG_SHA256,
    TPM_GENERATED_VALUE,
    TPM_ST_ATTEST_QUOTE,
    Attest,
    PcrSelection,
    Signature,
    ak_public_from_key,
    ek_public_from_key,
    encode_attest,
    encode_public,
    encode_signature,
    parse_public,
    parse_public_2b,
)
from embassy.attest.quote import pcr_digest
from embassy.attest.types import ClockInfo, Quote, TpmMode
from embassy.errors import SealError, TpmError
from embassy.net.identity import NetnsId
from embassy.seal.proof import SealProof
from embassy.seal.rules import seal_rules
from embassy.tpm.sealed import (
    SealedBlob,
    check_pcrs,
    parse_sealed,
    policy_pcr_digest,
    sealed_area,
)

RULES = seal_rules()

_EPOCH = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _scalar(seed: bytes, label: str) -> int:
    return int.from_bytes(hashlib.sha256(seed + label.encode()).digest(), "big") % (2**255) + 1


def make_ca(seed: bytes, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.derive_private_key(_scalar(seed, name), ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(seed + name.encode()).digest()[:8], "big"))
        .not_valid_before(_EPOCH)
        .not_valid_after(_EPOCH + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    return key, cert


class FakeTpm:
    """Implements ``embassy.tpm.interface.Tpm`` in software, deterministically from ``seed``."""

    def __init__(
        self,
        seed: bytes = b"fake-tpm",
        *,
        mode: TpmMode = TpmMode.SOFTWARE,
        ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None,
    ) -> None:
        self._mode = mode
        self._ak = ec.derive_private_key(_scalar(seed, "ak"), ec.SECP256R1())
        self._ak_public = ak_public_from_key(self._ak.public_key())
        # An ECC EK (TCG template L-2) so that every byte is derived from ``seed``.
        self._ek = ec.derive_private_key(_scalar(seed, "ek"), ec.SECP256R1())
        self._ek_public = ek_public_from_key(self._ek.public_key())
        self.ca_key, self.ca_cert = ca or make_ca(seed, "fake-ek-ca")
        self._ek_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.ca_cert.subject)
            .public_key(self._ek.public_key())
            .serial_number(7)
            .not_valid_before(_EPOCH)
            .not_valid_after(_EPOCH + datetime.timedelta(days=3650))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DirectoryName(
                            x509.Name(
                                [
                                    x509.NameAttribute(
                                        x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014"
                                    ),
                                ]
                            )
                        )
                    ]
                ),
                critical=True,
            )
            .sign(self.ca_key, hashes.SHA256(), ecdsa_deterministic=True)
        )
        self.pcrs: dict[int, bytes] = {i: bytes(32) for i in range(24)}
        self.reset_count = 1
        self.restart_count = 0
        self.ms = 1000
        self.sealed: dict[bytes, bytes] = {}
        self.extends = 0

    @property
    def mode(self) -> TpmMode:
        return self._mode

    def tick(self, ms: int = 1) -> None:
        self.ms += ms

    def reset(self) -> None:
        """A TPM reset: a new boot, PCRs back to zero."""
        self.pcrs = {i: bytes(32) for i in range(24)}
        self.reset_count += 1
        self.restart_count = 0

    def clock(self) -> ClockInfo:
        self.tick()
        return ClockInfo(self.ms, self.reset_count, self.restart_count, True)

    def extend(self, pcr: int, digest: bytes) -> None:
        if len(digest) != 32:
            raise TpmError("extend: digest must be 32 bytes")
        self.pcrs[pcr] = hashlib.sha256(self.pcrs[pcr] + digest).digest()
        self.extends += 1

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        return {p: self.pcrs[p] for p in pcrs}

    def quote(self, pcrs: Sequence[int], qualifying_data: bytes) -> Quote:
        selection = (PcrSelection(TPM_ALG_SHA256, tuple(sorted(set(pcrs)))),)
        values = self.read_pcrs(sorted(set(pcrs)))
        attest = encode_attest(
            Attest(
                magic=TPM_GENERATED_VALUE,
                type=TPM_ST_ATTEST_QUOTE,
                qualified_signer=self._ak_public.name(),
                extra_data=qualifying_data,
                clock=self.clock(),
                firmware_version=0x20240125,
                pcr_selection=selection,
                pcr_digest=pcr_digest(selection, values),
            )
        )
        der = self._ak.sign(attest, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        r, s = decode_dss_signature(der)
        return Quote(
            attest, encode_signature(Signature(TPM_ALG_ECDSA, TPM_ALG_SHA256, r, s)), values
        )

    def ak_public(self) -> bytes:
        return self._ak_public.raw

    def ek_public(self) -> bytes:
        return self._ek_public.raw

    def ek_certificate(self) -> bytes:
        return self._ek_cert.public_bytes(serialization.Encoding.DER)

    def ca_pem(self) -> bytes:
        return self.ca_cert.public_bytes(serialization.Encoding.PEM)

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        raise TpmError("FakeTpm does not implement ActivateCredential; use the swtpm tests")

    def seal(self, data: bytes, pcrs: Sequence[int]) -> bytes:
        """A real format-2 blob: PolicyPCR over ``pcrs`` now, as a TPM would make it."""
        wanted = check_pcrs(pcrs)
        values = tuple(self.pcrs[p] for p in wanted)
        unique = hashlib.sha256(b"fake-sealed-unique" + data).digest()
        public = encode_public(sealed_area(policy_pcr_digest(wanted, values), unique))
        private = b"FAKESEAL" + hashlib.sha256(public + data).digest()
        self.sealed[private] = data
        return SealedBlob(
            wanted,
            values,
            len(public).to_bytes(2, "big") + public,
            len(private).to_bytes(2, "big") + private,
        ).encode()

    def unseal(self, blob: bytes) -> bytes:
        """As a TPM: the policy session's PolicyPCR digest over the *current* values must be
        the object's authPolicy, else it is refused (naming the PCRs that moved)."""
        sealed = parse_sealed(blob)
        current = self.read_pcrs(sealed.pcrs)
        sealed.check_boot(current)
        session = policy_pcr_digest(sealed.pcrs, tuple(current[p] for p in sealed.pcrs))
        if parse_public_2b(sealed.public).auth_policy != session:
            raise TpmError("unseal: TPM_RC_POLICY_FAIL")
        data = self.sealed.get(sealed.private[2:])
        if data is None or sealed.private[2:] != (
            b"FAKESEAL" + hashlib.sha256(sealed.public[2:] + data).digest()
        ):
            raise TpmError("unseal: blob not sealed by this TPM")
        return data

    def close(self) -> None:
        pass


def fake_registrar(seed: bytes = b"registrar") -> Issuer:
    """A registrar's CA, deterministic from ``seed`` like the FakeTpm's EK CA."""
    key, cert = make_ca(seed, "fake-registrar-ca")
    return Issuer(key, cert)


def ak_chain_for(tpm: FakeTpm, registrar: Issuer, *, serial: int = 11) -> list[bytes]:
    """The AK certificate chain a registrar issues for ``tpm`` after credential activation
    (which a FakeTpm would pass: its AK and EK are one object's)."""
    cert = issue_ak_certificate(
        registrar,
        parse_public(tpm.ak_public()),
        tpm.ek_certificate(),
        now=_EPOCH,
        lifetime=datetime.timedelta(days=3650),
        serial=serial,
    )
    return [cert.public_bytes(serialization.Encoding.DER)]


class MemorySeal:
    """The seal keeper's contract in memory: for ordering, crash and race tests of the
    session manager. The real link gate is tested from the attacker's side in
    tests/integration.

    ``lift_in_check`` makes the seal fall away right before the n-th :meth:`check` (the
    gate opened behind the embassy's back, or the workload moved to another namespace).
    """

    def __init__(self) -> None:
        self.closed = False
        self.quarantined = False
        self.netns = NetnsId(1, 4026531840)
        self.history: list[str] = []
        self.checks = 0
        self.lift_in_check: int | None = None

    def close(self) -> SealProof:
        self.closed = True
        self.history.append("close")
        return SealProof(self.netns, "ewfake", RULES.digest)

    def open(self) -> str:
        self.history.append("open")
        if self.quarantined:
            return "quarantined"
        self.closed = False
        return "unsealed"

    def settle(self) -> None:
        self.history.append("settle")

    def check(self, proof: SealProof, *, settled: bool = True) -> None:
        self.checks += 1
        if self.lift_in_check == self.checks:
            self.closed = False
        if not self.closed:
            raise SealError("the gate is open")
        if proof.netns != self.netns:
            raise SealError("the workload's namespace changed")

    def status(self) -> dict[str, object]:
        return {"gate": "closed" if self.closed else "open"}


FAKE_IMAGE_DIGEST = "sha256:" + "ab" * 32


class FakeSealedWorkload:
    """Stands in for ``embassy.daemon.sealed_workload.SealedWorkload`` in an in-process
    embassy: it logs the launch events a real launch logs (for image ``FAKE_IMAGE_DIGEST``)
    and runs nothing. ``identity`` is what its seal statements would name.

    ``own_processes`` says whether every peer is taken for a workload process (default: no
    peer is); ``keeper.closed`` whether the workload counts as sealed."""

    own_processes = False

    def __init__(self, config: object, spec: object, log: object, **_: object) -> None:
        import json
        import types

        from embassy.log.entry import EntryType
        from embassy.sessions.manager import WorkloadIdentity
        from embassy.workload.spec import WorkloadSpec, launch_config_digest, launch_events

        assert isinstance(spec, WorkloadSpec)
        policy = {"backend": "fake", "rules_sha256": RULES.digest}
        for kind, body in launch_events(spec, FAKE_IMAGE_DIGEST, policy):
            log.append_event(EntryType(kind), json.loads(body))  # type: ignore[attr-defined]
        self.identity = WorkloadIdentity(
            FAKE_IMAGE_DIGEST, "c0ffee" * 4, launch_config_digest(spec, FAKE_IMAGE_DIGEST)
        )
        # What the runtime reads of a real SealedWorkload's launch and seal keeper.
        self.launched = types.SimpleNamespace(
            image_digest=FAKE_IMAGE_DIGEST,
            workload_id=self.identity.container_id,
            launch_digest=self.identity.launch_digest.hex(),
        )
        self.keeper = types.SimpleNamespace(closed=False)

    def close(self) -> None:
        pass

    def is_own_process(self, peer: object) -> bool:
        return self.own_processes

    def authorize(self, peer: object) -> None:
        from embassy.errors import ForbiddenError

        if not self.is_own_process(peer):
            raise ForbiddenError("session routes answer only the workload's own processes")


class _NoIntake:
    @classmethod
    def for_metering(cls, *_: object, **__: object) -> _NoIntake:
        return cls()

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def drain(self) -> int:
        return 0

    def queue_depth(self) -> int:
        return 0


class FakeWorkloadRuntime:
    """While active, an ``Embassy`` whose config has a workload launches a
    :class:`FakeSealedWorkload` (no Docker, no spool mount, no activation intake)."""

    _NAME = "embassy.daemon.sealed_workload"

    def __enter__(self) -> None:
        import sys
        import types

        import embassy.daemon.runtime as runtime
        import embassy.daemon.spool as spool

        module = types.ModuleType(self._NAME)
        module.SealedWorkload = FakeSealedWorkload  # type: ignore[attr-defined]
        self._saved = (
            sys.modules.get(self._NAME),
            spool.ensure_spool,
            runtime.ActivationIntake,
        )
        sys.modules[self._NAME] = module
        spool.ensure_spool = lambda *_, **__: "mounted"  # type: ignore[assignment]
        runtime.ActivationIntake = _NoIntake  # type: ignore[assignment,misc]

    def __exit__(self, *_: object) -> None:
        import sys

        import embassy.daemon.runtime as runtime
        import embassy.daemon.spool as spool

        module, spool.ensure_spool, runtime.ActivationIntake = self._saved  # type: ignore[misc]
        if module is None:
            sys.modules.pop(self._NAME, None)
        else:
            sys.modules[self._NAME] = module


class FakeJobContainers:
    """Job containers with no Docker: a slot is a spool directory under ``root``; the test
    says which are running (``exit``) and what a destroy finds (``leave``)."""

    image_digest = "sha256:" + "ab" * 32
    runtime = "runc"

    def __init__(self, root: object) -> None:
        from pathlib import Path

        self.root = Path(str(root))
        self.root.mkdir(parents=True, exist_ok=True)
        self.created: list[str] = []
        self.destroyed: list[str] = []
        self.exited: dict[str, int] = {}
        self.leave: set[str] = set()  # parts a destroy finds still there
        self.left_over: list[str] = []  # containers an earlier run left (swept at start)
        self._n = 0

    def create(self) -> object:
        from embassy.jobs.containers import Slot

        self._n += 1
        cid = hashlib.sha256(f"job-{self._n}-{id(self)}".encode()).hexdigest()
        spool = self.root / cid[:12]
        spool.mkdir()
        self.created.append(cid)
        return Slot(
            container_id=cid,
            name=f"embassy-test-job-{cid[:12]}",
            spool=spool,
            image_digest=self.image_digest,
            runtime=self.runtime,
            created="2026-01-01T00:00:00.000000001Z",
            started="2026-01-01T00:00:00.100000001Z",
            upper_dir=None,
        )

    def state(self, slot: object) -> tuple[bool, int | None]:
        cid = slot.container_id  # type: ignore[attr-defined]
        if cid in self.destroyed:
            return False, None
        code = self.exited.get(cid)
        return (code is None), code

    def destroy(self, slot: object) -> object:
        import shutil

        from embassy.jobs.containers import Gone

        cid = slot.container_id  # type: ignore[attr-defined]
        self.destroyed.append(cid)
        shutil.rmtree(slot.spool, ignore_errors=True)  # type: ignore[attr-defined]
        return Gone(
            container="still there (running)" if "container" in self.leave else "inspect-404",
            writable_layer="not-reported",
            spool="absent",
            mounts="none",
        )

    def sweep(self) -> list[tuple[str, object]]:
        from embassy.jobs.containers import Gone

        out = [(c, Gone("inspect-404", "absent", "absent", "none")) for c in self.left_over]
        self.left_over = []
        return out  # type: ignore[return-value]
