"""The sealed master secret's on-disk format and its TPM policy, in pure Python.

The master secret is a TPM sealed object (KEYEDHASH) whose only authorisation is a policy:
``PolicyPCR`` over the boot PCRs (SHA-256 bank) at the values they had when it was sealed
(ADR 0010). ``userWithAuth`` and ``adminWithPolicy`` say no password or HMAC session can
stand in for the policy, whatever the object's (empty) authValue.

Blob, version 2 (all integers big-endian)::

    "EMBSEAL2"                   magic and version
    u16   hash bank              0x000B (SHA-256), the bank of the PCRs below
    u8    n                      1..24 PCRs
    n  x  u8                     the PCR indices, strictly ascending
    n  x  32 bytes               their values at seal time, same order
    TPM2B_PUBLIC                 the sealed object's public area (authPolicy = the policy)
    TPM2B_PRIVATE                the sealed object's private area (encrypted by the SRK)

The recorded values are not trusted: the public area's ``authPolicy`` must be the
``PolicyPCR`` digest over them, and the TPM refuses a public area that is not the one the
private area was made with, so an edited value is refused at parse time or by the TPM.
They are there to name the PCRs that differ when a boot changed. Version 1 (``EMBSEAL1``)
had no policy and is refused (:class:`UnboundSealedKeyError`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from embassy.attest.marshal import (
    TPM_ALG_KEYEDHASH,
    TPM_ALG_NULL,
    TPM_ALG_SHA256,
    TPMA_OBJECT_ADMINWITHPOLICY,
    TPMA_OBJECT_FIXEDPARENT,
    TPMA_OBJECT_FIXEDTPM,
    TPMA_OBJECT_NODA,
    PublicArea,
    parse_public_2b,
)
from embassy.errors import (
    BootStateChangedError,
    EmbassyError,
    TpmError,
    UnboundSealedKeyError,
)

SEALED_MAGIC: Final = b"EMBSEAL2"
SEALED_MAGIC_V1: Final = b"EMBSEAL1"
PCR_COUNT: Final = 24
DIGEST_LEN: Final = 32
TPM_CC_POLICY_PCR: Final = 0x0000017F
# No userWithAuth: a password or HMAC session cannot authorise the USER role (unseal);
# adminWithPolicy: nor the ADMIN role (e.g. ObjectChangeAuth). noDA as every embassy object.
SEALED_ATTRIBUTES: Final = (
    TPMA_OBJECT_FIXEDTPM | TPMA_OBJECT_FIXEDPARENT | TPMA_OBJECT_ADMINWITHPOLICY | TPMA_OBJECT_NODA
)
_MAX_2B: Final = 4096


def check_pcrs(pcrs: Sequence[int]) -> tuple[int, ...]:
    """Sorted, distinct SHA-256 bank indices, at least one: a policy over none binds nothing."""
    for p in pcrs:
        if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p < PCR_COUNT:
            raise TpmError(f"PCR index {p!r} outside 0..{PCR_COUNT - 1}")
    out = tuple(sorted(set(pcrs)))
    if not out:
        raise TpmError("sealing to no PCR would bind the secret to no boot state")
    return out


def pcr_selection(pcrs: Sequence[int]) -> bytes:
    """TPML_PCR_SELECTION of ``pcrs`` in the SHA-256 bank (one bank, 3-byte bitmap)."""
    bitmap = bytearray(3)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return (1).to_bytes(4, "big") + TPM_ALG_SHA256.to_bytes(2, "big") + b"\x03" + bytes(bitmap)


def policy_pcr_digest(pcrs: Sequence[int], values: Sequence[bytes]) -> bytes:
    """The policyDigest of a fresh SHA-256 session after TPM2_PolicyPCR(pcrs, values).

    policyDigest = H(0^32 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(values in order)).
    """
    selected = hashlib.sha256(b"".join(values)).digest()
    return hashlib.sha256(
        bytes(DIGEST_LEN) + TPM_CC_POLICY_PCR.to_bytes(4, "big") + pcr_selection(pcrs) + selected
    ).digest()


@dataclass(frozen=True, slots=True)
class SealedBlob:
    """A parsed version-2 blob. ``public`` and ``private`` keep their u16 size prefixes."""

    pcrs: tuple[int, ...]
    values: tuple[bytes, ...]
    public: bytes
    private: bytes

    @property
    def policy(self) -> bytes:
        return policy_pcr_digest(self.pcrs, self.values)

    def encode(self) -> bytes:
        return b"".join(
            (
                SEALED_MAGIC,
                TPM_ALG_SHA256.to_bytes(2, "big"),
                len(self.pcrs).to_bytes(1, "big"),
                bytes(self.pcrs),
                *self.values,
                self.public,
                self.private,
            )
        )

    def changed(self, current: Mapping[int, bytes]) -> tuple[int, ...]:
        """The recorded PCRs whose ``current`` value differs from the one sealed to."""
        return tuple(p for p, v in zip(self.pcrs, self.values, strict=True) if current.get(p) != v)

    def check_boot(self, current: Mapping[int, bytes]) -> None:
        """Raise :class:`BootStateChangedError` naming each PCR that moved since the seal."""
        changed = self.changed(current)
        if changed:
            listed = ", ".join(str(p) for p in self.pcrs)
            moved = ", ".join(
                f"PCR {p} was {v.hex()[:16]}… and is {current.get(p, b'').hex()[:16] or '?'}…"
                for p, v in zip(self.pcrs, self.values, strict=True)
                if p in changed
            )
            raise BootStateChangedError(
                f"the master secret is sealed to boot PCRs {listed} as they were at seal "
                f"time and {moved}: this is another boot (image, kernel command line or "
                "boot path), so the TPM will not unseal it"
            )


def sealed_area(policy: bytes, unique: bytes) -> PublicArea:
    """The public area of an embassy sealed object under ``policy`` (for fakes and checks)."""
    return PublicArea(
        raw=b"",
        type=TPM_ALG_KEYEDHASH,
        name_alg=TPM_ALG_SHA256,
        attributes=SEALED_ATTRIBUTES,
        auth_policy=policy,
        scheme=TPM_ALG_NULL,
        unique=unique,
    )


def _take_2b(data: bytes, at: int, what: str) -> tuple[bytes, int]:
    if len(data) < at + 2:
        raise TpmError(f"unseal: sealed blob is truncated in its {what}")
    size = int.from_bytes(data[at : at + 2], "big")
    end = at + 2 + size
    if size == 0 or size > _MAX_2B or len(data) < end:
        raise TpmError(f"unseal: sealed blob has a bad {what} size {size}")
    return data[at:end], end


def parse_sealed(blob: bytes) -> SealedBlob:
    """Strictly parse a version-2 blob; refuse version 1 (no policy) with what to do."""
    if not isinstance(blob, bytes):
        raise TpmError("unseal: a sealed blob is bytes")
    if blob.startswith(SEALED_MAGIC_V1):
        raise UnboundSealedKeyError(
            "the master secret on disk is sealed in format 1, with an empty password and no "
            "PCR policy: anyone with root on this machine, or another OS booted on it, could "
            "have unsealed it, so it is not used (nor re-sealed: a copy may already exist)"
        )
    if not blob.startswith(SEALED_MAGIC):
        raise TpmError("unseal: not an embassy sealed blob (bad magic/version)")
    at = len(SEALED_MAGIC)
    if len(blob) < at + 3:
        raise TpmError("unseal: sealed blob is truncated in its PCR selection")
    bank = int.from_bytes(blob[at : at + 2], "big")
    if bank != TPM_ALG_SHA256:
        raise TpmError(f"unseal: sealed blob names PCR bank {bank:#06x}, expected SHA-256")
    count = blob[at + 2]
    at += 3
    pcrs = tuple(blob[at : at + count])
    if len(pcrs) != count or not 0 < count <= PCR_COUNT:
        raise TpmError(f"unseal: sealed blob has a bad PCR count {count}")
    if any(p >= PCR_COUNT for p in pcrs) or list(pcrs) != sorted(set(pcrs)):
        raise TpmError(f"unseal: sealed blob's PCRs {list(pcrs)} are not ascending indices")
    at += count
    if len(blob) < at + count * DIGEST_LEN:
        raise TpmError("unseal: sealed blob is truncated in its PCR values")
    values = tuple(blob[at + i * DIGEST_LEN : at + (i + 1) * DIGEST_LEN] for i in range(count))
    at += count * DIGEST_LEN
    public, at = _take_2b(blob, at, "public area")
    private, at = _take_2b(blob, at, "private area")
    if at != len(blob):
        raise TpmError("unseal: trailing bytes after sealed blob")
    sealed = SealedBlob(pcrs, values, public, private)
    try:
        area = parse_public_2b(public)
    except EmbassyError as exc:
        raise TpmError(f"unseal: sealed blob's public area: {exc.message}") from None
    if (
        area.type != TPM_ALG_KEYEDHASH
        or area.name_alg != TPM_ALG_SHA256
        or area.attributes != SEALED_ATTRIBUTES
    ):
        raise TpmError("unseal: blob is not an embassy sealed object (type or attributes)")
    if area.auth_policy != sealed.policy:
        raise TpmError(
            "unseal: the sealed object's policy is not PolicyPCR over the PCR values the blob "
            "records (the blob was altered)"
        )
    return sealed
