"""Small synthetic PE images and UKIs, written byte by byte (no toolchain needed).

The layout is what a linker or objcopy writes: DOS header with e_lfanew 0x40, PE signature,
COFF header, optional header (PE32 or PE32+) with 16 data directories, section table, then
each section's raw data at FileAlignment, its VirtualAddress at SectionAlignment. Every
field the tests vary is a parameter, so hostile images are one keyword away from good ones.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MACHINE_X64 = 0x8664
MACHINE_I386 = 0x14C
FILE_ALIGNMENT = 0x200
SECTION_ALIGNMENT = 0x1000
CHECKSUM = 0x5EC7E5  # non-zero, so tests can see it is left out of the hash
DATA_SECTION = 0x40000040  # initialized data, readable


def align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


@dataclass(frozen=True)
class Spec:
    """One section: ``data`` is its content; ``virtual_size`` defaults to ``len(data)``."""

    name: str
    data: bytes
    virtual_size: int | None = None
    virtual_address: int | None = None  # default: the next free SectionAlignment slot
    raw_size: int | None = None  # default: len(data) rounded up to FileAlignment


def build_pe(
    sections: Sequence[Spec],
    *,
    pe32: bool = False,
    machine: int = MACHINE_X64,
    subsystem: int = 10,
    major_image_version: int = 0,
    n_directories: int = 16,
    certificate: bytes | None = None,
    trailing: bytes = b"",
    size_of_image: int | None = None,
    file_alignment: int = FILE_ALIGNMENT,
) -> bytes:
    """A PE image; ``certificate`` is appended (8-byte aligned) and named by directory 4.

    The pinned vectors use a ``file_alignment`` of 0x20 to stay small: the hash and the
    boot model do not depend on it (EDK2 does not check it either)."""
    optional_size = (96 if pe32 else 112) + 8 * n_directories
    table_offset = 0x40 + 4 + 20 + optional_size
    size_of_headers = align(table_offset + 40 * len(sections), file_alignment)

    raw_offset = size_of_headers
    next_va = align(size_of_headers, SECTION_ALIGNMENT)
    table = b""
    body = b""
    end_va = next_va
    for spec in sections:
        raw_size = align(len(spec.data), file_alignment) if spec.raw_size is None else spec.raw_size
        virtual_size = len(spec.data) if spec.virtual_size is None else spec.virtual_size
        va = next_va if spec.virtual_address is None else spec.virtual_address
        assert len(spec.name) <= 8, spec.name
        name = spec.name.encode("ascii").ljust(8, b"\0")
        table += struct.pack(
            "<8sIIIIIIHHI", name, virtual_size, va, raw_size, raw_offset if raw_size else 0,
            0, 0, 0, 0, DATA_SECTION,
        )  # fmt: skip
        body += spec.data[:raw_size].ljust(raw_size, b"\0")
        raw_offset += raw_size
        end_va = max(end_va, va + max(virtual_size, raw_size))
        next_va = align(end_va, SECTION_ALIGNMENT)
    image_size = align(end_va, SECTION_ALIGNMENT) if size_of_image is None else size_of_image

    directories = [(0, 0)] * n_directories
    file_end = size_of_headers + len(body) + len(trailing)
    cert_blob = b""
    if certificate is not None:
        cert_offset = align(file_end, 8)
        cert_blob = bytes(cert_offset - file_end) + certificate
        directories[4] = (cert_offset, len(certificate))

    entry = align(size_of_headers, SECTION_ALIGNMENT)
    if pe32:
        optional = struct.pack(
            "<HBBIIIIIIIIIHHHHHHIIIIHHIIIIII", 0x10B, 2, 40, 0, 0, 0, entry, entry, entry,
            0x400000, SECTION_ALIGNMENT, file_alignment, 0, 0, major_image_version, 0, 0, 0, 0,
            image_size, size_of_headers, CHECKSUM, subsystem, 0, 0, 0, 0, 0, 0, n_directories,
        )  # fmt: skip
    else:
        optional = struct.pack(
            "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII", 0x20B, 2, 40, 0, 0, 0, entry, entry, 0x140000000,
            SECTION_ALIGNMENT, file_alignment, 0, 0, major_image_version, 0, 0, 0, 0,
            image_size, size_of_headers, CHECKSUM, subsystem, 0, 0, 0, 0, 0, 0, n_directories,
        )  # fmt: skip
    optional += b"".join(struct.pack("<II", *d) for d in directories)
    assert len(optional) == optional_size

    dos = b"MZ" + bytes(0x3A) + struct.pack("<I", 0x40)
    coff = struct.pack("<HHIIIHH", machine, len(sections), 0x5EC0DE, 0, 0, optional_size, 0x206)
    headers = (dos + b"PE\0\0" + coff + optional + table).ljust(size_of_headers, b"\0")
    return headers + body + trailing + cert_blob


def sdmagic(version: str) -> Spec:
    """The marker systemd-stub carries (``DECLARE_NOALLOC_SECTION`` in stub.c), NUL-ended."""
    return Spec(".sdmagic", f"#### LoaderInfo: systemd-stub {version} ####\0".encode("ascii"))


def fake_kernel(payload: bytes = b"vmlinuz payload", **options: Any) -> bytes:
    """A PE32+ EFI application that stands in for a kernel (MajorImageVersion 1: a kernel
    with the LINUX_INITRD_MEDIA protocol, which systemd-stub starts with LoadImage)."""
    return build_pe([Spec(".text", payload)], **{"major_image_version": 1, **options})


def build_uki(
    version: str | None,
    sections: Sequence[Spec],
    *,
    stub_code: bytes = b"\xc3 systemd-stub code",
    sbat: bytes | None = b"sbat,1,SBAT Version,sbat,1,https://example.invalid\n",
    **options: Any,
) -> bytes:
    """A UKI: a stub (``.text``, optionally ``.sbat`` and ``.sdmagic``) followed by
    ``sections`` in the order given, as objcopy or ukify append them."""
    stub = [Spec(".text", stub_code)]
    if sbat is not None:
        stub.append(Spec(".sbat", sbat))
    if version is not None:
        stub.append(sdmagic(version))
    return build_pe([*stub, *sections], **options)


def standard_sections(kernel: bytes | None = None) -> list[Spec]:
    """.osrel, .cmdline, .uname, .linux, .initrd, .pcrsig, .pcrpkey: what ukify puts in."""
    return [
        Spec(".osrel", b'ID=embassy\nNAME="Embassy"\nIMAGE_VERSION=1\n'),
        Spec(".cmdline", b"console=ttyS0 roothash=" + b"ab" * 32),
        Spec(".uname", b"6.12.0-embassy"),
        Spec(".linux", fake_kernel() if kernel is None else kernel),
        Spec(".initrd", bytes(range(256)) * 3),
        Spec(".pcrsig", b'{"sha256":[]}'),
        Spec(".pcrpkey", b"-----BEGIN PUBLIC KEY-----\n-----END PUBLIC KEY-----\n"),
    ]
