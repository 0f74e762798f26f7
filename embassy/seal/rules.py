"""The layer-3 part of the seal as data: the filter-table lines of a sealed workload netns.

Pure: no kernel, no iptc. The seal's enforcement is the link gate (:mod:`embassy.seal.gate`):
while it is closed no frame of any protocol crosses the workload's only link. These rules
are the second, independent layer, inside the workload's own network namespace, and what
an auditor reads back with ``ip netns exec ... iptables-legacy-save``:

Line format: every line is exactly as ``iptables-legacy-save -t filter`` (without ``-c``)
prints it, in the order it prints it: the declarations of our chains, the jumps from the
built-in chains (``INPUT``, ``FORWARD``, ``OUTPUT``), then the rules of our chains in save
(alphabetical) order. Built-in chain declarations are excluded (their counters change with
traffic and their policy is not ours). The same lines hold for IPv4 and IPv6::

    :EMBASSY-SEAL-FWD - [0:0]                    (the chains are installed ahead of time,
    :EMBASSY-SEAL-IN - [0:0]                      when the link is made and before it can
    :EMBASSY-SEAL-OUT - [0:0]                     carry anything; they stay for the life of
    -A INPUT -j EMBASSY-SEAL-IN                   the namespace)
    -A FORWARD -j EMBASSY-SEAL-FWD               (the three jumps are the flip: present
    -A OUTPUT -j EMBASSY-SEAL-OUT                 while sealed, absent while open)
    -A EMBASSY-SEAL-FWD -j DROP
    -A EMBASSY-SEAL-IN -i lo -j ACCEPT
    -A EMBASSY-SEAL-IN -j DROP
    -A EMBASSY-SEAL-OUT -o lo -j ACCEPT
    -A EMBASSY-SEAL-OUT -j DROP

Sealed means silence, so there is no exception for any flow: not for flows opened before
the seal in either direction (they are paused by the link gate and resume after it), not
for neighbour discovery, not for a DNS resolver. Loopback stays open: it never leaves the
namespace, and the embassy refuses any other process or container in that namespace.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

DIGEST_DOMAIN = "embassy-seal-rules-v2"

CHAIN_IN = "EMBASSY-SEAL-IN"
CHAIN_OUT = "EMBASSY-SEAL-OUT"
CHAIN_FWD = "EMBASSY-SEAL-FWD"
#: Our chains, in iptables-save (alphabetical) order.
SEAL_CHAINS: tuple[str, ...] = tuple(sorted((CHAIN_IN, CHAIN_OUT, CHAIN_FWD)))
#: Built-in chain -> our chain it jumps to, in iptables-save order.
JUMPS: tuple[tuple[str, str], ...] = (
    ("INPUT", CHAIN_IN),
    ("FORWARD", CHAIN_FWD),
    ("OUTPUT", CHAIN_OUT),
)
BUILTIN_CHAINS: tuple[str, ...] = tuple(builtin for builtin, _ in JUMPS)


class Family(Enum):
    V4 = "v4"
    V6 = "v6"


class L3State(Enum):
    SEALED = "sealed"
    """Our chains with exactly their rules, and the three jumps first in their chains."""
    OPEN = "open"
    """Our chains with exactly their rules installed, and no jump to them."""
    ABSENT = "absent"
    """Nothing of ours (a namespace the embassy has not prepared)."""
    PARTIAL = "partial"
    """Anything else: tampered or half-applied. Never counts as sealed."""


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule, in the fields python-iptables sets and iptables-save prints."""

    chain: str
    target: str
    in_interface: str | None = None
    out_interface: str | None = None

    @property
    def line(self) -> str:
        parts = [f"-A {self.chain}"]
        if self.in_interface is not None:
            parts.append(f"-i {self.in_interface}")
        if self.out_interface is not None:
            parts.append(f"-o {self.out_interface}")
        parts.append(f"-j {self.target}")
        return " ".join(parts)


#: The jumps from the built-in chains (the flip), in save order.
JUMP_RULES: tuple[RuleSpec, ...] = tuple(RuleSpec(builtin, ours) for builtin, ours in JUMPS)
#: The rules of our chains (installed ahead of time), in save order.
CHAIN_RULES: tuple[RuleSpec, ...] = (
    RuleSpec(CHAIN_FWD, "DROP"),
    RuleSpec(CHAIN_IN, "ACCEPT", in_interface="lo"),
    RuleSpec(CHAIN_IN, "DROP"),
    RuleSpec(CHAIN_OUT, "ACCEPT", out_interface="lo"),
    RuleSpec(CHAIN_OUT, "DROP"),
)


def chain_line(chain: str) -> str:
    return f":{chain} - [0:0]"


def chain_rules(chain: str) -> tuple[RuleSpec, ...]:
    return tuple(rule for rule in CHAIN_RULES if rule.chain == chain)


def _lines(*, sealed: bool) -> tuple[str, ...]:
    jumps = tuple(rule.line for rule in JUMP_RULES) if sealed else ()
    return tuple(chain_line(c) for c in SEAL_CHAINS) + jumps + tuple(r.line for r in CHAIN_RULES)


@dataclass(frozen=True, slots=True)
class SealRules:
    """Our lines of both families' filter tables. Compare with ``==``."""

    v4: tuple[str, ...]
    v6: tuple[str, ...]

    @property
    def digest(self) -> str:
        """Hex SHA-256 over the canonical, versioned rendering (:meth:`canonical`)."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def canonical(self) -> bytes:
        """``embassy-seal-rules-v2\\n*v4\\n<line>\\n...*v6\\n<line>\\n...`` in UTF-8."""
        out = [DIGEST_DOMAIN, "*v4", *self.v4, "*v6", *self.v6]
        return ("\n".join(out) + "\n").encode("utf-8")

    @property
    def empty(self) -> bool:
        return not self.v4 and not self.v6


def seal_rules() -> SealRules:
    """The exact lines of a sealed workload namespace (both families alike)."""
    lines = _lines(sealed=True)
    return SealRules(v4=lines, v6=lines)


def open_rules() -> SealRules:
    """The exact lines of a prepared namespace whose seal is open: chains, no jumps."""
    lines = _lines(sealed=False)
    return SealRules(v4=lines, v6=lines)


def state_of(actual: SealRules | None) -> L3State:
    """Classify what the kernel holds (a backend's read or :func:`parse_saved`)."""
    if actual is None or actual.empty:
        return L3State.ABSENT
    if actual == seal_rules():
        return L3State.SEALED
    if actual == open_rules():
        return L3State.OPEN
    return L3State.PARTIAL


def extract_table(lines: Iterable[str]) -> tuple[str, ...]:
    """Our lines from one ``*filter`` block of iptables-save output, in save order.

    Kept: declarations of our chains; every rule of our chains; in each built-in chain,
    every rule up to and including its last jump to one of our chains (a rule ahead of the
    jump sees packets before the seal does, so it is part of the seal's state); and any
    other rule that jumps to our chains. Anything unexpected thus shows as a difference.
    """
    chain_decls: list[str] = []
    builtin_rules: dict[str, list[str]] = {chain: [] for chain in BUILTIN_CHAINS}
    builtin_cut: dict[str, int] = {}
    other: list[str] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if line.startswith(":"):
            name = line[1:].split(" ", 1)[0]
            if name in SEAL_CHAINS:
                chain_decls.append(line)
            continue
        if not line.startswith("-A "):
            continue
        words = line.split()
        chain = words[1]
        target = words[words.index("-j") + 1] if "-j" in words else ""
        if chain in builtin_rules:
            builtin_rules[chain].append(line)
            if target in SEAL_CHAINS:
                builtin_cut[chain] = len(builtin_rules[chain])
        elif chain in SEAL_CHAINS or target in SEAL_CHAINS:
            other.append(line)
    kept: list[str] = list(chain_decls)
    for chain in BUILTIN_CHAINS:
        kept += builtin_rules[chain][: builtin_cut.get(chain, 0)]
    return tuple(kept + other)


def parse_saved(text: str) -> SealRules | None:
    """Our rules from ``iptables-legacy-save -t filter`` and/or ``ip6tables-legacy-save``
    output (concatenate both to get both families).

    The family of each ``*filter`` block comes from the ``# Generated by iptables-save`` /
    ``# Generated by ip6tables-save`` comment before it. Returns ``None`` when neither family
    holds anything of ours. Raises :class:`ValueError` when a ``*filter`` block has no such
    comment, or the text holds a family twice.
    """
    blocks: dict[Family, list[str]] = {}
    family: Family | None = None
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("# Generated by "):
            program = line.removeprefix("# Generated by ").split(" ", 1)[0]
            if program.startswith("ip6tables"):
                family = Family.V6
            elif program.startswith("iptables"):
                family = Family.V4
            else:
                raise ValueError(f"unknown save program {program!r}")
        elif line.startswith("*"):
            if line != "*filter":
                current = None
                continue
            if family is None:
                raise ValueError("a *filter block without a '# Generated by' comment")
            if family in blocks:
                raise ValueError(f"two *filter blocks for {family.value}")
            current = blocks[family] = []
        elif line == "COMMIT":
            current = None
            family = None
        elif current is not None:
            current.append(line)
    v4 = extract_table(blocks.get(Family.V4, []))
    v6 = extract_table(blocks.get(Family.V6, []))
    if not v4 and not v6:
        return None
    return SealRules(v4=v4, v6=v6)
