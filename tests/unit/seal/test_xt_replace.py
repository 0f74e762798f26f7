"""The kernel structures of a whole-table replace, laid out byte for byte.

The offsets are the kernel's (``struct ipt_getinfo``, ``ipt_get_entries``, ``ipt_replace``
and their ``ip6t_`` twins on a 64-bit kernel); a layout that drifted would be refused by
the kernel at best and misread at worst, so they are pinned here.
"""

from __future__ import annotations

import struct

import pytest

from embassy.seal.rules import Family
from embassy.seal.xt_replace import (
    TableImage,
    getinfo_request,
    parse_getinfo,
    replace_request,
)

IMAGE = TableImage(
    family=Family.V4,
    valid_hooks=0b1110,
    hook_entry=(0, 152, 304, 456, 0),
    underflow=(0, 1000, 1152, 1304, 0),
    num_entries=9,
    entries=bytes(range(256)) * 5 + b"tail",
)


def test_a_table_info_request_names_the_filter_table_and_is_84_bytes() -> None:
    request = getinfo_request()
    assert len(request) == 84
    assert request[:32] == b"filter" + bytes(26)
    assert request[32:] == bytes(52)


def test_table_info_is_read_at_the_kernels_offsets() -> None:
    raw = (
        b"filter".ljust(32, b"\0")
        + struct.pack("=I", 0b1110)
        + struct.pack("=5I", 0, 152, 304, 456, 0)
        + struct.pack("=5I", 0, 1000, 1152, 1304, 0)
        + struct.pack("=II", 9, 1416)
    )
    info = parse_getinfo(raw)
    assert (info.valid_hooks, info.num_entries, info.size) == (0b1110, 9, 1416)
    assert info.hook_entry == (0, 152, 304, 456, 0)
    assert info.underflow == (0, 1000, 1152, 1304, 0)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"filter".ljust(84, b"\0")[:83], "83 bytes"),
        (b"nat".ljust(84, b"\0"), "names b'nat'"),
    ],
)
def test_table_info_of_another_size_or_table_is_refused(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_getinfo(raw)


def test_a_replace_request_is_laid_out_as_the_kernels_ipt_replace() -> None:
    request = replace_request(IMAGE, current_entries=7, counters_address=0x7F00DEADBEEF)
    assert len(request) == 96 + len(IMAGE.entries)
    assert request[:32] == b"filter" + bytes(26)
    assert struct.unpack_from("=III", request, 32) == (0b1110, 9, len(IMAGE.entries))
    assert struct.unpack_from("=5I", request, 44) == IMAGE.hook_entry
    assert struct.unpack_from("=5I", request, 64) == IMAGE.underflow
    assert struct.unpack_from("=I", request, 84) == (7,)  # num_counters: the table now
    assert struct.unpack_from("=Q", request, 88) == (0x7F00DEADBEEF,)  # 8-byte aligned
    assert request[96:] == IMAGE.entries
