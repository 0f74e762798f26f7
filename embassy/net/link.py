"""Make, adopt and remove the one link of a workload's network namespace.

Order when a namespace gets its link (the workload started with no network, so until now
it had loopback only):

1. open the namespace (``/proc/<pid>/ns/net``) and keep the fd: the embassy acts on that
   namespace and no other for as long as it holds the link, whatever pid it came from;
2. install the layer-3 seal chains in it (jumps in when sealed), before any link exists;
3. create the veth pair in one netlink request: the host end here, **down**, already a port
   of the embassy's bridge; the peer born as ``eth0`` inside the namespace;
4. inside the namespace: no forwarding, no router advertisements or redirects, IPv6 only
   when planned, the reserved addresses, ``eth0`` up, the default routes.

The host end stays down: whether it comes up is the gate's decision
(:mod:`embassy.seal.gate`), never this module's. A daemon restart finds the link it made
still in place and adopts it (so flows survive a daemon crash) when the host end's peer is
the namespace's ``eth0``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from embassy.errors import SealError
from embassy.net.identity import NetnsId
from embassy.net.plan import PEER_NAME, LinkPlan
from embassy.net.rtnl import Rtnl
from embassy.seal.iptables import IptablesL3
from embassy.seal.netns import NetnsWorker

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkloadLink:
    """The link of one namespace. ``netns_fd`` pins the namespace while the link lives."""

    netns_fd: int
    netns: NetnsId
    host_index: int
    plan: LinkPlan

    @property
    def netns_path(self) -> Path:
        # The worker opens this path: the same namespace the fd holds, wherever the pid went.
        return Path(f"/proc/self/fd/{self.netns_fd}")


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


class LinkMaker:
    """Makes the links of one embassy's workload namespaces (one at a time)."""

    def __init__(self, plan: LinkPlan, *, rtnl: Rtnl, worker: NetnsWorker, l3: IptablesL3) -> None:
        self.plan = plan
        self._rtnl = rtnl
        self._worker = worker
        self._l3 = l3

    def attach(self, pid: int, *, sealed: bool) -> WorkloadLink:
        """Give the namespace of ``pid`` its link (host end down), or adopt the one it has."""
        try:
            fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SealError(
                f"workload pid {pid}: cannot open its network namespace: {exc.strerror}"
            ) from exc
        try:
            return self._attach(fd, sealed)
        except BaseException as exc:
            os.close(fd)
            if isinstance(exc, OSError):
                raise SealError(f"link for workload pid {pid}: {exc.strerror or exc}") from exc
            raise

    def _attach(self, fd: int, sealed: bool) -> WorkloadLink:
        netns = NetnsId.of_fd(fd)
        path = Path(f"/proc/self/fd/{fd}")
        self._l3.install(path, sealed=sealed)
        host = self._rtnl.link_by_name(self.plan.host_name)
        if host is not None and self._is_peer_of(path, host.index):
            _LOG.info("adopted the link %s of %s", self.plan.host_name, netns)
            return WorkloadLink(fd, netns, host.index, self.plan)
        if host is not None:
            # The link of a namespace that is gone or going (its teardown is asynchronous).
            self._delete(host.index)
        bridge = self._rtnl.link_by_name(self.plan.bridge)
        if bridge is None:
            raise SealError(f"the embassy's bridge {self.plan.bridge} does not exist")
        self._rtnl.create_veth(
            self.plan.host_name,
            PEER_NAME,
            fd,
            master=bridge.index,
            mtu=self.plan.mtu,
            peer_mac=self.plan.mac,
        )
        try:
            index = self._new_host_end()
            self._worker.run(path, self._configure_inside)
        except BaseException:
            with contextlib.suppress(OSError):
                self._delete_by_name()
            raise
        _LOG.info("made the link %s for %s (sealed=%s)", self.plan.host_name, netns, sealed)
        return WorkloadLink(fd, netns, index, self.plan)

    def _new_host_end(self) -> int:
        host = self._rtnl.link_by_name(self.plan.host_name)
        if host is None or host.up:
            raise SealError(f"the new link {self.plan.host_name} is missing or not down")
        # A bridge port needs no address. Without IPv6 on it, flipping it costs no address
        # configuration and no walk of the host's IPv6 routing table (which holds a route
        # for every other interface): the gate stays flat in the number of other workloads.
        v6 = f"/proc/sys/net/ipv6/conf/{self.plan.host_name}/disable_ipv6"
        if os.path.exists(v6):
            _write_sysctl(v6, "1")
        return host.index

    def detach(self, link: WorkloadLink) -> None:
        """Remove the link (both ends) and let go of the namespace. Idempotent on the link."""
        try:
            self._delete(link.host_index)
        finally:
            self._l3.forget(link.netns)
            with contextlib.suppress(OSError):
                os.close(link.netns_fd)

    # -- helpers ------------------------------------------------------------------------

    def _delete(self, index: int) -> None:
        try:
            self._rtnl.delete(index)
        except OSError as exc:
            if exc.errno != 19:  # ENODEV: already gone with its namespace
                raise SealError(f"cannot remove link {index}: {exc.strerror}") from exc

    def _delete_by_name(self) -> None:
        host = self._rtnl.link_by_name(self.plan.host_name)
        if host is not None:
            self._rtnl.delete(host.index)

    def _is_peer_of(self, path: Path, host_index: int) -> bool:
        """Whether ``eth0`` in the namespace at ``path`` is the peer of host link ``host_index``."""
        host = self._rtnl.link(host_index)

        def look() -> bool:
            with Rtnl() as inside:
                peer = inside.link_by_name(PEER_NAME)
            return peer is not None and peer.link == host_index and host.link == peer.index

        return self._worker.run(path, look)

    def _configure_inside(self) -> None:
        """On the worker, inside the namespace: sysctls, addresses, routes, eth0 up."""
        plan = self.plan
        # The namespace is a leaf: it never routes, and takes no routing advice from peers
        # on the bridge (a container there could send router advertisements or redirects).
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "0")
        # Writing ip_forward sets all/accept_redirects to its negation (the kernel's
        # inet_forward_change), and a host that does not forward takes a redirect when
        # all/ OR the device says so: all/ goes back to 0 after ip_forward, then the device.
        _write_sysctl("/proc/sys/net/ipv4/conf/all/accept_redirects", "0")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{PEER_NAME}/accept_redirects", "0")
        v6 = f"/proc/sys/net/ipv6/conf/{PEER_NAME}"
        if os.path.isdir(v6):
            # A new namespace may inherit the host's IPv6 forwarding (devconf_inherit_init_net).
            _write_sysctl("/proc/sys/net/ipv6/conf/all/forwarding", "0")
            _write_sysctl(f"{v6}/accept_ra", "0")
            _write_sysctl(f"{v6}/accept_redirects", "0")
            _write_sysctl(f"{v6}/disable_ipv6", "0" if plan.ipv6 is not None else "1")
        with Rtnl() as inside:
            lo = inside.link_by_name("lo")
            eth = inside.link_by_name(PEER_NAME)
            if lo is None or eth is None:
                raise SealError(f"the namespace has no lo or {PEER_NAME} after the link was made")
            if not lo.up:
                inside.set_up(lo.index, True)
            if plan.ipv4 is not None:
                inside.add_address(eth.index, plan.ipv4)
            if plan.ipv6 is not None:
                inside.add_address(eth.index, plan.ipv6)
            inside.set_up(eth.index, True)
            if plan.gateway4 is not None:
                inside.add_default_route(plan.gateway4, eth.index)
            if plan.gateway6 is not None:
                inside.add_default_route(plan.gateway6, eth.index)
