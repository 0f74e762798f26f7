"""When a result was made: its seal and unseal on the TPM clock, bounded by the user's own
evidence quotes.

A statement's header carries the TPM clock read when it was signed (milliseconds the TPM
has been powered since it was cleared, with its boot and restart counts); the seal and
unseal bodies add the embassy's wall time (its word, not the TPM's). Evidence is a quote
over a nonce the user chose (``GET /v1/evidence``): taken before sending and after
receiving, two of them bound the session in the user's own time, whatever the embassy's
wall clock says::

    before.clock <= seal.clock <= unseal.clock <= after.clock     (one TPM boot)
    before.head_seq < seal.seq,  unseal.seq <= after.head_seq     (log order)

so the session began after the user asked for the first nonce's quote and ended before
the second's was made.
"""

from __future__ import annotations

from dataclasses import dataclass

from embassy.attest.types import ClockInfo
from embassy.errors import TimeWindowError
from embassy.verify.evidence import VerifiedEvidence
from embassy.verify.segment import LoggedStatement


def clock_key(clock: ClockInfo) -> tuple[int, int, int]:
    """TPM time as an ordered key: boot, then restart, then milliseconds."""
    return (clock.reset_count, clock.restart_count, clock.clock)


@dataclass(frozen=True, slots=True)
class StatementTime:
    """When a statement was signed: its log position, TPM clock and claimed wall time."""

    seq: int
    clock: ClockInfo
    wall_time_unix: int | None

    @classmethod
    def of(cls, logged: LoggedStatement) -> StatementTime:
        wall = logged.statement.body.get("wall_time_unix")
        return cls(
            logged.entry.seq,
            logged.statement.header.clock,
            wall if isinstance(wall, int) and not isinstance(wall, bool) else None,
        )

    def to_json(self) -> dict[str, object]:
        return {"seq": self.seq, "tpm": self.clock.to_json(), "wall_time_unix": self.wall_time_unix}

    def describe(self) -> str:
        wall = "" if self.wall_time_unix is None else f", wall time {self.wall_time_unix} (unix s)"
        return (
            f"seq {self.seq}, TPM clock {self.clock.clock} ms (boot {self.clock.reset_count}, "
            f"restart {self.clock.restart_count}){wall}"
        )


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """A result's window: seal to unseal, and the user's evidence around it if given."""

    seal: StatementTime
    unseal: StatementTime
    before: VerifiedEvidence | None = None
    after: VerifiedEvidence | None = None

    @property
    def tpm_ms(self) -> int:
        """TPM milliseconds from the seal to the unseal."""
        return self.unseal.clock.clock - self.seal.clock.clock

    def to_json(self) -> dict[str, object]:
        """The window for machines (``verify result --json``): what each fact above says."""
        out: dict[str, object] = {
            "seal": self.seal.to_json(),
            "unseal": self.unseal.to_json(),
            "sealed_tpm_ms": self.tpm_ms,
        }
        for name, evidence in (("before", self.before), ("after", self.after)):
            if evidence is not None:
                out[name] = {
                    "nonce": evidence.nonce.hex(),
                    "head_seq": evidence.head_seq,
                    "tpm": evidence.clock.to_json(),
                }
        if self.before is not None and self.after is not None:
            out["bounded_tpm_ms"] = self.after.clock.clock - self.before.clock.clock
        return out

    def facts(self) -> list[str]:
        out = [
            f"sealed at {self.seal.describe()}",
            f"unsealed at {self.unseal.describe()}",
            f"sealed for {self.tpm_ms} ms of TPM time",
        ]
        if self.before is not None:
            out.append(
                f"sealed {self.seal.clock.clock - self.before.clock.clock} ms (TPM) after your "
                f"before-evidence over nonce {self.before.nonce.hex()} (log head seq "
                f"{self.before.head_seq}): not before you asked for that quote"
            )
        if self.after is not None:
            out.append(
                f"unsealed {self.after.clock.clock - self.unseal.clock.clock} ms (TPM) before "
                f"your after-evidence over nonce {self.after.nonce.hex()} (log head seq "
                f"{self.after.head_seq}): not after you received that quote"
            )
        if self.before is not None and self.after is not None:
            out.append(
                "the whole session lies between your two nonces, in your own time "
                f"(at most {self.after.clock.clock - self.before.clock.clock} ms of TPM time)"
            )
        return out


def _same_boot(evidence: VerifiedEvidence, stamp: StatementTime, which: str) -> None:
    if evidence.clock.reset_count != stamp.clock.reset_count:
        raise TimeWindowError(
            f"your {which}-evidence is from TPM boot {evidence.clock.reset_count}, the result "
            f"from boot {stamp.clock.reset_count}: no common clock bounds it"
        )


def bound_window(
    seal: LoggedStatement,
    unseal: LoggedStatement,
    *,
    before: VerifiedEvidence | None = None,
    after: VerifiedEvidence | None = None,
) -> TimeWindow:
    """The result's window; with evidence, check it lies between the user's quotes."""
    sealed, unsealed = StatementTime.of(seal), StatementTime.of(unseal)
    if before is not None:
        _same_boot(before, sealed, "before")
        if not before.head_seq < sealed.seq:
            raise TimeWindowError(
                f"the seal statement (seq {sealed.seq}) is not after the log head of your "
                f"before-evidence (seq {before.head_seq}): the session was sealed before you "
                "asked for that quote"
            )
        if clock_key(before.clock) > clock_key(sealed.clock):
            raise TimeWindowError(
                f"the seal's TPM clock ({sealed.clock.clock} ms) is before your "
                f"before-evidence's ({before.clock.clock} ms)"
            )
    if after is not None:
        _same_boot(after, unsealed, "after")
        if not unsealed.seq <= after.head_seq:
            raise TimeWindowError(
                f"the unseal statement (seq {unsealed.seq}) is after the log head of your "
                f"after-evidence (seq {after.head_seq}): take the after-evidence once you "
                "have the result"
            )
        if clock_key(unsealed.clock) > clock_key(after.clock):
            raise TimeWindowError(
                f"the unseal's TPM clock ({unsealed.clock.clock} ms) is after your "
                f"after-evidence's ({after.clock.clock} ms)"
            )
    return TimeWindow(sealed, unsealed, before, after)
