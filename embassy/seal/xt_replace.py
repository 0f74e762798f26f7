"""Whole-table images of a legacy xtables ``filter`` table, read and put back in one call.

This is the kernel's own interface under libiptc: ``getsockopt(IPT_SO_GET_INFO)`` and
``(IPT_SO_GET_ENTRIES)`` read a table as one blob of entries; ``setsockopt(
IPT_SO_SET_REPLACE)`` swaps a whole table for another blob atomically (one commit, as
``iptables-restore`` does). Swapping between two images read ahead of time costs a few
microseconds and no rule encoding, where a python-iptables change costs hundreds.

The replace names how many entries the table holds now (``num_counters``); the kernel
refuses with EAGAIN if that is not so, which makes each swap a compare-and-swap against a
table changed meanwhile. Whatever the table held, the image put back is exactly the one
read: a swap repairs as it switches.

A raw socket is bound to the network namespace it was made in, so a socket made inside a
workload's namespace reaches that namespace's tables from any thread, without ``setns``.
The ABI is the same for IPv4 (``ipt_*``, SOL_IP) and IPv6 (``ip6t_*``, SOL_IPV6) on a
64-bit kernel: the structures below are laid out as there (x86-64 and arm64).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from dataclasses import dataclass

from embassy.seal.rules import Family

TABLE = b"filter"
_NAME = 32  # XT_TABLE_MAXNAMELEN
_HOOKS = 5  # NF_INET_NUMHOOKS
_SO_GET_INFO = 64  # IPT_SO_GET_INFO == IP6T_SO_GET_INFO
_SO_GET_ENTRIES = 65  # IPT_SO_GET_ENTRIES == IP6T_SO_GET_ENTRIES
_SO_SET_REPLACE = 64  # IPT_SO_SET_REPLACE == IP6T_SO_SET_REPLACE
_LEVEL = {Family.V4: socket.IPPROTO_IP, Family.V6: socket.IPPROTO_IPV6}
_DOMAIN = {Family.V4: socket.AF_INET, Family.V6: socket.AF_INET6}

# struct ipt_getinfo: name, valid_hooks, hook_entry[5], underflow[5], num_entries, size.
_GETINFO = struct.Struct(f"={_NAME}sI{_HOOKS}I{_HOOKS}III")
# struct ipt_get_entries: name, size, then the entries at the next 8-byte boundary.
_GET_ENTRIES = struct.Struct(f"={_NAME}sI4x")
# struct ipt_replace: name, valid_hooks, num_entries, size, hook_entry[5], underflow[5],
# num_counters, struct xt_counters *counters (8-byte aligned), then the entries.
_REPLACE = struct.Struct(f"={_NAME}sIII{_HOOKS}I{_HOOKS}IIQ")
_COUNTERS = 16  # struct xt_counters: pcnt, bcnt (u64 each)

_libc = ctypes.CDLL(None, use_errno=True)
_getsockopt = _libc.getsockopt
_getsockopt.argtypes = [
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_uint32),
]
_getsockopt.restype = ctypes.c_int
_setsockopt = _libc.setsockopt
_setsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
_setsockopt.restype = ctypes.c_int


@dataclass(frozen=True, slots=True)
class TableImage:
    """One ``filter`` table as the kernel hands it out, ready to be put back."""

    family: Family
    valid_hooks: int
    hook_entry: tuple[int, ...]
    underflow: tuple[int, ...]
    num_entries: int
    entries: bytes


@dataclass(frozen=True, slots=True)
class TableInfo:
    valid_hooks: int
    hook_entry: tuple[int, ...]
    underflow: tuple[int, ...]
    num_entries: int
    size: int


def _name() -> bytes:
    return TABLE.ljust(_NAME, b"\0")


def getinfo_request() -> bytes:
    return _GETINFO.pack(_name(), 0, *([0] * _HOOKS), *([0] * _HOOKS), 0, 0)


def parse_getinfo(data: bytes) -> TableInfo:
    if len(data) != _GETINFO.size:
        raise ValueError(f"table info: {len(data)} bytes, not {_GETINFO.size}")
    fields = _GETINFO.unpack(data)
    name = fields[0].rstrip(b"\0")
    if name != TABLE:
        raise ValueError(f"table info names {name!r}, not {TABLE!r}")
    hooks = tuple(fields[2 : 2 + _HOOKS])
    under = tuple(fields[2 + _HOOKS : 2 + 2 * _HOOKS])
    return TableInfo(fields[1], hooks, under, fields[-2], fields[-1])


def replace_request(image: TableImage, current_entries: int, counters_address: int) -> bytes:
    """The ``ipt_replace`` (or ``ip6t_replace``) that puts ``image`` in place of a table
    of ``current_entries`` entries; the kernel writes their counters at the address."""
    head = _REPLACE.pack(
        _name(),
        image.valid_hooks,
        image.num_entries,
        len(image.entries),
        *image.hook_entry,
        *image.underflow,
        current_entries,
        counters_address,
    )
    return head + image.entries


def open_socket(family: Family) -> socket.socket:
    """A raw socket of ``family`` in the calling thread's network namespace."""
    return socket.socket(_DOMAIN[family], socket.SOCK_RAW, socket.IPPROTO_RAW)


def _get(sock: socket.socket, family: Family, option: int, request: bytes) -> bytes:
    buf = ctypes.create_string_buffer(request, len(request))
    size = ctypes.c_uint32(len(request))
    if _getsockopt(sock.fileno(), _LEVEL[family], option, buf, ctypes.byref(size)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return buf.raw[: size.value]


def table_info(sock: socket.socket, family: Family) -> TableInfo:
    return parse_getinfo(_get(sock, family, _SO_GET_INFO, getinfo_request()))


def read_image(sock: socket.socket, family: Family) -> TableImage:
    """The table as it is now. A change between the two reads shows as a size mismatch
    (EAGAIN, as the kernel itself answers a stale replace)."""
    info = table_info(sock, family)
    request = _GET_ENTRIES.pack(_name(), info.size) + bytes(info.size)
    data = _get(sock, family, _SO_GET_ENTRIES, request)
    entries = data[_GET_ENTRIES.size :]
    if len(entries) != info.size:
        raise OSError(errno.EAGAIN, "the table changed while it was read")
    return TableImage(
        family, info.valid_hooks, info.hook_entry, info.underflow, info.num_entries, entries
    )


def replace(sock: socket.socket, image: TableImage, current_entries: int) -> None:
    """Put ``image`` in place of the table, which must hold ``current_entries`` entries
    (OSError EAGAIN if it does not)."""
    counters = ctypes.create_string_buffer(_COUNTERS * max(current_entries, 1))
    request = replace_request(image, current_entries, ctypes.addressof(counters))
    buf = ctypes.create_string_buffer(request, len(request))
    if _setsockopt(sock.fileno(), _LEVEL[image.family], _SO_SET_REPLACE, buf, len(request)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def swap(sock: socket.socket, image: TableImage, *, attempts: int = 3) -> None:
    """Put ``image`` in place of whatever the table holds now (read its entry count, then
    replace; again if it changed in between)."""
    for attempt in range(attempts):
        try:
            replace(sock, image, table_info(sock, image.family).num_entries)
        except OSError as exc:
            if exc.errno != errno.EAGAIN or attempt == attempts - 1:
                raise
        else:
            return
