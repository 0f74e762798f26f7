"""The small interface the daemon needs from a firewall backend.

A :class:`Firewall` seals one workload network namespace, named by a path to its netns
file (``/proc/<holder pid>/ns/net`` or ``/run/netns/<name>``). The rules live *in* that
netns's own filter tables (see docs/adr/0005-seal-in-netns.md), so sealing one workload
costs the same whatever the number of others. Methods raise
:class:`embassy.errors.SealError`, naming the netns and the table, on any failure; a
failure never reports success, and the caller must treat anything but
:attr:`SealState.SEALED` as "not sealed" (fail closed).

Today's backend is :class:`embassy.seal.iptables.IptablesFirewall` (legacy xtables through
python-iptables). An nftables backend could follow behind this same interface: one
``inet`` table (say ``embassy_seal``) in the workload netns with base chains on the input,
forward and output hooks at priority ``filter - 1`` (so they run before any other filter
chain of the netns), the same rules in nft syntax (``ct state established ct direction
original accept``, ``ip daddr 127.0.0.11 drop``, ``icmpv6 type { nd-neighbor-solicit,
nd-neighbor-advert } ip6 hoplimit 255 accept``), applied in ONE atomic netlink batch for
both families (``nft -f`` or libnftables' JSON API from the same setns worker), its
:class:`~embassy.seal.rules.SealRules` rendered from ``nft -j list table inet
embassy_seal`` so ``state`` and the statement's digest compare the kernel's actual rules
with the intended ones. Its digest domain must differ (``embassy-seal-nft-v1``): the same
intent in another rule language is another statement.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Protocol

from embassy.seal.rules import SealRules


class SealState(Enum):
    SEALED = "sealed"
    """Exactly the rules of :func:`embassy.seal.rules.seal_rules`, jumps first in place."""
    UNSEALED = "unsealed"
    """Nothing of ours in either family's filter table."""
    PARTIAL = "partial"
    """Some but not all of ours, or ours plus something else (tampered or half-applied)."""


class Firewall(Protocol):
    def prepare(self, netns: Path) -> None:
        """Make ``netns`` track connections (both families) from now on. Idempotent.

        Call it once when the holder's netns is created, before the workload runs: a flow
        opened before conntrack runs in the netns is unknown to it, and the seal then cuts it
        (fail closed, but a user's pending request dies). Changes no verdict.
        """
        ...

    def seal(self, netns: Path) -> SealRules:
        """Seal ``netns``; return the rules now in force (equal to ``seal_rules()``).

        Idempotent: sealing a sealed netns changes nothing and returns the same rules; a
        PARTIAL netns is repaired (no duplicate rules). Raises SealError unless the kernel's
        state afterwards is exactly SEALED.
        """
        ...

    def unseal(self, netns: Path) -> None:
        """Remove every rule and chain of ours from ``netns``. Idempotent."""
        ...

    def state(self, netns: Path) -> SealState:
        """What the kernel's tables in ``netns`` hold now (read, never cached)."""
        ...


def state_of(actual: SealRules | None, intended: SealRules) -> SealState:
    """SEALED if ``actual`` is exactly ``intended``, UNSEALED if nothing of ours, else PARTIAL.

    ``actual`` comes from the kernel (a backend's read, or :func:`parse_saved` of
    ``iptables-legacy-save`` output).
    """
    if actual is None or actual.empty:
        return SealState.UNSEALED
    if actual == intended:
        return SealState.SEALED
    return SealState.PARTIAL
