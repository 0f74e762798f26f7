"""How a workload namespace is wired, as data (pure).

The embassy's network is a Docker bridge network (``embassy-<id>``): other containers can
join it, and Docker's own rules forward and masquerade for it. The workload is not a Docker
endpoint of it: the embassy makes a veth pair whose host end (``ew<id>``) is a port of that
bridge and whose other end is born as ``eth0`` inside the workload's namespace, with one
address per family that the network's IPAM reserves for it (an auxiliary address: Docker
never hands it to a container).
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from typing import Any

PEER_NAME = "eth0"
RESERVATION = "embassy-workload"  # the network's auxiliary-address key


def bridge_name(embassy_id: str) -> str:
    """The Linux bridge of the embassy's Docker network (at most 15 bytes)."""
    return f"eb{embassy_id}"[:15]


def host_link_name(embassy_id: str) -> str:
    """The host end of the workload's veth pair: the gate (at most 15 bytes)."""
    return f"ew{embassy_id}"[:15]


def workload_mac(embassy_id: str) -> bytes:
    """A stable, locally administered unicast MAC for the workload's ``eth0``.

    A restarted workload gets a new namespace and a new link, but the same MAC (and so the
    same IPv6 link-local address): its peers' neighbour entries stay right, and nothing has
    to be announced when the gate opens.
    """
    digest = hashlib.sha256(f"embassy-mac-v1 {embassy_id}".encode()).digest()
    return bytes([0x02]) + digest[:5]


def ula_subnet(embassy_id: str) -> ipaddress.IPv6Network:
    """A unique-local /64 (RFC 4193) derived from the embassy id: stable across restarts,
    distinct between embassies on one host."""
    digest = hashlib.sha256(f"embassy-ula-v1 {embassy_id}".encode()).digest()
    prefix = bytes([0xFD]) + digest[:7] + bytes(8)
    return ipaddress.IPv6Network((prefix, 64))


def workload_address4(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Interface:
    """The subnet's last usable address: Docker's IPAM hands out addresses from the bottom."""
    if subnet.num_addresses < 8:
        raise ValueError(f"subnet {subnet} is too small for the embassy's network")
    return ipaddress.IPv4Interface((subnet.broadcast_address - 1, subnet.prefixlen))


def workload_address6(subnet: ipaddress.IPv6Network) -> ipaddress.IPv6Interface:
    return ipaddress.IPv6Interface((subnet.network_address + 0xE, subnet.prefixlen))


@dataclass(frozen=True, slots=True)
class LinkPlan:
    """Everything the embassy sets up for one workload namespace."""

    host_name: str
    bridge: str
    mtu: int | None
    ipv4: ipaddress.IPv4Interface | None
    gateway4: ipaddress.IPv4Address | None
    ipv6: ipaddress.IPv6Interface | None = None
    gateway6: ipaddress.IPv6Address | None = None
    mac: bytes | None = None  # the workload's eth0; None: the kernel picks one

    def to_json(self) -> dict[str, Any]:
        return {
            "link": self.host_name,
            "bridge": self.bridge,
            "ipv4": None if self.ipv4 is None else str(self.ipv4),
            "ipv6": None if self.ipv6 is None else str(self.ipv6),
        }


@dataclass(frozen=True, slots=True)
class Published:
    protocol: str
    host_ip: str
    host_port: int
    container_port: int

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "host_ip": self.host_ip,
            "host_port": self.host_port,
            "container_port": self.container_port,
        }

    @property
    def text(self) -> str:
        return f"{self.host_ip}:{self.host_port}:{self.container_port}/{self.protocol}"


_PUBLISHED = re.compile(r"([0-9.]{7,15}):([0-9]{1,5}):([0-9]{1,5})/(tcp|udp)", re.ASCII)


def parse_published(text: str) -> Published:
    """The inverse of :attr:`Published.text` (the embassy stores it in a container label)."""
    match = _PUBLISHED.fullmatch(text)
    if match is None:
        raise ValueError(f"bad published port {text[:64]!r}")
    host_ip, host_port, container_port, protocol = match.groups()
    ipaddress.IPv4Address(host_ip)  # ValueError when it is not an address
    published = Published(protocol, host_ip, int(host_port), int(container_port))
    if not (0 < published.host_port < 65536 and 0 < published.container_port < 65536):
        raise ValueError(f"bad published port {text[:64]!r}")
    return published
