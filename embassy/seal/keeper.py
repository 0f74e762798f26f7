"""The seal of one workload: which namespace, which link, closed or open, and why.

The keeper holds the workload's link (:mod:`embassy.net.link`) and applies the gate
(:mod:`embassy.seal.gate`). The gate is closed while the sessions want it closed **or**
while the workload's namespace is quarantined (something other than the workload is in
it). Facts come in from two sides: Docker tells it when the workload (re)starts, and the
monitor thread asks it to :meth:`verify` the kernel and /proc, which repairs what it can
and reports the rest.

A new namespace (a restarted workload) gets its link from :meth:`workload_started` born
with the gate as it must be: closed when sealed, so a restart never has a moment of
network while a session is open.

Lock order: the session manager's lock, then this keeper's. The keeper never calls back
into the sessions while holding its lock; :meth:`verify` returns its findings instead.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.net.link import LinkMaker, WorkloadLink
from embassy.seal.gate import Gate
from embassy.seal.occupants import Occupant, find_occupants, still_there
from embassy.seal.proof import SealProof
from embassy.seal.rules import L3State, seal_rules

_LOG = logging.getLogger(__name__)


@dataclass
class Findings:
    """What one :meth:`SealKeeper.verify` found: repairs made and intrusions."""

    repaired: list[str] = field(default_factory=list)
    intrusions: list[str] = field(default_factory=list)


class SealKeeper:
    def __init__(self, maker: LinkMaker | None, gate: Gate, container_id: str) -> None:
        """``maker`` is None for a workload with no network at all (``network_mode: none``):
        there is no link to gate, and the seal is the absence of one."""
        self._maker = maker
        self._gate = gate
        self._container_id = container_id
        self._lock = threading.RLock()
        self._link: WorkloadLink | None = None
        self._pid = 0
        self._sealed = True  # what the sessions want; fail closed until told otherwise
        self._quarantine: dict[str, str] = {}
        self._suspects: list[Occupant] = []

    # -- facts from Docker -------------------------------------------------------------

    def workload_started(self, pid: int) -> None:
        """The workload's main process is ``pid``: make sure its namespace has our link."""
        with self._lock:
            self._pid = pid
            if self._maker is None:
                return
            try:
                netns = NetnsId.of_pid(pid)
            except OSError as exc:
                raise SealError(f"workload pid {pid} is gone: {exc.strerror}") from exc
            if self._link is not None and self._link.netns == netns:
                return
            self._drop_link()
            self._link = self._maker.attach(pid, sealed=self.closed)
            if self.closed:
                # A link adopted after a daemon restart keeps the state the last run left;
                # a new one is already down (then this is a no-op).
                self._gate.close(self._link)
            else:
                self._gate.open(self._link)

    def workload_stopped(self) -> None:
        """The workload's processes are gone: its namespace and link go with them."""
        with self._lock:
            self._pid = 0
            self._drop_link()

    def _drop_link(self) -> None:
        link, self._link = self._link, None
        if link is not None and self._maker is not None:
            self._maker.detach(link)

    # -- the sessions' side ----------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._sealed or bool(self._quarantine)

    @property
    def quarantined(self) -> bool:
        return bool(self._quarantine)

    def close(self) -> SealProof:
        """Close the gate (idempotent): link down, then the sealed layer-3 table (a fallback
        flip may still be on the netns worker: :meth:`settle` and :meth:`check` wait for
        it); return what will be in force."""
        with self._lock:
            self._sealed = True
            if self._link is not None:
                self._gate.begin_close(self._link)
            return self._proof()

    def open(self) -> str:
        """Start opening the gate unless the namespace is quarantined; say which. The gate
        is open once :meth:`settle` returns."""
        with self._lock:
            self._sealed = False
            if self._quarantine:
                return "quarantined"
            if self._link is not None:
                self._gate.begin_open(self._link)
            return "unsealed"

    def settle(self) -> None:
        """Wait until the gate's last change is complete (SealError if it failed)."""
        self._gate.settle()

    def check(self, proof: SealProof, *, settled: bool = True) -> None:
        """Raise :class:`SealError` unless the seal ``proof`` describes is in force now: the
        gate closed on that very namespace (its last change complete: the link down in the
        kernel, the layer-3 jumps in), the workload still in that namespace, and nobody else
        in it. With ``settled`` False the gate may still be closing: everything but the
        kernel's state is checked (a cheap look before a statement is written)."""
        if settled:
            self._gate.settle()
        with self._lock:
            if not self.closed:
                raise SealError("the gate is open")
            if self._quarantine:
                raise SealError(f"the namespace is quarantined: {self._reasons()}")
            netns = None if self._link is None else self._link.netns
            if netns != proof.netns:
                raise SealError(
                    f"the workload's link is now on {netns}, not on the sealed {proof.netns}"
                )
            if self._link is None:
                if self._maker is not None and self._pid:
                    raise SealError("the workload runs with no link made by the embassy")
                return
            if settled and self._gate.link_up(self._link):
                raise SealError(f"the link {self._link.plan.host_name} is up")
            try:
                current = NetnsId.of_pid(self._pid)
            except OSError:
                raise SealError("the sealed workload process is gone") from None
            if current != self._link.netns:
                raise SealError(f"the workload is in {current}, not in the sealed {proof.netns}")

    def _proof(self) -> SealProof:
        link = self._link
        return SealProof(
            netns=None if link is None else link.netns,
            link=None if link is None else link.plan.host_name,
            rules_sha256=seal_rules().digest,
        )

    # -- the monitor's side ----------------------------------------------------------------

    def quarantine(self, key: str, reason: str) -> None:
        with self._lock:
            self._quarantine[key] = reason
            if self._link is not None:
                self._gate.close(self._link)

    def lift(self, key: str) -> None:
        with self._lock:
            if self._quarantine.pop(key, None) is None or self._quarantine:
                return
            if not self._sealed and self._link is not None:
                self._gate.open(self._link)

    def _reasons(self) -> str:
        return "; ".join(self._quarantine[k] for k in sorted(self._quarantine))

    def verify(self, *, deep: bool = False) -> Findings:
        """Compare the kernel and /proc with what must hold; repair, and report.

        ``deep`` also reads back the layer-3 rules and looks at every thread (a few ms).
        """
        findings = Findings()
        with self._lock:
            link = self._link
            if link is None:
                return findings
            # A flip still on its way (a session opening or closing right now) is not a
            # discrepancy: compare the kernel with what holds once it is done.
            self._gate.settle()
            up = self._gate.link_up(link)
            if self.closed and up:
                self._gate.close(link)
                findings.intrusions.append(f"the link {link.plan.host_name} was up while sealed")
            elif not self.closed and not up:
                self._gate.open(link)
                findings.repaired.append(f"the link {link.plan.host_name} was down while open")
            if deep:
                wanted = L3State.SEALED if self.closed else L3State.OPEN
                state = self._gate.l3_state(link)
                if state is not wanted:
                    # A flip puts the whole table back as it must be, whatever it held.
                    if self.closed:
                        self._gate.close(link)
                    else:
                        self._gate.open(link)
                    if self.closed:
                        findings.intrusions.append(f"layer-3 rules were {state.value} while sealed")
                    else:
                        findings.repaired.append(f"layer-3 rules were {state.value} while open")
            # An intruder is a task outside the workload found twice, a round apart.
            occupants = [
                o for o in self._suspects if still_there(o, link.netns, self._container_id)
            ]
            found = find_occupants(
                link.netns, self._container_id, threads=deep, own_pid=os.getpid()
            )
            # A confirmed occupant stays a suspect until it is gone: a thread found by a deep
            # round is not in the next (shallow) round's scan, and must not lift the quarantine.
            self._suspects = list(dict.fromkeys([*found, *occupants]))
            if occupants:
                pids = ", ".join(str(o.pid) for o in occupants[:8])
                reason = (
                    f"{len(occupants)} task(s) outside the workload in its namespace (pid {pids})"
                )
                if "occupant" not in self._quarantine:
                    findings.intrusions.append(reason)
                self.quarantine("occupant", reason)
            else:
                self.lift("occupant")
        return findings

    def status(self) -> dict[str, Any]:
        """What a key release would check, read from the kernel now (not remembered)."""
        with self._lock:
            link = self._link
            try:
                self.check(self._proof())
                release = "ready"
            except SealError as exc:
                release = f"refused: {exc.message}"
            up = None if link is None else self._gate.link_up(link)
            l3 = None if link is None else self._gate.l3_state(link)
            return {
                "gate": "closed" if self.closed else "open",
                # What the kernel holds now, in one word: both layers closed (or no link at
                # all), both open, or anything in between.
                "kernel": _kernel_word(up, l3),
                "sessions_want": "sealed" if self._sealed else "open",
                "quarantine": sorted(self._quarantine.values()),
                "link": None if link is None else link.plan.to_json(),
                "netns": None if link is None else str(link.netns),
                "link_up": up,
                "l3": None if l3 is None else l3.value,
                "key_release": release,
            }

    def close_all(self) -> None:
        """Let go of the namespace fd (daemon stop): the link and its state stay in the
        kernel as they are (fail closed), to be adopted by the next start."""
        with self._lock:
            link, self._link = self._link, None
            if link is not None:
                os.close(link.netns_fd)


def _kernel_word(up: bool | None, l3: L3State | None) -> str:
    if up is None:
        return "sealed"  # no link: nothing can pass
    if not up and l3 is L3State.SEALED:
        return "sealed"
    if up and l3 is L3State.OPEN:
        return "unsealed"
    return "partial"
