"""A small rtnetlink client: just the link, address and route operations the embassy needs.

Why not iproute2 or pyroute2: the seal flips a link's state on the hot path of every
session, and one ``RTM_NEWLINK`` on an open netlink socket takes about 20 µs here, against
milliseconds for a process spawn and a forked proxy per namespace. The message encoders are
pure functions (pinned by unit tests); :class:`Rtnl` is the thin socket edge.

A netlink socket acts in the network namespace of the thread that *created* it, for its
whole life: create an :class:`Rtnl` on a thread that has ``setns()``-ed into a workload's
namespace (see :mod:`embassy.seal.netns`) and it configures that namespace from any thread
afterwards, with no further ``setns``.

Every request asks for an acknowledgement and is matched by sequence number; a netlink
error becomes :class:`OSError` with the kernel's errno, which callers turn into a precise
:class:`~embassy.errors.SealError`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0

NLMSG_ERROR = 2
NLMSG_DONE = 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR = 20
RTM_NEWROUTE = 24

NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINK = 5
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
VETH_INFO_PEER = 1

IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_FLAGS = 8
IFA_F_NODAD = 0x02

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # family, dst_len, src_len, tos, table, proto, scope, type, flags
_RTATTR = struct.Struct("=HH")
_ERR = struct.Struct("=i")
_RECV = 65536


def _align(n: int) -> int:
    return (n + 3) & ~3


def attr(kind: int, payload: bytes) -> bytes:
    """One rtattr: header, payload, padding to 4 bytes."""
    length = _RTATTR.size + len(payload)
    return _RTATTR.pack(length, kind) + payload + b"\0" * (_align(length) - length)


def _name(name: str) -> bytes:
    """``name`` NUL-terminated, if the kernel's ``dev_valid_name`` would take it."""
    raw = name.encode("ascii")
    if not 0 < len(raw) < 16 or raw in (b".", b"..") or any(c in b"/:\0 \t\n\v\f\r" for c in raw):
        raise ValueError(f"bad interface name {name!r}")
    return raw + b"\0"


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    """A whole netlink message (header + body); the body is already 4-aligned."""
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change)


def set_link_up_body(index: int, up: bool) -> bytes:
    """RTM_NEWLINK body that changes only IFF_UP of link ``index``."""
    return ifinfo(index, IFF_UP if up else 0, IFF_UP)


def create_veth_body(
    host: str,
    peer: str,
    peer_netns_fd: int,
    *,
    master: int | None,
    mtu: int | None,
    peer_mac: bytes | None = None,
) -> bytes:
    """RTM_NEWLINK body for a veth pair: ``host`` here (down), ``peer`` born in another netns.

    The peer is created directly inside the namespace behind ``peer_netns_fd``, so it never
    exists anywhere else; the host end is created down (no ``IFF_UP``) and stays so until
    the embassy opens the gate.
    """
    peer_attrs = attr(IFLA_IFNAME, _name(peer)) + attr(
        IFLA_NET_NS_FD, struct.pack("=I", peer_netns_fd)
    )
    if mtu is not None:
        peer_attrs += attr(IFLA_MTU, struct.pack("=I", mtu))
    if peer_mac is not None:
        if len(peer_mac) != 6 or peer_mac[0] & 1:
            raise ValueError("the peer's MAC must be 6 bytes and unicast")
        peer_attrs += attr(IFLA_ADDRESS, peer_mac)
    info = attr(IFLA_INFO_KIND, b"veth\0") + attr(
        IFLA_INFO_DATA, attr(VETH_INFO_PEER, ifinfo() + peer_attrs)
    )
    body = ifinfo() + attr(IFLA_IFNAME, _name(host)) + attr(IFLA_LINKINFO, info)
    if master is not None:
        body += attr(IFLA_MASTER, struct.pack("=I", master))
    if mtu is not None:
        body += attr(IFLA_MTU, struct.pack("=I", mtu))
    return body


def address_body(index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> bytes:
    """RTM_NEWADDR body: ``interface`` (address/prefix) on link ``index``; IPv6 skips DAD
    (the address is reserved for this link by the network's IPAM: nothing else can hold it)."""
    family = socket.AF_INET if interface.version == 4 else socket.AF_INET6
    packed = interface.ip.packed
    body = _IFADDRMSG.pack(family, interface.network.prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)
    if family == socket.AF_INET6:
        body += attr(IFA_FLAGS, struct.pack("=I", IFA_F_NODAD))
    return body


def default_route_body(gateway: ipaddress.IPv4Address | ipaddress.IPv6Address, oif: int) -> bytes:
    family = socket.AF_INET if gateway.version == 4 else socket.AF_INET6
    body = _RTMSG.pack(
        family, 0, 0, 0, RT_TABLE_MAIN, RTPROT_STATIC, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    return body + attr(RTA_GATEWAY, gateway.packed) + attr(RTA_OIF, struct.pack("=I", oif))


def iter_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, body) of each message in one datagram; strict about lengths."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < _NLMSGHDR.size:
            raise ValueError("truncated netlink header")
        length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            raise ValueError("bad netlink message length")
        yield kind, flags, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


def iter_attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while offset < len(data):
        if len(data) - offset < _RTATTR.size:
            raise ValueError("truncated rtattr header")
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            raise ValueError("bad rtattr length")
        yield kind & 0x3FFF, data[offset + _RTATTR.size : offset + length]
        offset += _align(length)


@dataclass(frozen=True, slots=True)
class LinkInfo:
    index: int
    name: str
    flags: int
    master: int | None
    link: int | None  # the peer's index (in the peer's namespace) for a veth

    @property
    def up(self) -> bool:
        return bool(self.flags & IFF_UP)


def parse_link(body: bytes) -> LinkInfo:
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(body)
    name, master, link = "", None, None
    for kind, value in iter_attrs(body[_IFINFOMSG.size :]):
        if kind == IFLA_IFNAME:
            name = value.split(b"\0", 1)[0].decode("ascii", "replace")
        elif kind == IFLA_MASTER:
            master = struct.unpack("=I", value[:4])[0]
        elif kind == IFLA_LINK:
            link = struct.unpack("=I", value[:4])[0]
    return LinkInfo(index, name, flags, master, link)


class Rtnl:
    """One rtnetlink socket, bound to the network namespace of the creating thread."""

    def __init__(self) -> None:
        self._sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE
        )
        self._sock.bind((0, 0))
        self._sock.settimeout(5.0)
        self._seq = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes) -> list[bytes]:
        """Send one request; return the bodies of its replies (dumps) after its ack."""
        with self._lock:
            self._seq = (self._seq % 0x7FFFFFFF) + 1
            seq = self._seq
            self._sock.send(message(kind, flags | NLM_F_REQUEST | NLM_F_ACK, seq, body))
            replies: list[bytes] = []
            while True:
                data = self._sock.recv(_RECV)
                for rkind, rflags, rseq, rbody in iter_messages(data):
                    if rseq != seq:
                        continue  # a stale reply of an earlier, timed-out request
                    if rkind == NLMSG_ERROR:
                        (error,) = _ERR.unpack_from(rbody)
                        if error:
                            raise OSError(-error, os.strerror(-error))
                        return replies
                    if rkind == NLMSG_DONE:
                        return replies
                    replies.append(rbody)
                    del rflags

    def set_up(self, index: int, up: bool) -> None:
        self._request(RTM_NEWLINK, 0, set_link_up_body(index, up))

    def link(self, index: int) -> LinkInfo:
        """The link ``index`` now (OSError ENODEV when it does not exist)."""
        replies = self._request(RTM_GETLINK, 0, ifinfo(index))
        if not replies:
            raise OSError(19, "no reply for the link")
        return parse_link(replies[0])

    def link_by_name(self, name: str) -> LinkInfo | None:
        try:
            replies = self._request(RTM_GETLINK, 0, ifinfo() + attr(IFLA_IFNAME, _name(name)))
        except OSError as exc:
            if exc.errno == 19:  # ENODEV
                return None
            raise
        return parse_link(replies[0]) if replies else None

    def create_veth(
        self,
        host: str,
        peer: str,
        peer_netns_fd: int,
        *,
        master: int | None,
        mtu: int | None,
        peer_mac: bytes | None = None,
    ) -> None:
        body = create_veth_body(
            host, peer, peer_netns_fd, master=master, mtu=mtu, peer_mac=peer_mac
        )
        self._request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)

    def delete(self, index: int) -> None:
        self._request(RTM_DELLINK, 0, ifinfo(index))

    def add_address(
        self, index: int, interface: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    ) -> None:
        self._request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, address_body(index, interface))

    def add_default_route(
        self, gateway: ipaddress.IPv4Address | ipaddress.IPv6Address, oif: int
    ) -> None:
        self._request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, default_route_body(gateway, oif))
