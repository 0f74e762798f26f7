"""The python-iptables (legacy xtables) backend of :class:`embassy.seal.firewall.Firewall`.

Every operation runs on the netns worker (:mod:`embassy.seal.netns`) inside the workload's
netns and touches only that netns's ``filter`` tables: one commit for IPv4, then one for
IPv6. The rules come from :func:`embassy.seal.rules.table_spec`, the same data that
:func:`embassy.seal.rules.seal_rules` renders, and the kernel's state is read back through
iptc and rendered into the same lines, so "sealed" is checked, never assumed.

python-iptables discipline (field-tested): one process-wide ``Table`` object per table,
``autocommit = False``, ``refresh()`` before changing it, ``commit()`` once, ``refresh()``
after (a failed change is discarded by the refresh, never half-committed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import iptc

from embassy.errors import SealError
from embassy.seal.firewall import SealState, state_of
from embassy.seal.netns import NetnsWorker, default_worker
from embassy.seal.rules import (
    BUILTIN_CHAINS,
    DOCKER_DNS_IP,
    SEAL_CHAINS,
    TRACK_CHAIN,
    Family,
    RuleSpec,
    SealRules,
    TableSpec,
    chain_line,
    seal_rules,
    table_spec,
    track_rule,
)

T = TypeVar("T")

_TABLE_NAMES = {Family.V4: "IPv4 filter", Family.V6: "IPv6 filter"}
# python-iptables' Rule6 knows ICMPv6 by number only.
_IPTC_PROTOCOL = {"ipv6-icmp": "58"}


def _table(family: Family) -> Any:
    table = iptc.Table(iptc.Table.FILTER) if family is Family.V4 else iptc.Table6("filter")
    table.autocommit = False
    return table


def _build(family: Family, spec: RuleSpec) -> Any:
    rule = iptc.Rule() if family is Family.V4 else iptc.Rule6()
    if spec.src is not None:
        rule.src = spec.src
    if spec.dst is not None:
        rule.dst = spec.dst
    if spec.in_interface is not None:
        rule.in_interface = spec.in_interface
    if spec.out_interface is not None:
        rule.out_interface = spec.out_interface
    if spec.protocol is not None:
        rule.protocol = _IPTC_PROTOCOL.get(spec.protocol, spec.protocol)
    for match_spec in spec.matches:
        match = rule.create_match(match_spec.name)
        for key, value in match_spec.options:
            setattr(match, key.replace("-", "_"), value)
    rule.target = rule.create_target(spec.target)
    return rule


def _target(rule: Any) -> str:
    target = rule.target
    return str(target.name) if target is not None else ""


def _render(rule: Any, chain: str, known: list[tuple[RuleSpec, Any]]) -> str:
    """The seal line of ``rule`` if it equals one of the ``known`` rules, else a marker.

    A rule that is not ours cannot equal any seal line, which is all that matters for
    :class:`SealState`; the marker names its chain and target for error messages.
    """
    for spec, built in known:
        if spec.chain == chain and rule == built:
            return spec.line
    return f"? -A {chain} (a rule not of the seal) -j {_target(rule)}"


def _read(family: Family, spec: TableSpec) -> tuple[str, ...]:
    """Our lines in the current netns's filter table, in iptables-save order.

    Mirrors :func:`embassy.seal.rules.extract_table`: declarations of our chains, each
    built-in chain's rules up to and including its last jump to us, every rule of our
    chains, and any other rule that jumps to our chains.
    """
    table = _table(family)
    table.refresh()
    names = [str(chain.name) for chain in table.chains]
    # python-iptables can only build a jump to a chain that exists; a jump to a chain that
    # does not exist cannot be in the kernel either.
    buildable = [r for r in spec.jumps if r.target in names] + list(spec.rules)
    known = [(rule_spec, _build(family, rule_spec)) for rule_spec in buildable]
    lines = [chain_line(name) for name in SEAL_CHAINS if name in names]
    for builtin in BUILTIN_CHAINS:
        rules = iptc.Chain(table, builtin).rules
        cut = max((i + 1 for i, r in enumerate(rules) if _target(r) in SEAL_CHAINS), default=0)
        lines += [_render(rule, builtin, known) for rule in rules[:cut]]
    for name in sorted(names):
        if name in BUILTIN_CHAINS:
            continue
        for rule in iptc.Chain(table, name).rules:
            if name in SEAL_CHAINS or _target(rule) in SEAL_CHAINS:
                lines.append(_render(rule, name, known))
    return tuple(lines)


def _remove_ours(table: Any) -> None:
    """Delete every jump to our chains, then flush and delete our chains (uncommitted)."""
    for chain in table.chains:
        if str(chain.name) in SEAL_CHAINS:
            continue
        for rule in chain.rules:
            if _target(rule) in SEAL_CHAINS:
                chain.delete_rule(rule)
    for name in SEAL_CHAINS:
        if table.is_chain(name):
            table.flush_entries(name)
            table.delete_chain(name)


def _put_ours(family: Family, table: Any, spec: TableSpec) -> None:
    for name in spec.chains:
        chain = table.create_chain(name)
        for rule_spec in spec.chain_rules(name):
            chain.append_rule(_build(family, rule_spec))
    # Reverse so that, inserted each at position 0, they end up in spec order (all are
    # alone in their chain anyway: one jump per built-in chain).
    for jump in reversed(spec.jumps):
        iptc.Chain(table, jump.chain).insert_rule(_build(family, jump), 0)


def _is_tracking(family: Family, table: Any) -> bool:
    if not table.is_chain(TRACK_CHAIN):
        return False
    rules = iptc.Chain(table, TRACK_CHAIN).rules
    return len(rules) == 1 and bool(rules[0] == _build(family, track_rule()))


def _put_track(family: Family, table: Any) -> None:
    """(Re)create :data:`TRACK_CHAIN` with its one rule (uncommitted)."""
    if table.is_chain(TRACK_CHAIN):
        table.flush_entries(TRACK_CHAIN)
        chain = iptc.Chain(table, TRACK_CHAIN)
    else:
        chain = table.create_chain(TRACK_CHAIN)
    chain.append_rule(_build(family, track_rule()))


@contextmanager
def _changing(family: Family) -> Iterator[Any]:
    """A refreshed table to change; committed once on success, discarded on failure."""
    table = _table(family)
    table.refresh()
    try:
        yield table
        table.commit()
    finally:
        table.refresh()


class IptablesFirewall:
    """Seals a netns with legacy xtables rules in that netns's own filter tables."""

    def __init__(self, dns_ip: str = DOCKER_DNS_IP, worker: NetnsWorker | None = None) -> None:
        self._rules = seal_rules(dns_ip)
        self._specs = {family: table_spec(family, dns_ip) for family in Family}
        self._worker = worker

    @property
    def rules(self) -> SealRules:
        """What :meth:`seal` puts in place."""
        return self._rules

    def prepare(self, netns: Path) -> None:
        def apply() -> None:
            for family in Family:
                self._guard(netns, family, "prepare", partial(self._prepare, family))

        self._run(netns, apply)

    def seal(self, netns: Path) -> SealRules:
        def apply() -> SealRules:
            for family, spec in self._specs.items():
                self._guard(netns, family, "seal", partial(self._seal, family, spec))
            actual = self._read_all(netns)
            if actual != self._rules:
                raise SealError(
                    f"netns {netns}: after seal the filter tables hold {_diff(actual)} "
                    f"instead of the seal {self._rules.digest}"
                )
            return actual

        return self._run(netns, apply)

    def unseal(self, netns: Path) -> None:
        def apply() -> None:
            for family in Family:
                self._guard(netns, family, "unseal", partial(self._unseal, family))
            actual = self._read_all(netns)
            if not actual.empty:
                raise SealError(f"netns {netns}: after unseal our rules remain: {_diff(actual)}")

        self._run(netns, apply)

    def state(self, netns: Path) -> SealState:
        actual = self._run(netns, lambda: self._read_all(netns))
        return state_of(actual, self._rules)

    def read(self, netns: Path) -> SealRules:
        """The kernel's current lines of ours in ``netns`` (for statements and diagnostics)."""
        return self._run(netns, lambda: self._read_all(netns))

    # Below: runs on the worker thread, inside the netns.

    def _prepare(self, family: Family) -> None:
        table = _table(family)
        table.refresh()
        if _is_tracking(family, table):
            return
        with _changing(family) as table:
            _put_track(family, table)

    def _seal(self, family: Family, spec: TableSpec) -> None:
        expected = self._rules.v4 if family is Family.V4 else self._rules.v6
        if _read(family, spec) == expected and _is_tracking(family, _table(family)):
            return  # already sealed: no commit, no duplicate
        with _changing(family) as table:
            _remove_ours(table)
            if not _is_tracking(family, table):
                _put_track(family, table)
            _put_ours(family, table, spec)

    def _unseal(self, family: Family) -> None:
        table = _table(family)
        table.refresh()
        if not any(
            str(chain.name) in SEAL_CHAINS
            or any(_target(rule) in SEAL_CHAINS for rule in chain.rules)
            for chain in table.chains
        ):
            return  # nothing of ours: no commit
        with _changing(family) as table:
            _remove_ours(table)

    def _read_all(self, netns: Path) -> SealRules:
        v4 = self._guard(netns, Family.V4, "read", lambda: _read(Family.V4, self._specs[Family.V4]))
        v6 = self._guard(netns, Family.V6, "read", lambda: _read(Family.V6, self._specs[Family.V6]))
        return SealRules(v4=v4, v6=v6)

    @staticmethod
    def _guard(netns: Path, family: Family, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SealError:
            raise
        except (iptc.IPTCError, iptc.XTablesError, OSError, ValueError) as exc:
            table = _TABLE_NAMES[family]
            raise SealError(f"netns {netns}: {what} of the {table} table: {exc}") from exc

    def _run(self, netns: Path, fn: Callable[[], T]) -> T:
        worker = self._worker if self._worker is not None else default_worker()
        return worker.run(netns, fn)


def _diff(actual: SealRules) -> str:
    return f"v4={list(actual.v4)!r} v6={list(actual.v6)!r}"
