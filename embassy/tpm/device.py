"""The :class:`embassy.tpm.interface.Tpm` protocol on a real TPM 2.0, through tpm2-pytss ESAPI.

Key hierarchy (all primaries, so nothing has to be stored on disk and a restarted daemon gets
the very same keys back from the TPM's seeds):

* **EK** - the standard TCG RSA-2048 endorsement key; its template matches the EK certificate
  in NV index 0x01c00002, so a verifier can chain the EK public to the manufacturer's CA.
* **AK** - ECC P-256, ECDSA/SHA-256, restricted signing, in the *endorsement* hierarchy. A
  primary is deterministic across restarts, and a key in the endorsement (or platform)
  hierarchy gets un-obfuscated ``resetCount``/``restartCount`` in its quotes, which the
  verifier uses to detect TPM resets. ``noDA``: an unclean restart must never trip the
  dictionary-attack lockout.
* **SRK** - ECC P-256 restricted decrypt key, AES-128-CFB, owner hierarchy, parent of sealed
  blobs. Sealed data travels over the bus in a parameter-encrypted session salted by the SRK.
* **Sealed objects** - authorised only by PolicyPCR over the boot PCRs at their values when
  sealed (no userWithAuth: a password session is refused); the blob format and the policy
  digest are pure Python in :mod:`embassy.tpm.sealed` (ADR 0010).

Only the AK stays loaded (quotes are the hot path). The EK and SRK are re-derived on demand
and flushed: a TPM without a resource manager (swtpm, /dev/tpm0) guarantees as few as three
transient object slots, and a re-derived primary is checked against the public area
recorded at open, so a changed hierarchy seed is caught rather than used.

One :class:`TpmDevice` per TPM: on a TPM without a resource manager, opening flushes every
transient object and session, including another live TpmDevice's.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HC,
    TPM2_PT_NV,
    TPM2_SE,
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TCTILdr,
    TSS2_Exception,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from embassy.attest.marshal import parse_attest
from embassy.attest.types import ClockInfo, Quote, TpmMode
from embassy.errors import EmbassyError, TpmError
from embassy.tpm.sealed import (
    SEALED_ATTRIBUTES,
    SealedBlob,
    check_pcrs,
    parse_sealed,
    policy_pcr_digest,
)

log = logging.getLogger(__name__)

MAX_SEAL_BYTES = 128
MAX_QUALIFYING_DATA = 64
PCR_COUNT = 24
_EK_TYPE = "EK-RSA2048"
_QUOTE_RETRIES = 3

AK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
    | TPMA_OBJECT.NODA
)
SRK_ATTRS = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.DECRYPT
    | TPMA_OBJECT.NODA
)


def _ecc_template(attrs: int, *, signing: bool) -> TPM2B_PUBLIC:
    pub = TPMT_PUBLIC(type=TPM2_ALG.ECC, nameAlg=TPM2_ALG.SHA256, objectAttributes=attrs)
    ecc = pub.parameters.eccDetail
    ecc.curveID = TPM2_ECC.NIST_P256
    ecc.kdf.scheme = TPM2_ALG.NULL
    if signing:
        ecc.symmetric.algorithm = TPM2_ALG.NULL
        ecc.scheme.scheme = TPM2_ALG.ECDSA
        ecc.scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256
    else:
        ecc.symmetric.algorithm = TPM2_ALG.AES
        ecc.symmetric.keyBits.aes = 128
        ecc.symmetric.mode.aes = TPM2_ALG.CFB
        ecc.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=pub)


def _sealed_template(policy: bytes) -> TPM2B_PUBLIC:
    pub = TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=TPMA_OBJECT(SEALED_ATTRIBUTES),
        authPolicy=TPM2B_DIGEST(policy),
    )
    pub.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return TPM2B_PUBLIC(publicArea=pub)


def _pcr_selection(pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    return TPML_PCR_SELECTION.parse("sha256:" + ",".join(str(p) for p in pcrs))


def _digest(pcrs: Sequence[int], values: dict[int, bytes]) -> bytes:
    """A quote's pcrDigest over one SHA-256 bank: the values in ascending PCR order."""
    return hashlib.sha256(b"".join(values[p] for p in pcrs)).digest()


def _check_pcrs(pcrs: Sequence[int]) -> list[int]:
    """Sorted, de-duplicated SHA-256 bank indices; anything else is refused up front."""
    for p in pcrs:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < PCR_COUNT:
            raise TpmError(f"PCR index {p!r} outside 0..{PCR_COUNT - 1}")
    return sorted(set(pcrs))


class TpmDevice:
    """A TPM 2.0 behind a TCTI. Thread-safe: one lock serialises every TPM command."""

    def __init__(self, ectx: ESAPI, tcti: TCTILdr, mode: TpmMode) -> None:
        """Use :meth:`open`; this only records an already-initialised context."""
        self._ectx: ESAPI | None = ectx
        self._tcti = tcti
        self._mode = mode
        self._lock = threading.Lock()
        self._ak = ESYS_TR.NONE
        self._ak_public = b""
        self._ek_template = TPM2B_PUBLIC()
        self._ek_public = b""
        self._ek_cert: bytes | None = None
        self._srk_public = b""
        # The values PCRs were last read at, moved along by this process's own extends: a
        # quote is returned with them only if they hash to the digest the TPM signed (so a
        # wrong guess, e.g. after another TPM user's extend, costs a read, never a lie).
        self._known: dict[int, bytes] = {}
        self._selections: dict[tuple[int, ...], TPML_PCR_SELECTION] = {}
        self._quote_scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        self._quote_scheme.details.ecdsa.hashAlg = TPM2_ALG.SHA256

    @classmethod
    def open(cls, tcti_name: str, tcti_conf: str, mode: TpmMode) -> TpmDevice:
        """Connect, clean up after a crashed predecessor, derive EK/AK/SRK, read the EK cert."""
        try:
            tcti = TCTILdr(tcti_name, tcti_conf)
        except TSS2_Exception as e:
            raise TpmError(f"tpm open ({tcti_name}:{tcti_conf}): {e}") from e
        try:
            ectx = ESAPI(tcti)
        except TSS2_Exception as e:
            tcti.close()
            raise TpmError(f"tpm open ({tcti_name}:{tcti_conf}): {e}") from e
        dev = cls(ectx, tcti, mode)
        try:
            dev._setup()
        except BaseException:
            dev.close()
            raise
        return dev

    def _setup(self) -> None:
        ectx = self._ctx()
        with self._tss("flush leftovers"):
            self._flush_leftovers(ectx)
        with self._tss("read EK certificate"):
            try:
                cert, self._ek_template = create_ek_template(_EK_TYPE, self._nv_reader(ectx))
            except ValueError as e:  # a malformed EK template in NV
                raise TpmError(f"tpm read EK template: {e}") from e
            self._ek_cert = _trim_der(cert) if cert else None
        with self._tss("create EK"):
            ek, ek_pub = self._create_primary(ectx, ESYS_TR.ENDORSEMENT, self._ek_template)
            ectx.flush_context(ek)
            self._ek_public = ek_pub
        with self._tss("create SRK"):
            srk, self._srk_public = self._create_primary(
                ectx, ESYS_TR.OWNER, _ecc_template(SRK_ATTRS, signing=False)
            )
            ectx.flush_context(srk)
        with self._tss("create AK"):
            self._ak, self._ak_public = self._create_primary(
                ectx, ESYS_TR.ENDORSEMENT, _ecc_template(AK_ATTRS, signing=True)
            )

    # -- Tpm protocol --------------------------------------------------------------------

    @property
    def mode(self) -> TpmMode:
        return self._mode

    def clock(self) -> ClockInfo:
        with self._lock, self._tss("read clock"):
            ci = self._ctx().read_clock().clockInfo
            return ClockInfo(
                clock=int(ci.clock),
                reset_count=int(ci.resetCount),
                restart_count=int(ci.restartCount),
                safe=bool(ci.safe),
            )

    def extend(self, pcr: int, digest: bytes) -> None:
        (index,) = _check_pcrs([pcr])
        if not isinstance(digest, bytes) or len(digest) != 32:
            raise TpmError("PCR extend needs a 32-byte SHA-256 digest")
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
        ha.digest.sha256 = digest
        values = TPML_DIGEST_VALUES([ha])
        with self._lock, self._tss(f"extend PCR {index}"):
            # Forgotten first: if the extend fails half-way, the value is unknown.
            known = self._known.pop(index, None)
            self._ctx().pcr_extend(ESYS_TR.PCR0 + index, values)
            if known is not None:
                self._known[index] = hashlib.sha256(known + digest).digest()

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        wanted = _check_pcrs(pcrs)
        with self._lock, self._tss("read PCRs"):
            values = self._read_pcrs(self._ctx(), wanted)
            self._known.update(values)
            return values

    def quote(self, pcrs: Sequence[int], qualifying_data: bytes) -> Quote:
        """Quote, and return it with the PCR values its signed pcrDigest covers.

        The values are the ones this process knows (last read, moved along by its own
        extends) when they hash to that digest; otherwise they are read, and a mismatch
        still is retried: another TPM user may extend between the two commands.
        """
        wanted = _check_pcrs(pcrs)
        if not wanted:
            raise TpmError("quote needs at least one PCR")
        if not isinstance(qualifying_data, bytes) or len(qualifying_data) > MAX_QUALIFYING_DATA:
            raise TpmError(f"quote qualifying data must be bytes of at most {MAX_QUALIFYING_DATA}")
        key = tuple(wanted)
        selection = self._selections.get(key)
        if selection is None:
            selection = self._selections.setdefault(key, _pcr_selection(wanted))
        with self._lock, self._tss("quote"):
            ectx = self._ctx()
            for _ in range(_QUOTE_RETRIES):
                attest, sig = ectx.quote(self._ak, selection, qualifying_data, self._quote_scheme)
                raw = bytes(attest.attestationData)
                try:
                    signed = parse_attest(raw).pcr_digest
                except EmbassyError as exc:
                    raise TpmError(f"quote: the TPM returned {exc.message}") from None
                values = {p: self._known[p] for p in wanted if p in self._known}
                if len(values) < len(wanted) or _digest(wanted, values) != signed:
                    values = self._read_pcrs(ectx, wanted)
                    self._known.update(values)
                if _digest(wanted, values) == signed:
                    return Quote(attest=raw, signature=bytes(sig.marshal()), pcrs=values)
            raise TpmError("quote: PCRs kept changing under the quote (another TPM user?)")

    def ak_public(self) -> bytes:
        return self._ak_public

    def ek_public(self) -> bytes:
        return self._ek_public

    def ek_certificate(self) -> bytes:
        if self._ek_cert is None:
            raise TpmError("this TPM has no EK certificate in NV index 0x01c00002")
        return self._ek_cert

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The EK is authorised by PolicySecret(TPM_RH_ENDORSEMENT) - its TCG policy."""
        try:
            blob = TPM2B_ID_OBJECT(credential=credential_blob)
            secret = TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret)
        except (TypeError, ValueError, IndexError) as e:  # e.g. longer than the TPM2B allows
            raise TpmError(f"activate credential: malformed input: {e}") from e
        with self._lock, self._tss("activate credential"):
            ectx = self._ctx()
            ek = self._load_primary(ectx, ESYS_TR.ENDORSEMENT, self._ek_template, self._ek_public)
            session = ESYS_TR.NONE
            try:
                session = ectx.start_auth_session(
                    ESYS_TR.NONE,
                    ESYS_TR.NONE,
                    TPM2_SE.POLICY,
                    TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                    TPM2_ALG.SHA256,
                )
                ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
                cert_info = ectx.activate_credential(
                    self._ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
                )
                return bytes(cert_info)
            finally:
                self._flush_quietly(ectx, session)
                self._flush_quietly(ectx, ek)

    def seal(self, data: bytes, pcrs: Sequence[int]) -> bytes:
        """Seal 1..128 bytes under PolicyPCR over ``pcrs`` at their current values.

        The TPM refuses an empty caller-supplied sealed object. The PCRs are read again
        after the create: a blob sealed to values that moved meanwhile is never returned.
        """
        if not isinstance(data, bytes) or not 0 < len(data) <= MAX_SEAL_BYTES:
            raise TpmError(f"seal takes 1 to {MAX_SEAL_BYTES} bytes")
        wanted = check_pcrs(pcrs)
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=data))
        with self._lock, self._tss("seal"):
            ectx = self._ctx()
            current = self._read_pcrs(ectx, list(wanted))
            values = tuple(current[p] for p in wanted)
            template = _sealed_template(policy_pcr_digest(wanted, values))
            with self._srk_session(ectx, TPMA_SESSION.DECRYPT) as (srk, session):
                priv, pub, *_ = ectx.create(srk, sensitive, template, session1=session)
            if self._read_pcrs(ectx, list(wanted)) != current:
                raise TpmError(f"seal: boot PCRs {list(wanted)} changed while sealing")
            blob = SealedBlob(wanted, values, bytes(pub.marshal()), bytes(priv.marshal()))
            return parse_sealed(blob.encode()).encode()  # what unseal will accept, or raise

    def unseal(self, blob: bytes) -> bytes:
        """Unseal in a policy session (PolicyPCR), salted by the SRK so the secret is
        encrypted on the bus. A boot PCR that moved since the seal raises
        :class:`BootStateChangedError` naming it, whether seen by the read before or by the
        TPM's own PolicyPCR check (a PCR extended in between)."""
        sealed = parse_sealed(blob)
        try:
            pub, _ = TPM2B_PUBLIC.unmarshal(sealed.public)
            priv, _ = TPM2B_PRIVATE.unmarshal(sealed.private)
        except (TSS2_Exception, ValueError, TypeError, IndexError) as e:
            raise TpmError(f"unseal: malformed sealed blob: {e}") from e
        selection = _pcr_selection(sealed.pcrs)
        selected = hashlib.sha256(b"".join(sealed.values)).digest()
        with self._lock, self._tss("unseal"):
            ectx = self._ctx()
            sealed.check_boot(self._read_pcrs(ectx, list(sealed.pcrs)))
            srk = self._load_primary(
                ectx, ESYS_TR.OWNER, _ecc_template(SRK_ATTRS, signing=False), self._srk_public
            )
            session = obj = ESYS_TR.NONE
            try:
                session = ectx.start_auth_session(
                    srk,
                    ESYS_TR.NONE,
                    TPM2_SE.POLICY,
                    TPMT_SYM_DEF.parse("aes128cfb"),
                    TPM2_ALG.SHA256,
                )
                ectx.trsess_set_attributes(
                    session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.ENCRYPT
                )
                try:
                    ectx.policy_pcr(session, TPM2B_DIGEST(selected), selection)
                except TSS2_Exception as e:
                    sealed.check_boot(self._read_pcrs(ectx, list(sealed.pcrs)))
                    raise TpmError(f"tpm unseal: PolicyPCR refused: {e}") from e
                obj = ectx.load(srk, priv, pub)
                return bytes(ectx.unseal(obj, session1=session))
            finally:
                self._flush_quietly(ectx, obj)
                self._flush_quietly(ectx, session)
                self._flush_quietly(ectx, srk)

    def close(self) -> None:
        with self._lock:
            ectx, self._ectx = self._ectx, None
            if ectx is not None:
                self._flush_quietly(ectx, self._ak)
                self._ak = ESYS_TR.NONE
                ectx.close()
                self._tcti.close()

    # -- helpers -------------------------------------------------------------------------

    def _ctx(self) -> ESAPI:
        if self._ectx is None:
            raise TpmError("TPM device is closed")
        return self._ectx

    @staticmethod
    @contextmanager
    def _tss(operation: str) -> Iterator[None]:
        """Every tpm2-pytss failure leaves this module as a TpmError naming the operation."""
        try:
            yield
        except TSS2_Exception as e:
            raise TpmError(f"tpm {operation}: {e}") from e

    @staticmethod
    def _flush_quietly(ectx: ESAPI, handle: Any) -> None:
        if handle != ESYS_TR.NONE:
            with suppress(TSS2_Exception):
                ectx.flush_context(handle)

    @staticmethod
    def _flush_leftovers(ectx: ESAPI) -> None:
        """A crashed predecessor's objects and sessions stay in a TPM without a resource
        manager and would exhaust its few slots: flush every one (best effort)."""
        for first in (
            TPM2_HC.TRANSIENT_FIRST,
            TPM2_HC.LOADED_SESSION_FIRST,
            TPM2_HC.ACTIVE_SESSION_FIRST,
        ):
            for handle in _handles(ectx, first):
                try:
                    ectx.flush_context(ectx.tr_from_tpmpublic(handle))
                    log.info("flushed leftover TPM handle 0x%08x", handle)
                except TSS2_Exception as e:
                    log.warning("could not flush leftover TPM handle 0x%08x: %s", handle, e)

    @staticmethod
    def _create_primary(ectx: ESAPI, hierarchy: Any, template: TPM2B_PUBLIC) -> tuple[Any, bytes]:
        handle, pub, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), template, hierarchy)
        return handle, bytes(pub.publicArea.marshal())

    def _load_primary(
        self, ectx: ESAPI, hierarchy: Any, template: TPM2B_PUBLIC, expected: bytes
    ) -> Any:
        handle, pub = self._create_primary(ectx, hierarchy, template)
        if pub != expected:
            self._flush_quietly(ectx, handle)
            raise TpmError("a primary key changed since open (hierarchy seed changed?)")
        return handle

    @contextmanager
    def _srk_session(self, ectx: ESAPI, direction: int) -> Iterator[tuple[Any, Any]]:
        """The SRK plus an HMAC session salted by it that encrypts the secret on the bus."""
        srk = self._load_primary(
            ectx, ESYS_TR.OWNER, _ecc_template(SRK_ATTRS, signing=False), self._srk_public
        )
        session = ESYS_TR.NONE
        try:
            session = ectx.start_auth_session(
                srk, ESYS_TR.NONE, TPM2_SE.HMAC, TPMT_SYM_DEF.parse("aes128cfb"), TPM2_ALG.SHA256
            )
            ectx.trsess_set_attributes(session, TPMA_SESSION.CONTINUESESSION | direction)
            yield srk, session
        finally:
            self._flush_quietly(ectx, session)
            self._flush_quietly(ectx, srk)

    @staticmethod
    def _read_pcrs(ectx: ESAPI, wanted: list[int]) -> dict[int, bytes]:
        """PCR_Read returns at most 8 digests per call: ask again for what is missing."""
        out: dict[int, bytes] = {}
        while len(out) < len(wanted):
            missing = [p for p in wanted if p not in out]
            _, sel, digests = ectx.pcr_read(_pcr_selection(missing))
            got = [
                p
                for s in sel.pcrSelections[: sel.count]
                if s.hash == TPM2_ALG.SHA256
                for p in range(PCR_COUNT)
                if s.pcrSelect[p // 8] & (1 << (p % 8))
            ]
            if not got:
                raise TpmError(f"PCR read: SHA-256 bank has none of PCRs {missing}")
            for p, d in zip(got, digests, strict=True):
                out[p] = bytes(d)
        return out

    @staticmethod
    def _nv_reader(ectx: ESAPI) -> Callable[[int], bytes]:
        """NV read callback for create_ek_template: probes via the handle list (no noisy TSS
        error for absent indices) and reads in NV_BUFFER_MAX-sized chunks."""
        present = set(_handles(ectx, TPM2_HC.NV_INDEX_FIRST))
        _, caps = ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT_NV.BUFFER_MAX, 1)
        props = [p for p in caps.data.tpmProperties if p.property == TPM2_PT_NV.BUFFER_MAX]
        chunk = int(props[0].value) if props else 512

        def read(index: int) -> bytes:
            if int(index) not in present:  # create_ek_template's contract for 'absent'
                raise NoSuchIndex(index)
            nvh = ectx.tr_from_tpmpublic(index)
            nvpub, _ = ectx.nv_read_public(nvh)
            attrs = nvpub.nvPublic.attributes
            auth = nvh if attrs & TPMA_NV.AUTHREAD else ESYS_TR.OWNER
            size = int(nvpub.nvPublic.dataSize)
            data = b""
            while len(data) < size:
                part = bytes(ectx.nv_read(nvh, min(chunk, size - len(data)), len(data), auth))
                if not part:
                    raise TpmError(f"NV read of 0x{int(index):08x} returned no data")
                data += part
            return data

        return read


def _handles(ectx: ESAPI, first: int) -> list[int]:
    out: list[int] = []
    more = True
    start = first
    while more:
        more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 64)
        handles = [int(h) for h in data.data.handles]
        same_range = [h for h in handles if h >> 24 == first >> 24]
        out.extend(same_range)
        if not handles or len(same_range) < len(handles):
            break
        start = handles[-1] + 1
    return out


def _trim_der(cert: bytes) -> bytes:
    """EK certificate NV indices may be larger than the DER they hold: cut at its length."""
    if len(cert) < 2 or cert[0] != 0x30:
        raise TpmError("EK certificate in NV is not DER")
    first = cert[1]
    if first < 0x80:
        total = 2 + first
    else:
        n = first & 0x7F
        if not 1 <= n <= 4 or len(cert) < 2 + n:
            raise TpmError("EK certificate in NV has a bad DER length")
        total = 2 + n + int.from_bytes(cert[2 : 2 + n], "big")
    if total > len(cert):
        raise TpmError("EK certificate in NV is truncated")
    return cert[:total]
