"""The gate: the one place where a workload's link is closed and opened.

Two independent layers, flipped in a fixed order:

* **the link** (layer 2, every frame of every protocol, both directions): the host end of
  the workload's only veth pair, set down or up with one ``RTM_NEWLINK`` (about 20 µs). A
  host end that is down drops what the workload sends (the veth drops frames for a peer
  that is down, and the peer's carrier goes off) and carries nothing to it. Raw frames
  (AF_PACKET), ARP, IPv6 neighbour discovery, multicast: nothing crosses. Established flows
  are paused, not reset: TCP retransmits once the link is back.
* **the layer-3 rules** (:mod:`embassy.seal.rules`) inside the workload's namespace: the
  sealed table (the three jumps first) or the open one, each put in whole.

Closing takes the link down first (silence at once), then puts the sealed table in;
opening puts the open table in, then brings the link up last. So at every instant between
the two steps both layers agree on "closed" or the link, the stronger one, is down.

:meth:`Gate.begin_close` and :meth:`Gate.begin_open` hand both steps, in that order, to
:meth:`IptablesL3.submit_flip`: done at once on the calling thread through the namespace's
own sockets, or, in the fallback to python-iptables, queued on the netns worker. Either
way the caller gets a future: the key is released only after :meth:`Gate.settle` and a
check of the kernel's state. Every call settles what is pending first, so the steps of two
flips can never interleave. A failed opening leaves the gate closed or half-open; the next
close or the monitor's round finds it.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from embassy.errors import SealError
from embassy.net.link import WorkloadLink
from embassy.net.rtnl import Rtnl
from embassy.seal.iptables import IptablesL3
from embassy.seal.rules import L3State, SealRules, state_of

_LOG = logging.getLogger(__name__)


class Gate:
    def __init__(self, rtnl: Rtnl, l3: IptablesL3) -> None:
        self._rtnl = rtnl
        self._l3 = l3
        self._lock = threading.Lock()
        self._pending: Future[None] | None = None
        self._pending_open = False

    def close(self, link: WorkloadLink) -> None:
        self.begin_close(link)
        self.settle()

    def open(self, link: WorkloadLink) -> None:
        self.begin_open(link)
        self.settle()

    def begin_close(self, link: WorkloadLink) -> None:
        """Start the link down, then the sealed table in (:meth:`settle` waits for both)."""
        with self._lock:
            try:
                self._settle_locked()
            except SealError as exc:
                if not self._pending_open:
                    raise
                # An opening that failed left the gate closed or half-open: this close
                # puts both layers closed whatever it left, so it is reported, not raised.
                _LOG.error("gate: an earlier opening failed (%s); closing now", exc.message)
            self._pending_open = False
            self._pending = self._l3.submit_flip(
                link.netns_path, sealed=True, before=lambda: self._set_link(link, up=False)
            )

    def begin_open(self, link: WorkloadLink) -> None:
        """Start the open table in, then the link up (:meth:`settle` waits for both)."""
        with self._lock:
            self._settle_locked()
            self._pending_open = True
            self._pending = self._l3.submit_flip(
                link.netns_path, sealed=False, then=lambda: self._set_link(link, up=True)
            )

    def settle(self) -> None:
        """Wait for the pending flip; raise :class:`SealError` if it failed."""
        with self._lock:
            self._settle_locked()

    def _settle_locked(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        try:
            pending.result(timeout=30)
        except SealError:
            raise
        except Exception as exc:  # a timeout, or what the worker raised
            raise SealError(f"the gate's flip failed: {exc!r}") from exc

    def link_up(self, link: WorkloadLink) -> bool:
        """The host end's state, read from the kernel (about 20 µs)."""
        try:
            return self._rtnl.link(link.host_index).up
        except OSError as exc:
            raise SealError(
                f"link {link.plan.host_name}: cannot read its state: {exc.strerror}"
            ) from exc

    def l3_rules(self, link: WorkloadLink) -> SealRules:
        """The layer-3 rules in the workload's namespace, read back (a few ms: not per call
        on the hot path; the monitor reads them)."""
        self.settle()
        return self._l3.read(link.netns_path)

    def l3_state(self, link: WorkloadLink) -> L3State:
        return state_of(self.l3_rules(link))

    def _set_link(self, link: WorkloadLink, *, up: bool) -> None:
        try:
            self._rtnl.set_up(link.host_index, up)
        except OSError as exc:
            verb = "open" if up else "close"
            raise SealError(
                f"cannot {verb} the link {link.plan.host_name}: {exc.strerror}"
            ) from exc
