"""The seal's layer-3 rules through python-iptables (legacy xtables), in a workload netns.

python-iptables runs on the netns worker (:mod:`embassy.seal.netns`) inside the workload's
namespace and touches only that namespace's ``filter`` tables. :meth:`IptablesL3.install`
puts our chains and their rules in, when the link is made and before it can carry anything,
and makes the namespace's two raw sockets (one per family).

A flip does not go through python-iptables: the two states of the table (sealed: the jumps
first in the built-in chains; open: our chains, no jumps) are built once per process by
python-iptables in a namespace of its own and read back as whole-table images
(:mod:`embassy.seal.xt_replace`); a flip puts the wanted image in place of whatever the
workload's table holds, one atomic replace per family through that namespace's sockets,
from the calling thread: about 10 µs, no ``setns``, no rule encoding, and a table changed
behind the embassy's back comes back exactly as it must be. If a replace fails, the flip
falls back to python-iptables on the worker (a full install of the wanted state).

python-iptables discipline (field-tested): one process-wide ``Table`` object per table,
``autocommit = False``, ``refresh()`` before changing it, ``commit()`` once, ``refresh()``
after (a failed change is discarded by the refresh, never half-committed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import iptc

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.seal.netns import NetnsWorker, new_netns
from embassy.seal.rules import (
    BUILTIN_CHAINS,
    JUMP_RULES,
    SEAL_CHAINS,
    Family,
    RuleSpec,
    SealRules,
    chain_line,
    chain_rules,
    open_rules,
    seal_rules,
)
from embassy.seal.xt_replace import TableImage, open_socket, read_image, swap

T = TypeVar("T")

_LOG = logging.getLogger(__name__)

_TABLE_NAMES = {Family.V4: "IPv4 filter", Family.V6: "IPv6 filter"}


def _netns_id(netns: Path) -> NetnsId:
    try:
        st = os.stat(netns)
    except OSError as exc:
        raise SealError(f"netns {netns}: cannot stat: {exc.strerror}") from exc
    return NetnsId(st.st_dev, st.st_ino)


def _table(family: Family) -> Any:
    table = iptc.Table(iptc.Table.FILTER) if family is Family.V4 else iptc.Table6("filter")
    table.autocommit = False
    return table


def _build(family: Family, spec: RuleSpec) -> Any:
    rule = iptc.Rule() if family is Family.V4 else iptc.Rule6()
    if spec.in_interface is not None:
        rule.in_interface = spec.in_interface
    if spec.out_interface is not None:
        rule.out_interface = spec.out_interface
    rule.target = rule.create_target(spec.target)
    return rule


def _target(rule: Any) -> str:
    target = rule.target
    return str(target.name) if target is not None else ""


def _render(family: Family, rule: Any, chain: str) -> str:
    """The seal line of ``rule`` if it is one of ours, else a marker naming chain and target.

    A rule that is not ours cannot equal any seal line, which is all the state needs.
    """
    for spec in (*JUMP_RULES, *chain_rules(chain)):
        if spec.chain == chain and rule == _build(family, spec):
            return spec.line
    return f"? -A {chain} (a rule not of the seal) -j {_target(rule)}"


def _read(family: Family) -> tuple[str, ...]:
    """Our lines in the current netns's filter table of ``family``, in iptables-save order."""
    table = _table(family)
    table.refresh()
    names = [str(chain.name) for chain in table.chains]
    lines = [chain_line(name) for name in SEAL_CHAINS if name in names]
    for builtin in BUILTIN_CHAINS:
        rules = iptc.Chain(table, builtin).rules
        cut = max((i + 1 for i, r in enumerate(rules) if _target(r) in SEAL_CHAINS), default=0)
        lines += [_render(family, rule, builtin) for rule in rules[:cut]]
    for name in sorted(names):
        if name in BUILTIN_CHAINS:
            continue
        for rule in iptc.Chain(table, name).rules:
            if name in SEAL_CHAINS or _target(rule) in SEAL_CHAINS:
                lines.append(_render(family, rule, name))
    return tuple(lines)


def delete_jumps(table: Any, chains: Collection[str]) -> None:
    """Delete every rule of ``table`` (outside ``chains``) whose target is one of ``chains``
    (uncommitted)."""
    for chain in table.chains:
        if str(chain.name) in chains:
            continue
        for rule in chain.rules:
            if _target(rule) in chains:
                chain.delete_rule(rule)


def _put_chains(family: Family, table: Any) -> None:
    """Replace our chains with exactly their rules (uncommitted; jumps must be gone)."""
    for name in SEAL_CHAINS:
        if table.is_chain(name):
            table.flush_entries(name)
            chain = iptc.Chain(table, name)
        else:
            chain = table.create_chain(name)
        for spec in chain_rules(name):
            chain.append_rule(_build(family, spec))


def _put_jumps(family: Family, table: Any) -> None:
    # Reversed, each inserted at position 0: they end up in spec order, each first in its
    # built-in chain so that nothing of that chain runs before the seal.
    for jump in reversed(JUMP_RULES):
        iptc.Chain(table, jump.chain).insert_rule(_build(family, jump), 0)


@contextmanager
def committing(table: Any) -> Iterator[Any]:
    """``table`` (autocommit off) refreshed to change; committed once on success, and
    refreshed after either way (a failed change is discarded, never half-committed)."""
    table.refresh()
    try:
        yield table
        table.commit()
    finally:
        table.refresh()


def _changing(family: Family) -> AbstractContextManager[Any]:
    return committing(_table(family))


class IptablesL3:
    """The layer-3 seal rules of workload namespaces, through one netns worker."""

    def __init__(self, worker: NetnsWorker) -> None:
        self._worker = worker
        self._lock = threading.Lock()
        self._images: dict[tuple[Family, bool], TableImage] | None = None
        self._sockets: dict[NetnsId, dict[Family, socket.socket]] = {}

    def install(self, netns: Path, *, sealed: bool) -> None:
        """Put our chains in ``netns`` (repairing any of ours), jumps as ``sealed`` says;
        make the namespace's sockets for later flips if it has none yet."""
        self._prepare()
        key = _netns_id(netns)

        def apply() -> dict[Family, socket.socket] | None:
            for family in Family:
                self._guard(netns, family, "install", partial(self._install, family, sealed))
            if key in self._sockets:
                return None
            try:
                return {family: open_socket(family) for family in Family}
            except OSError as exc:
                raise SealError(f"netns {netns}: cannot open a raw socket: {exc}") from exc

        made = self._worker.run(netns, apply)
        if made is not None:
            with self._lock:
                for old in self._sockets.pop(key, {}).values():
                    old.close()
                self._sockets[key] = made

    def forget(self, netns: NetnsId) -> None:
        """Close the sockets of a namespace whose link is gone (they would keep it alive)."""
        with self._lock:
            sockets = self._sockets.pop(netns, {})
        for sock in sockets.values():
            sock.close()

    def close(self) -> None:
        with self._lock:
            every = list(self._sockets.values())
            self._sockets.clear()
        for sockets in every:
            for sock in sockets.values():
                sock.close()

    def _prepare(self) -> None:
        """Build both states of both tables once, in a namespace of their own, and keep
        their images (checked line by line against the seal's rules first)."""
        with self._lock:
            if self._images is not None:
                return
            try:
                fd = new_netns()
            except OSError as exc:
                raise SealError(
                    f"cannot make a namespace to prepare the seal's tables in: {exc}"
                ) from exc
            try:
                path = Path(f"/proc/self/fd/{fd}")
                self._images = self._worker.run(path, partial(self._capture, path))
            finally:
                os.close(fd)

    def _capture(self, netns: Path) -> dict[tuple[Family, bool], TableImage]:
        """On the worker, in a new namespace: each state installed, read back, imaged."""
        images: dict[tuple[Family, bool], TableImage] = {}
        for family in Family:
            with contextlib.closing(open_socket(family)) as sock:
                for sealed, rules in ((True, seal_rules()), (False, open_rules())):
                    self._guard(netns, family, "prepare", partial(self._install, family, sealed))
                    lines = _read(family)
                    if lines != (rules.v4 if family is Family.V4 else rules.v6):
                        raise SealError(f"the prepared {family.value} table reads back as {lines}")
                    images[(family, sealed)] = read_image(sock, family)
        return images

    def flip(self, netns: Path, *, sealed: bool) -> None:
        self.submit_flip(netns, sealed=sealed).result()

    def submit_flip(
        self,
        netns: Path,
        *,
        sealed: bool,
        before: Callable[[], None] | None = None,
        then: Callable[[], None] | None = None,
    ) -> Future[None]:
        """Put the sealed or the open table in place (``before`` and ``then`` run first
        and last): the hot path. With the namespace's sockets, done at once on the calling
        thread (the future is complete); otherwise, or if a replace fails, queued on the
        worker through python-iptables.
        """
        with self._lock:
            sockets = self._sockets.get(_netns_id(netns)) if self._images is not None else None
            images = self._images
        if sockets is None or images is None:
            return self._worker.submit(netns, partial(self._slow_flip, netns, sealed, before, then))
        done: Future[None] = Future()
        try:
            if before is not None:
                before()
            try:
                for family in Family:
                    swap(sockets[family], images[(family, sealed)])
            except OSError as exc:
                _LOG.warning("netns %s: table replace failed (%s); installing instead", netns, exc)
                self._worker.run(netns, partial(self._slow_flip, netns, sealed, None, None))
            if then is not None:
                then()
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)
        return done

    def _slow_flip(
        self,
        netns: Path,
        sealed: bool,
        before: Callable[[], None] | None,
        then: Callable[[], None] | None,
    ) -> None:
        """On the worker, inside the netns: the wanted state installed whole, as exact as
        the replace would have left it."""
        if before is not None:
            before()
        for family in Family:
            self._guard(netns, family, "flip", partial(self._install, family, sealed))
        if then is not None:
            then()

    def read(self, netns: Path) -> SealRules:
        """The kernel's current lines of ours in ``netns`` (both families)."""

        def apply() -> SealRules:
            v4 = self._guard(netns, Family.V4, "read", lambda: _read(Family.V4))
            v6 = self._guard(netns, Family.V6, "read", lambda: _read(Family.V6))
            return SealRules(v4=v4, v6=v6)

        return self._worker.run(netns, apply)

    # Below: on the worker thread, inside the netns.

    @staticmethod
    def _install(family: Family, sealed: bool) -> None:
        with _changing(family) as table:
            delete_jumps(table, SEAL_CHAINS)
            _put_chains(family, table)
            if sealed:
                _put_jumps(family, table)

    @staticmethod
    def _guard(netns: Path, family: Family, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except SealError:
            raise
        except (iptc.IPTCError, iptc.XTablesError, OSError, ValueError) as exc:
            table = _TABLE_NAMES[family]
            raise SealError(f"netns {netns}: {what} of the {table} table: {exc}") from exc
