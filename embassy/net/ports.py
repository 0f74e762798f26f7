"""Publish the workload's ports on the host: kernel DNAT, never a proxy in the embassy.

The workload is not a Docker endpoint (it starts with no network), so Docker cannot
publish its ports; the embassy does it with three rules in the host's legacy ``nat``
table (python-iptables), in chains of its own:

    -A PREROUTING -m addrtype --dst-type LOCAL -j EMBASSY-P-<id>     (from other hosts)
    -A OUTPUT -m addrtype --dst-type LOCAL -j EMBASSY-P-<id>         (from this host)
    -A EMBASSY-P-<id> [-d HOST_IP/32] -p tcp -m tcp --dport HOST_PORT
        -j DNAT --to-destination W:PORT
    -A POSTROUTING -s 127.0.0.0/8 -o <bridge> -j MASQUERADE         (in EMBASSY-S-<id>)

Loopback clients (``127.0.0.1:PORT``) need ``route_localnet`` on the embassy's bridge and
the masquerade, as Docker itself does without its userland proxy. The embassy never
touches a byte of these flows: they cross the link, and the gate pauses them like any
other. Legacy xtables NAT runs beside Docker's nf_tables NAT in the same hooks (checked:
both bind connections; the first rule that matches wins). A host port of 0 gets a free
port, which the embassy keeps bound (not listening) so nothing else can take it.

Remote clients additionally need the host's FORWARD policy to admit the flow (Docker
drops forwarded traffic to its bridges unless it published the port itself): that is the
operator's host policy, not the embassy's, and is documented in docs/architecture.md.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import iptc

from embassy.errors import SealError
from embassy.net.plan import Published
from embassy.seal.iptables import committing, delete_jumps
from embassy.seal.netns import NetnsWorker
from embassy.workload.spec import PortMapping

_HOME = Path("/proc/self/ns/net")


def choose_ports(ports: tuple[PortMapping, ...]) -> tuple[Published, ...]:
    """Fixed host ports as given; a 0 replaced by a port free right now."""
    out = []
    for port in ports:
        host_port = port.host_port or _free_port(port.host_ip, port.protocol)
        out.append(Published(port.protocol, port.host_ip, host_port, port.container_port))
    return tuple(out)


def _free_port(host_ip: str, protocol: str) -> int:
    kind = socket.SOCK_STREAM if protocol == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((host_ip, 0))
        return int(probe.getsockname()[1])


def _chain_names(embassy_id: str) -> tuple[str, str]:
    return f"EMBASSY-P-{embassy_id}"[:28], f"EMBASSY-S-{embassy_id}"[:28]


def _nat() -> AbstractContextManager[Any]:
    table = iptc.Table(iptc.Table.NAT)
    table.autocommit = False
    return committing(table)


def _jump(chain: str, target: str, **fields: str) -> Any:
    rule = iptc.Rule()
    for key, value in fields.items():
        setattr(rule, key, value)
    if chain in ("PREROUTING", "OUTPUT"):
        match = rule.create_match("addrtype")
        match.dst_type = "LOCAL"
    rule.target = rule.create_target(target)
    return rule


def _dnat(port: Published, address: ipaddress.IPv4Address) -> Any:
    rule = iptc.Rule()
    if port.host_ip != "0.0.0.0":  # noqa: S104 - matching "any address", not binding
        rule.dst = f"{port.host_ip}/32"
    rule.protocol = port.protocol
    match = rule.create_match(port.protocol)
    match.dport = str(port.host_port)
    rule.target = rule.create_target("DNAT")
    rule.target.to_destination = f"{address}:{port.container_port}"
    return rule


def _remove(table: Any, chains: tuple[str, ...]) -> None:
    delete_jumps(table, chains)
    for name in chains:
        if table.is_chain(name):
            table.flush_entries(name)
            table.delete_chain(name)


class PortPublisher:
    """The host-side rules of one embassy's published ports, kept while it runs."""

    def __init__(self, embassy_id: str, bridge: str, worker: NetnsWorker) -> None:
        self._chains = _chain_names(embassy_id)
        self._bridge = bridge
        self._worker = worker
        self._reserved: list[socket.socket] = []

    def publish(self, ports: tuple[Published, ...], address: ipaddress.IPv4Address) -> None:
        """(Re)write the rules for ``ports`` to ``address`` in one commit; reserve the ports."""
        self._reserve(ports)
        forward, masquerade = self._chains

        def apply() -> None:
            with _nat() as table:
                _remove(table, self._chains)
                if not ports:
                    return
                chain = table.create_chain(forward)
                for port in ports:
                    chain.append_rule(_dnat(port, address))
                snat = table.create_chain(masquerade)
                snat.append_rule(
                    _jump(masquerade, "MASQUERADE", src="127.0.0.0/8", out_interface=self._bridge)
                )
                for builtin in ("PREROUTING", "OUTPUT"):
                    iptc.Chain(table, builtin).insert_rule(_jump(builtin, forward), 0)
                iptc.Chain(table, "POSTROUTING").insert_rule(_jump("POSTROUTING", masquerade), 0)
            if ports:
                # Loopback clients: let DNAT'ed packets with a 127/8 source leave on the
                # bridge (then masqueraded), as Docker does without its userland proxy.
                with open(f"/proc/sys/net/ipv4/conf/{self._bridge}/route_localnet", "w") as f:
                    f.write("1")

        try:
            self._worker.run(_HOME, apply)
        except (iptc.IPTCError, iptc.XTablesError, OSError) as exc:
            raise SealError(f"cannot publish the workload's ports: {exc}") from exc

    def unpublish(self) -> None:
        def apply() -> None:
            with _nat() as table:
                _remove(table, self._chains)

        try:
            self._worker.run(_HOME, apply)
        except (iptc.IPTCError, iptc.XTablesError, OSError) as exc:
            raise SealError(f"cannot remove the published ports: {exc}") from exc
        self.release()

    def release(self) -> None:
        """Let the reserved ports go (daemon stop): the rules stay for the next start."""
        for sock in self._reserved:
            sock.close()
        self._reserved.clear()

    def _reserve(self, ports: tuple[Published, ...]) -> None:
        self.release()
        for port in ports:
            kind = socket.SOCK_STREAM if port.protocol == "tcp" else socket.SOCK_DGRAM
            sock = socket.socket(socket.AF_INET, kind)
            try:
                sock.bind((port.host_ip, port.host_port))
            except OSError as exc:
                sock.close()
                with contextlib.suppress(OSError):
                    self.release()
                raise SealError(
                    f"host port {port.host_ip}:{port.host_port}/{port.protocol} is taken: "
                    f"{exc.strerror}"
                ) from exc
            self._reserved.append(sock)
