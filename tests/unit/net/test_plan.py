"""The link plan as data: names within IFNAMSIZ, the ULA subnet, the reserved addresses and
the published-port label the embassy reads back after a restart."""

from __future__ import annotations

import ipaddress

import pytest

from embassy.net.plan import (
    PEER_NAME,
    LinkPlan,
    Published,
    bridge_name,
    host_link_name,
    parse_published,
    ula_subnet,
    workload_address4,
    workload_address6,
)

IDS = ("a", "0123456789ab", "f" * 12, "x" * 13, "y" * 14, "0123456789abcdef0123456789abcdef")


@pytest.mark.parametrize("embassy_id", IDS)
def test_names_fit_ifnamsiz(embassy_id: str) -> None:
    for name in (bridge_name(embassy_id), host_link_name(embassy_id)):
        assert 0 < len(name.encode()) <= 15
    assert bridge_name(embassy_id).startswith("eb")
    assert host_link_name(embassy_id).startswith("ew")
    assert bridge_name(embassy_id) != host_link_name(embassy_id)


def test_names_of_a_real_embassy_id() -> None:
    # embassy ids are secrets.token_hex(6): 12 hex digits, kept whole.
    assert bridge_name("0123456789ab") == "eb0123456789ab"
    assert host_link_name("0123456789ab") == "ew0123456789ab"
    assert PEER_NAME == "eth0"


def test_ula_subnet_is_a_stable_unique_local_64() -> None:
    subnet = ula_subnet("0123456789ab")
    assert subnet == ula_subnet("0123456789ab")  # stable across restarts
    assert subnet.prefixlen == 64
    assert subnet.subnet_of(ipaddress.IPv6Network("fd00::/8"))
    assert subnet.is_private


def test_ula_subnet_differs_per_id() -> None:
    ids = [f"{i:012x}" for i in range(200)] + list(IDS)
    subnets = {ula_subnet(i) for i in ids}
    assert len(subnets) == len(set(ids))


def test_ula_subnet_is_pinned() -> None:
    # A change would move every running embassy's workload to another subnet on upgrade.
    assert str(ula_subnet("0123456789ab")) == "fd03:b65f:4877:84d2::/64"


@pytest.mark.parametrize(
    ("subnet", "address"),
    [
        ("172.23.0.0/16", "172.23.255.254/16"),
        ("10.1.2.0/24", "10.1.2.254/24"),
        ("192.168.7.8/29", "192.168.7.14/29"),
        ("198.18.0.0/15", "198.19.255.254/15"),
    ],
)
def test_workload_address4_is_the_last_usable(subnet: str, address: str) -> None:
    network = ipaddress.IPv4Network(subnet)
    got = workload_address4(network)
    assert got == ipaddress.IPv4Interface(address)
    assert got.network == network
    assert got.ip not in (network.network_address, network.broadcast_address)
    assert got.ip != network.network_address + 1  # Docker's gateway


@pytest.mark.parametrize("subnet", ["10.0.0.0/30", "10.0.0.0/31", "10.0.0.1/32"])
def test_workload_address4_refuses_tiny_subnets(subnet: str) -> None:
    with pytest.raises(ValueError):
        workload_address4(ipaddress.IPv4Network(subnet))


def test_workload_address6() -> None:
    subnet = ula_subnet("0123456789ab")
    address = workload_address6(subnet)
    assert address.network == subnet
    assert int(address.ip) - int(subnet.network_address) == 0xE
    assert address.ip != subnet.network_address + 1  # the gateway


def test_link_plan_json() -> None:
    plan = LinkPlan(
        host_name="ew1",
        bridge="eb1",
        mtu=1500,
        ipv4=ipaddress.IPv4Interface("10.1.2.254/24"),
        gateway4=ipaddress.IPv4Address("10.1.2.1"),
    )
    assert plan.to_json() == {
        "link": "ew1",
        "bridge": "eb1",
        "ipv4": "10.1.2.254/24",
        "ipv6": None,
    }


# -- published ports ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "published",
    [
        Published("tcp", "127.0.0.1", 8080, 80),
        Published("udp", "0.0.0.0", 1, 65535),
        Published("tcp", "255.255.255.255", 65535, 1),
        Published("tcp", "10.20.30.40", 443, 8443),
    ],
)
def test_published_round_trips(published: Published) -> None:
    assert parse_published(published.text) == published
    assert published.to_json() == {
        "protocol": published.protocol,
        "host_ip": published.host_ip,
        "host_port": published.host_port,
        "container_port": published.container_port,
    }


def test_published_text() -> None:
    assert Published("tcp", "127.0.0.1", 8080, 80).text == "127.0.0.1:8080:80/tcp"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "127.0.0.1:8080:80",
        "127.0.0.1:8080/tcp",
        "127.0.0.1:8080:80/sctp",
        "127.0.0.1:8080:80/TCP",
        "127.0.0.1:0:80/tcp",
        "127.0.0.1:8080:0/tcp",
        "127.0.0.1:65536:80/tcp",
        "127.0.0.1:8080:65536/tcp",
        "127.0.0.1:99999:80/tcp",
        "127.0.0.1:123456:80/tcp",
        "127.0.0.1:-1:80/tcp",
        "127.0.0.1:+80:80/tcp",
        "127.0.0.1:8080:80/tcp:1",
        "127.0.0.1:8080:80:90/tcp",
        "127.0.0.1:8080:80/tcp,127.0.0.1:8081:81/tcp",
        "tcp:127.0.0.1:8080:80",
        " 127.0.0.1:8080:80/tcp",
        "127.0.0.1:8080:80/tcp ",
        "127.0.0.1:8080:80/tcp\n",
        "127.0.0.1 :8080:80/tcp",
        "127.0.0.1:8080 :80/tcp",
        "127.0.0.1:80\t80:80/tcp",
        "127.0.0.1:\uff18\uff10\uff18\uff10:80/tcp",  # fullwidth digits
        "127.0.0.1:80\u00b2:80/tcp",  # a superscript two: str.isdigit() says yes
        "127.0.0.1:\u0668\u0660:80/tcp",  # Arabic-Indic digits: int() would take them
        "127.0.0.1:8080:\u0668\u0660/tcp",
        "\u0661\u0662\u0667.0.0.1:8080:80/tcp",
        "127.0.0.256:8080:80/tcp",
        "127.0.0:8080:80/tcp",
        "127.0.0.1.1:8080:80/tcp",
        "127.0.0.01:8080:80/tcp",
        "1.2.3.4.:8080:80/tcp",
        "....:8080:80/tcp",
        "::1:8080:80/tcp",
        "[::1]:8080:80/tcp",
        "localhost:8080:80/tcp",
        "127.0.0.1:8080:80/tcp\x00",
        "127.0.0.1:8080:80/tc",
    ],
)
def test_parse_published_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_published(text)


def test_parse_published_refuses_very_long_input_briefly() -> None:
    text = "1" * 1_000_000 + ".0.0.1:8080:80/tcp"
    with pytest.raises(ValueError) as caught:
        parse_published(text)
    assert len(str(caught.value)) < 120  # the message quotes a bounded prefix only
