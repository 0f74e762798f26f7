"""The small interface the daemon needs from a TPM.

Everything the embassy does with its TPM goes through :class:`Tpm`, so the rest of the
daemon never imports tpm2-pytss and unit tests can use a fake. All PCR operations use the
SHA-256 bank. Methods raise :class:`embassy.errors.TpmError` on any TPM failure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from embassy.attest.types import ClockInfo, Quote, TpmMode


class Tpm(Protocol):
    @property
    def mode(self) -> TpmMode:
        """Hardware TPM or software TPM (swtpm, a debug mode)."""
        ...

    def clock(self) -> ClockInfo:
        """TPM2_ReadClock."""
        ...

    def extend(self, pcr: int, digest: bytes) -> None:
        """TPM2_PCR_Extend of a 32-byte SHA-256 digest into ``pcr``."""
        ...

    def read_pcrs(self, pcrs: Sequence[int]) -> dict[int, bytes]:
        """Current SHA-256 bank values of ``pcrs``."""
        ...

    def quote(self, pcrs: Sequence[int], qualifying_data: bytes) -> Quote:
        """TPM2_Quote with the attestation key over ``pcrs`` (SHA-256 bank)."""
        ...

    def ak_public(self) -> bytes:
        """The attestation key's public area: marshalled TPMT_PUBLIC (no size prefix)."""
        ...

    def ek_public(self) -> bytes:
        """The endorsement key's public area: marshalled TPMT_PUBLIC (no size prefix)."""
        ...

    def ek_certificate(self) -> bytes:
        """The EK certificate (DER) from the TPM's NV index."""
        ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """TPM2_ActivateCredential for the AK under the EK; returns the recovered secret.

        ``credential_blob`` is a marshalled TPM2B_ID_OBJECT's payload (TPM2B_DIGEST hmac +
        encrypted identity), ``encrypted_secret`` the TPM2B_ENCRYPTED_SECRET's payload.
        """
        ...

    def seal(self, data: bytes, pcrs: Sequence[int]) -> bytes:
        """Seal 1..128 bytes to this TPM under PolicyPCR over ``pcrs`` (at least one) at
        their current values. Returns a blob in the format of :mod:`embassy.tpm.sealed`."""
        ...

    def unseal(self, blob: bytes) -> bytes:
        """Unseal a blob made by :meth:`seal` on this same TPM, in a policy session.

        Raises :class:`embassy.errors.BootStateChangedError` (naming the PCRs) when a PCR
        it is sealed to has moved, :class:`embassy.errors.UnboundSealedKeyError` for a
        format-1 blob (no policy), :class:`embassy.errors.TpmError` otherwise.
        """
        ...

    def close(self) -> None:
        """Flush transient objects and release the connection."""
        ...
