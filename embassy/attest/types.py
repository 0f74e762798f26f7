"""Plain values shared by the TPM adapter and the pure verifier."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class TpmMode(enum.StrEnum):
    """Where the embassy's root of trust lives. ``software`` is a debug mode."""

    HARDWARE = "hardware"
    SOFTWARE = "software"


@dataclass(frozen=True, slots=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: milliseconds the TPM has run, its reset and restart counters.

    ``reset_count`` increments on every TPM reset (a new boot: PCRs start from zero again);
    ``restart_count`` on every TPM restart or resume within a boot.
    """

    clock: int
    reset_count: int
    restart_count: int
    safe: bool

    def to_json(self) -> dict[str, int | bool]:
        return {
            "clock": self.clock,
            "reset_count": self.reset_count,
            "restart_count": self.restart_count,
            "safe": self.safe,
        }


@dataclass(frozen=True, slots=True)
class Quote:
    """A TPM2_Quote result in the TPM's own wire encoding, plus the PCR values it covers.

    ``attest`` is the marshalled TPMS_ATTEST, ``signature`` the marshalled TPMT_SIGNATURE;
    both are exactly what the TPM returned, so ``tpm2_checkquote`` accepts them as they are.
    ``pcrs`` maps PCR index to its SHA-256 bank value at quote time.
    """

    attest: bytes
    signature: bytes
    pcrs: dict[int, bytes]
