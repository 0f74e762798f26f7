"""The rtnetlink encoders, byte for byte against the kernel's struct layouts, and the parsers
against hostile input.

The expected bytes are written out by hand from the uapi headers (``linux/netlink.h``,
``linux/rtnetlink.h``, ``linux/if_link.h``, ``linux/veth.h``, ``linux/if_addr.h``) in this
machine's byte order (little-endian): nlmsghdr is 16 bytes, ifinfomsg 16, ifaddrmsg 8,
rtmsg 12, an rtattr header 4 with its payload padded to 4.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import struct
import sys
import threading

import pytest

from embassy.net import rtnl
from embassy.net.rtnl import (
    LinkInfo,
    Rtnl,
    address_body,
    attr,
    create_veth_body,
    default_route_body,
    ifinfo,
    iter_attrs,
    iter_messages,
    message,
    parse_link,
    set_link_up_body,
)

pytestmark = pytest.mark.skipif(
    sys.byteorder != "little", reason="the expected bytes are written little-endian"
)

# From the uapi headers, independently of the module's own constants.
RTM_NEWLINK, RTM_GETLINK, RTM_NEWADDR, RTM_NEWROUTE = 16, 18, 20, 24
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO = 3, 4, 5, 10, 18
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
NLA_F_NESTED = 0x8000


def _hex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def _attrs(data: bytes) -> list[tuple[int, bytes]]:
    """An independent rtattr walker for the tests (exact: every byte accounted for)."""
    out = []
    offset = 0
    while offset < len(data):
        length, kind = struct.unpack_from("<HH", data, offset)
        assert length >= 4
        out.append((kind, data[offset + 4 : offset + length]))
        padded = (length + 3) & ~3
        assert data[offset + length : offset + padded] == b"\0" * (padded - length)
        offset += padded
    assert offset == len(data)
    return out


# -- headers and attributes -------------------------------------------------------------------


def test_struct_sizes_are_the_kernels() -> None:
    assert rtnl._NLMSGHDR.size == 16
    assert rtnl._IFINFOMSG.size == 16
    assert rtnl._IFADDRMSG.size == 8
    assert rtnl._RTMSG.size == 12
    assert rtnl._RTATTR.size == 4


def test_constants_are_the_uapi_values() -> None:
    assert (rtnl.RTM_NEWLINK, rtnl.RTM_DELLINK, rtnl.RTM_GETLINK) == (16, 17, 18)
    assert (rtnl.RTM_NEWADDR, rtnl.RTM_NEWROUTE) == (20, 24)
    assert (rtnl.NLMSG_ERROR, rtnl.NLMSG_DONE) == (2, 3)
    assert (rtnl.IFLA_IFNAME, rtnl.IFLA_MTU, rtnl.IFLA_LINK) == (3, 4, 5)
    assert (rtnl.IFLA_MASTER, rtnl.IFLA_LINKINFO, rtnl.IFLA_NET_NS_FD) == (10, 18, 28)
    assert (rtnl.IFA_ADDRESS, rtnl.IFA_LOCAL, rtnl.IFA_FLAGS, rtnl.IFA_F_NODAD) == (1, 2, 8, 2)
    assert (rtnl.RTA_DST, rtnl.RTA_OIF, rtnl.RTA_GATEWAY) == (1, 4, 5)
    assert (rtnl.RT_TABLE_MAIN, rtnl.RTPROT_STATIC, rtnl.RTN_UNICAST) == (254, 4, 1)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "0400 0300"),
        (b"\x01", "0500 0300 01 000000"),
        (b"ab", "0600 0300 6162 0000"),
        (b"abc", "0700 0300 616263 00"),
        (b"abcd", "0800 0300 61626364"),
        (b"eth0\0", "0900 0300 6574683000 000000"),
    ],
)
def test_attr_header_and_padding(payload: bytes, expected: str) -> None:
    assert attr(IFLA_IFNAME, payload) == _hex(expected)


def test_message_header() -> None:
    body = b"\x01\x02\x03\x04"
    got = message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, 0x01020304, body)
    # nlmsg_len 20, nlmsg_type 18, nlmsg_flags 5, nlmsg_seq, nlmsg_pid 0 (the kernel's)
    assert got == _hex("14000000 1200 0500 04030201 00000000 01020304")


def test_ifinfo_layout() -> None:
    # ifi_family u8, pad u8, ifi_type u16, ifi_index s32, ifi_flags u32, ifi_change u32
    assert ifinfo() == bytes(16)
    assert ifinfo(7, 0x10001, 0xFFFFFFFF) == _hex("00 00 0000 07000000 01000100 ffffffff")
    assert ifinfo(-1) == _hex("00 00 0000 ffffffff 00000000 00000000")


def test_set_link_up_changes_only_iff_up() -> None:
    up = message(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 7, set_link_up_body(5, True))
    assert up == _hex(
        "20000000 1000 0500 07000000 00000000"  # nlmsghdr: 32 bytes, RTM_NEWLINK
        "00 00 0000 05000000 01000000 01000000"  # ifinfomsg: index 5, flags UP, change UP
    )
    assert set_link_up_body(5, False) == _hex("00 00 0000 05000000 00000000 01000000")


def test_address_body_ipv4() -> None:
    body = address_body(7, ipaddress.IPv4Interface("192.168.10.5/24"))
    assert body == _hex(
        "02 18 00 00 07000000"  # ifaddrmsg: AF_INET, /24, flags 0, scope universe, index 7
        "0800 0200 c0a80a05"  # IFA_LOCAL
        "0800 0100 c0a80a05"  # IFA_ADDRESS
    )


def test_address_body_ipv6_skips_dad() -> None:
    address = ipaddress.IPv6Interface("fd12:3456:789a:1::e/64")
    body = address_body(3, address)
    packed = address.ip.packed.hex()
    assert body == _hex(
        "0a 40 00 00 03000000"  # ifaddrmsg: AF_INET6, /64, index 3
        f"1400 0200 {packed}"  # IFA_LOCAL (20 bytes)
        f"1400 0100 {packed}"  # IFA_ADDRESS
        "0800 0800 02000000"  # IFA_FLAGS: IFA_F_NODAD
    )


def test_default_route_body_ipv4() -> None:
    body = default_route_body(ipaddress.IPv4Address("10.1.2.1"), 9)
    assert body == _hex(
        # rtmsg: AF_INET, dst_len 0, src_len 0, tos 0, table main, proto static,
        # scope universe, type unicast, flags 0
        "02 00 00 00 fe 04 00 01 00000000"
        "0800 0500 0a010201"  # RTA_GATEWAY
        "0800 0400 09000000"  # RTA_OIF
    )


def test_default_route_body_ipv6() -> None:
    gateway = ipaddress.IPv6Address("fd00::1")
    body = default_route_body(gateway, 2)
    assert body == _hex(
        f"0a 00 00 00 fe 04 00 01 00000000 1400 0500 {gateway.packed.hex()} 0800 0400 02000000"
    )


def test_create_veth_nests_the_peer() -> None:
    body = create_veth_body("ewabc", "eth0", 42, master=11, mtu=1450)
    assert body[:16] == bytes(16)  # the host end: no flags, so it is born down
    top = _attrs(body[16:])
    assert [kind for kind, _ in top] == [IFLA_IFNAME, IFLA_LINKINFO, IFLA_MASTER, IFLA_MTU]
    assert top[0][1] == b"ewabc\0"
    assert top[2][1] == struct.pack("<I", 11)
    assert top[3][1] == struct.pack("<I", 1450)
    info = _attrs(top[1][1])
    assert info[0] == (IFLA_INFO_KIND, b"veth\0")
    assert info[1][0] == IFLA_INFO_DATA
    (peer,) = _attrs(info[1][1])
    assert peer[0] == VETH_INFO_PEER
    assert peer[1][:16] == bytes(16)  # the peer's ifinfomsg: down too
    assert _attrs(peer[1][16:]) == [
        (IFLA_IFNAME, b"eth0\0"),
        (IFLA_NET_NS_FD, struct.pack("<I", 42)),
        (IFLA_MTU, struct.pack("<I", 1450)),
    ]


def test_create_veth_exact_bytes_without_master_or_mtu() -> None:
    body = create_veth_body("ew1", "eth0", 3, master=None, mtu=None)
    assert body == _hex(
        "00000000 00000000 00000000 00000000"  # ifinfomsg
        "0800 0300 65773100"  # IFLA_IFNAME "ew1\0"
        "3c00 1200"  # IFLA_LINKINFO, 60 bytes
        "  0900 0100 7665746800 000000"  #   IFLA_INFO_KIND "veth\0"
        "  2c00 0200"  #   IFLA_INFO_DATA, 44 bytes
        "    2800 0100"  #     VETH_INFO_PEER, 40 bytes
        "      00000000 00000000 00000000 00000000"  #       ifinfomsg
        "      0900 0300 6574683000 000000"  #       IFLA_IFNAME "eth0\0"
        "      0800 1c00 03000000"  #       IFLA_NET_NS_FD 3
    )


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 16,
        "a" * 40,
        "a/b",
        "/",
        "a\0b",
        "\0",
        " eth0",
        "eth0 ",
        "et h0",
        "eth\t0",
        "eth0\n",
        "a:b",
        ".",
        "..",
        "é",
        "eth\u0660",  # an Arabic-Indic zero
    ],
)
def test_bad_interface_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError):
        create_veth_body(name, "eth0", 3, master=None, mtu=None)
    with pytest.raises(ValueError):
        create_veth_body("ew1", name, 3, master=None, mtu=None)


@pytest.mark.parametrize("name", ["a", "eth0", "a" * 15, "ew0123456789abc", "eb-x_y.z"])
def test_good_interface_names(name: str) -> None:
    body = create_veth_body(name, "eth0", 3, master=None, mtu=None)
    assert _attrs(body[16:])[0] == (IFLA_IFNAME, name.encode() + b"\0")


# -- parsers: strict about lengths --------------------------------------------------------------


def _msg(kind: int, seq: int, body: bytes, *, length: int | None = None) -> bytes:
    size = 16 + len(body) if length is None else length
    return struct.pack("<IHHII", size, kind, 0, seq, 0) + body


def test_iter_messages_walks_aligned_messages() -> None:
    first = _msg(RTM_NEWLINK, 1, b"abcde") + b"\0\0\0"  # 21 bytes, padded to 24
    second = _msg(NLMSG_DONE, 2, b"\0\0\0\0")
    assert list(iter_messages(first + second)) == [
        (RTM_NEWLINK, 0, 1, b"abcde"),
        (NLMSG_DONE, 0, 2, b"\0\0\0\0"),
    ]
    assert list(iter_messages(b"")) == []
    # The last message need not be padded.
    assert list(iter_messages(_msg(RTM_NEWLINK, 3, b"x"))) == [(RTM_NEWLINK, 0, 3, b"x")]


@pytest.mark.parametrize(
    "data",
    [
        b"\x10\0\0",  # shorter than a header
        _msg(NLMSG_DONE, 1, b"") + b"\x01",  # a trailing partial header
        _msg(NLMSG_DONE, 1, b"", length=0),  # a zero length would never advance
        _msg(NLMSG_DONE, 1, b"", length=15),  # shorter than its own header
        _msg(NLMSG_DONE, 1, b"abcd", length=21),  # longer than the datagram
        _msg(NLMSG_DONE, 1, b"abcd", length=0xFFFFFFFF),
        _msg(NLMSG_DONE, 1, b"") + _msg(NLMSG_DONE, 2, b"", length=17),
    ],
)
def test_iter_messages_refuses_lying_lengths(data: bytes) -> None:
    with pytest.raises(ValueError):
        list(iter_messages(data))


def test_iter_attrs_walks_and_masks_flags() -> None:
    data = (
        attr(IFLA_IFNAME, b"eth0\0")
        + attr(IFLA_LINKINFO | NLA_F_NESTED, attr(1, b"veth\0"))
        + attr(IFLA_MTU, b"\0\0\0\0")
    )
    got = list(iter_attrs(data))
    assert got == [
        (IFLA_IFNAME, b"eth0\0"),
        (IFLA_LINKINFO, attr(1, b"veth\0")),
        (IFLA_MTU, b"\0\0\0\0"),
    ]
    assert list(iter_attrs(b"")) == []
    # The last attribute need not be padded.
    assert list(iter_attrs(struct.pack("<HH", 5, 9) + b"z")) == [(9, b"z")]


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("<HH", 0, 3),  # a zero length would never advance
        struct.pack("<HH", 3, 3),  # shorter than its own header
        struct.pack("<HH", 9, 3) + b"eth0",  # longer than the data
        struct.pack("<HH", 0xFFFF, 3) + b"eth0",
        attr(3, b"eth0\0") + struct.pack("<HH", 12, 4) + b"\0\0\0\0",  # the second one lies
        b"\x08",  # a partial header
        b"\x08\0\x03",
        attr(3, b"eth0\0") + b"\x08\0",  # a trailing partial header
    ],
)
def test_iter_attrs_refuses_truncated_or_lying_lengths(data: bytes) -> None:
    with pytest.raises(ValueError):
        list(iter_attrs(data))


def _link_body(index: int, flags: int, *attrs: bytes) -> bytes:
    return ifinfo(index, flags) + b"".join(attrs)


def test_parse_link_round_trip() -> None:
    body = _link_body(
        12,
        rtnl.IFF_UP | rtnl.IFF_LOWER_UP | 0x1000,
        attr(IFLA_IFNAME, b"ewabc\0"),
        attr(IFLA_MTU, struct.pack("<I", 1500)),
        attr(IFLA_LINKINFO | NLA_F_NESTED, attr(1, b"veth\0")),
        attr(IFLA_MASTER, struct.pack("<I", 4)),
        attr(IFLA_LINK, struct.pack("<I", 2)),
        attr(999, b"unknown attributes are skipped"),
    )
    link = parse_link(body)
    assert link == LinkInfo(12, "ewabc", rtnl.IFF_UP | rtnl.IFF_LOWER_UP | 0x1000, 4, 2)
    assert link.up


def test_parse_link_down_no_master_no_link() -> None:
    link = parse_link(_link_body(3, rtnl.IFF_LOWER_UP, attr(IFLA_IFNAME, b"lo\0")))
    assert link == LinkInfo(3, "lo", rtnl.IFF_LOWER_UP, None, None)
    assert not link.up
    assert parse_link(ifinfo(9)) == LinkInfo(9, "", 0, None, None)


def test_parse_link_names() -> None:
    # Unterminated, or with bytes after the NUL: the name ends at the first NUL.
    assert parse_link(_link_body(1, 0, attr(IFLA_IFNAME, b"eth0"))).name == "eth0"
    assert parse_link(_link_body(1, 0, attr(IFLA_IFNAME, b"eth0\0junk"))).name == "eth0"
    # Not ASCII: replaced, never an exception.
    assert parse_link(_link_body(1, 0, attr(IFLA_IFNAME, "é\0".encode()))).name == "\ufffd\ufffd"


def test_parse_link_refuses_lying_attributes() -> None:
    with pytest.raises(ValueError):
        parse_link(ifinfo(1) + struct.pack("<HH", 40, IFLA_IFNAME) + b"eth0")


# -- the socket edge, with a scripted socket ----------------------------------------------------


class _ScriptedSocket:
    """Stands in for the netlink socket: records what is sent, replies from a script."""

    def __init__(self, replies: list[list[bytes]]) -> None:
        self.sent: list[bytes] = []
        self._replies = replies

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, _size: int) -> bytes:
        return b"".join(self._replies.pop(0))

    def close(self) -> None:
        pass


def _scripted(replies: list[list[bytes]]) -> tuple[Rtnl, _ScriptedSocket]:
    sock = _ScriptedSocket(replies)
    client = Rtnl.__new__(Rtnl)  # no real socket
    client._sock = sock  # type: ignore[assignment]
    client._seq = 0
    client._lock = threading.Lock()
    return client, sock


def _ack(seq: int, error: int = 0) -> bytes:
    return _msg(NLMSG_ERROR, seq, struct.pack("<i", error) + bytes(16))


def test_request_matches_its_sequence_number_and_skips_stale_replies() -> None:
    link = _link_body(5, rtnl.IFF_UP, attr(IFLA_IFNAME, b"ew1\0"))
    client, sock = _scripted(
        [
            [_ack(99, -errno.EBUSY), _msg(RTM_NEWLINK, 99, _link_body(6, 0))],  # stale
            [_msg(RTM_NEWLINK, 1, link)],
            [_ack(1)],
        ]
    )
    assert client.link(5) == parse_link(link)
    assert sock.sent == [message(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK, 1, ifinfo(5))]


def test_request_raises_the_kernels_errno() -> None:
    client, sock = _scripted([[_ack(1, -errno.EPERM)], [_ack(2, -errno.ENODEV)]])
    with pytest.raises(OSError) as caught:
        client.set_up(4, True)
    assert caught.value.errno == errno.EPERM
    assert sock.sent[0] == message(
        RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, set_link_up_body(4, True)
    )
    assert client.link_by_name("nosuch") is None  # ENODEV: no such link


def test_create_requests_are_exclusive() -> None:
    client, sock = _scripted([[_ack(1)], [_ack(2)], [_ack(3)]])
    client.create_veth("ew1", "eth0", 5, master=2, mtu=None)
    client.add_address(3, ipaddress.IPv4Interface("10.0.0.254/24"))
    client.add_default_route(ipaddress.IPv4Address("10.0.0.1"), 3)
    flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    assert [struct.unpack_from("<HH", m, 4) for m in sock.sent] == [
        (RTM_NEWLINK, flags),
        (RTM_NEWADDR, flags),
        (RTM_NEWROUTE, flags),
    ]


# -- the socket edge, for real (reads only: no privilege needed) --------------------------------


def test_rtnl_reads_loopback_of_this_namespace() -> None:
    with Rtnl() as client:
        lo = client.link_by_name("lo")
        assert lo is not None
        assert lo.name == "lo"
        assert client.link(lo.index) == lo
        assert client.link_by_name("nosuchlink0") is None
        with pytest.raises(OSError) as caught:
            client.link(0x7FFFFFF0)
        assert caught.value.errno == errno.ENODEV
    assert socket.AF_NETLINK  # the real socket family this edge uses
