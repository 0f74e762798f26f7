"""What a seal statement claims about the seal, and what a key release checks again (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from embassy.net.identity import NetnsId

BACKEND = "veth-link+iptables-legacy-netns"


@dataclass(frozen=True, slots=True)
class SealProof:
    """What a seal statement claims and a key release checks again: the namespace the
    gate was closed on (None: the workload has no link at all) and the rules in force."""

    netns: NetnsId | None
    link: str | None
    rules_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "backend": BACKEND,
            "gate": "link" if self.link is not None else "no-link",
            "link": self.link,
            "rules_sha256": self.rules_sha256,
        }
