"""The Authenticode image hash and the strict PE parser behind it."""

from __future__ import annotations

import hashlib
import random
import struct

import pytest

from embassy.errors import ImageFormatError, WireFormatError
from embassy.image.pe import authenticode_digest, parse_pe, pe_sections
from tests.unit.image.builder import CHECKSUM, Spec, build_pe

TEXT = Spec(".text", b"\xc3" * 100)
DATA = Spec(".data", b"data" * 200)
LFANEW = 0x40
OPTIONAL = LFANEW + 24
CHECKSUM_AT = OPTIONAL + 64
CERT_ENTRY_PLUS = OPTIONAL + 112 + 8 * 4  # PE32+: data directory 4
CERT_ENTRY_32 = OPTIONAL + 96 + 8 * 4  # PE32
SIGNATURE = struct.pack("<IHH", 8 + 8, 0x0200, 0x0002) + b"PKCS#7.."


def patched(data: bytes, offset: int, fmt: str, *values: object) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def by_hand(
    data: bytes, cert_entry: int | None, headers: int, pieces: list[tuple[int, int]]
) -> bytes:
    """The hash spelled out: headers without CheckSum (and directory 4), then ``pieces``."""
    h = hashlib.sha256(data[:CHECKSUM_AT])
    if cert_entry is None:
        h.update(data[CHECKSUM_AT + 4 : headers])
    else:
        h.update(data[CHECKSUM_AT + 4 : cert_entry] + data[cert_entry + 8 : headers])
    for start, end in pieces:
        h.update(data[start:end])
    return h.digest()


@pytest.mark.parametrize(("pe32", "cert_entry"), [(False, CERT_ENTRY_PLUS), (True, CERT_ENTRY_32)])
def test_known_answer(pe32: bool, cert_entry: int) -> None:
    data = build_pe([TEXT, DATA], pe32=pe32)
    image = parse_pe(data)
    assert image.magic == (0x10B if pe32 else 0x20B)
    headers = image.size_of_headers
    expected = by_hand(data, cert_entry, headers, [(headers, len(data))])
    assert authenticode_digest(data) == expected
    assert (
        authenticode_digest(data, "sha1")
        == hashlib.sha1(
            data[:CHECKSUM_AT] + data[CHECKSUM_AT + 4 : cert_entry] + data[cert_entry + 8 :]
        ).digest()
    )


def test_without_a_certificate_directory_only_the_checksum_is_skipped() -> None:
    # EDK2 (and the Authenticode spec) skip directory 4 only if the header has one; pesign
    # skips those 8 bytes regardless (tests/integration/test_image_tools.py).
    data = build_pe([TEXT, DATA], n_directories=4)
    image = parse_pe(data)
    assert image.certificate_entry_offset is None
    expected = by_hand(data, None, image.size_of_headers, [(image.size_of_headers, len(data))])
    assert authenticode_digest(data) == expected


def test_sections_are_hashed_in_file_order_not_table_order() -> None:
    data = bytearray(build_pe([TEXT, DATA]))
    table = OPTIONAL + 112 + 8 * 16
    first, second = bytes(data[table : table + 40]), bytes(data[table + 40 : table + 80])
    data[table : table + 80] = second + first  # table lists .data first, the file has .text first
    swapped = bytes(data)
    image = parse_pe(swapped)
    assert [s.name for s in image.sections] == [".data", ".text"]
    text, dat = image.sections[1], image.sections[0]
    pieces = [
        (text.raw_offset, text.raw_offset + text.raw_size),
        (dat.raw_offset, dat.raw_offset + dat.raw_size),
    ]
    assert authenticode_digest(swapped) == by_hand(
        swapped, CERT_ENTRY_PLUS, image.size_of_headers, pieces
    )


def test_checksum_and_signature_are_left_out() -> None:
    unsigned = build_pe([TEXT, DATA])
    signed = build_pe([TEXT, DATA], certificate=SIGNATURE)
    assert parse_pe(signed).certificate_table == (len(unsigned), len(SIGNATURE))
    digest = authenticode_digest(unsigned)
    assert authenticode_digest(signed) == digest
    assert authenticode_digest(patched(unsigned, CHECKSUM_AT, "<I", CHECKSUM ^ 0xFFFF)) == digest
    tampered_signature = signed[:-1] + bytes([signed[-1] ^ 1])
    assert authenticode_digest(tampered_signature) == digest


@pytest.mark.parametrize(
    "offset",
    [
        LFANEW + 8,  # TimeDateStamp: header bytes are covered
        CERT_ENTRY_PLUS + 8,  # the directory after the certificate entry
        0x200,  # first byte of .text
        0x400 - 1,  # last byte of .data's padding: SizeOfRawData is hashed, not VirtualSize
    ],
)
def test_a_changed_byte_changes_the_digest(offset: int) -> None:
    data = build_pe([Spec(".text", b"\xc3" * 0x100), Spec(".data", b"d" * 0x100)])
    changed = bytearray(data)
    changed[offset] ^= 0x01
    assert authenticode_digest(bytes(changed)) != authenticode_digest(data)


def test_trailing_data_is_hashed_but_not_the_signature() -> None:
    plain = build_pe([TEXT, DATA], trailing=b"debug!!!")
    other = build_pe([TEXT, DATA], trailing=b"DEBUG!!!")
    assert authenticode_digest(plain) != authenticode_digest(other)
    # 8 bytes of trailing data: the signature follows without padding, so the signed file
    # differs from the plain one only in directory 4 and the signature: it hashes the same.
    signed = build_pe([TEXT, DATA], trailing=b"debug!!!", certificate=SIGNATURE)
    assert signed[len(plain) :] == SIGNATURE
    assert authenticode_digest(signed) == authenticode_digest(plain)
    # Padding before an aligned signature is file content, and hashed.
    padded = build_pe([TEXT, DATA], trailing=b"debug", certificate=SIGNATURE)
    assert authenticode_digest(padded) == authenticode_digest(
        build_pe([TEXT, DATA], trailing=b"debug\0\0\0")
    )


def test_sections_without_raw_data_are_skipped() -> None:
    bss = Spec(".bss", b"", virtual_size=0x4000, raw_size=0)
    data = build_pe([TEXT, bss])
    sections = pe_sections(data)
    assert [(s.name, s.virtual_size, s.raw_size, s.data) for s in sections][1] == (
        ".bss",
        0x4000,
        0,
        b"",
    )
    image = parse_pe(data)
    assert authenticode_digest(data) == by_hand(
        data, CERT_ENTRY_PLUS, image.size_of_headers, [(image.size_of_headers, len(data))]
    )


def test_section_loaded_is_cut_or_zero_filled_at_virtual_size() -> None:
    short = pe_sections(build_pe([Spec(".text", b"abcdef", virtual_size=3)]))[0]
    assert short.raw_size == 0x200
    assert short.loaded() == b"abc"
    long = pe_sections(build_pe([Spec(".text", b"abc", virtual_size=0x300)]))[0]
    assert long.loaded() == b"abc" + bytes(0x300 - 3)


def test_unknown_algorithm() -> None:
    with pytest.raises(ValueError, match="md5"):
        authenticode_digest(build_pe([TEXT]), "md5")


def test_section_lookup_refuses_duplicates() -> None:
    image = parse_pe(build_pe([TEXT, Spec(".text", b"again")]))
    with pytest.raises(ImageFormatError, match=r"2 sections named '\.text'"):
        image.section(".text")
    assert image.section(".nothing") is None


GOOD = build_pe([TEXT, DATA])
TABLE = OPTIONAL + 112 + 8 * 16


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated: 0 bytes"),
        (GOOD[:63], "truncated: 63 bytes"),
        (b"MZ" + bytes(62), "e_lfanew 0x0 points into the 64-byte DOS header"),
        (b"ZM" + GOOD[2:], "no MZ DOS signature"),
        (patched(GOOD, 0x3C, "<I", 0xFFFFFFF0), "leaves no room for the PE signature"),
        (GOOD[: LFANEW + 10], "leaves no room"),
        (patched(GOOD, LFANEW, "<4s", b"NE\0\0"), "no PE signature at e_lfanew 0x40"),
        (patched(GOOD, LFANEW + 6, "<H", 0), "NumberOfSections is 0"),
        (patched(GOOD, LFANEW + 6, "<H", 0xFFFF), "NumberOfSections 65535 exceeds"),
        (patched(GOOD, LFANEW + 20, "<H", 0xFFFF), "optional header at 0x58 extends beyond"),
        (patched(GOOD, LFANEW + 20, "<H", 1), "SizeOfOptionalHeader 1 has no room"),
        (patched(GOOD, OPTIONAL, "<H", 0x20C), "magic 0x20c is neither"),
        (patched(GOOD, LFANEW + 20, "<H", 100), "smaller than the 112 bytes a PE32+"),
        (patched(GOOD, OPTIONAL + 108, "<I", 0xFFFFFFFF), "NumberOfRvaAndSizes 4294967295"),
        (patched(GOOD, LFANEW + 20, "<H", 120), "16 data directories do not fit"),
        (patched(GOOD, LFANEW + 6, "<H", 90), "section table of 90 entries"),
        (patched(GOOD, OPTIONAL + 60, "<I", 0x7FFFFFFF), "SizeOfHeaders 0x7fffffff is beyond"),
        (patched(GOOD, OPTIONAL + 60, "<I", 0x40), "ends before the section table"),
        (patched(GOOD, TABLE, "<8s", bytes(8)), "section 0 has an empty name"),
        (patched(GOOD, TABLE, "<8s", b".te\0xt\0\0"), "not printable ASCII"),
        (patched(GOOD, TABLE, "<8s", b".t\xe9xt\0\0\0"), "not printable ASCII"),
        (patched(GOOD, TABLE + 16, "<I", 0xFFFFFFFF), "extends beyond the end"),
        (patched(GOOD, TABLE + 20, "<I", 0xFFFFFFFF), "extends beyond the end"),
        (patched(GOOD, TABLE + 20, "<I", 0x10), "overlaps the headers"),
        (patched(GOOD, TABLE + 40 + 20, "<I", 0x210), "'.text' and '.data' overlap in the file"),
    ],
)
def test_hostile_images_are_refused_precisely(data: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError, match=message.replace("(", r"\(").replace(".", r"\.")):
        authenticode_digest(data)
    with pytest.raises(WireFormatError):  # the tree: a malformed image is malformed input
        pe_sections(data)


def test_certificate_table_must_be_last_and_after_the_sections() -> None:
    signed = build_pe([TEXT, DATA], certificate=SIGNATURE)
    cert_offset = parse_pe(signed).certificate_table
    assert cert_offset is not None
    with pytest.raises(ImageFormatError, match="not at the end of the"):
        authenticode_digest(signed + b"x")
    with pytest.raises(ImageFormatError, match="not at the end of the"):
        authenticode_digest(patched(signed, CERT_ENTRY_PLUS + 4, "<I", len(SIGNATURE) - 1))
    inside = patched(GOOD, CERT_ENTRY_PLUS, "<II", len(GOOD) - 0x10, 0x10)
    with pytest.raises(ImageFormatError, match="overlaps the headers or section data"):
        authenticode_digest(inside)
    # A directory entry with size 0 names no signature, whatever its offset says.
    assert authenticode_digest(patched(GOOD, CERT_ENTRY_PLUS, "<I", 0x1234)) != b""


def test_random_damage_raises_only_image_format_errors() -> None:
    """Truncations and byte flips either parse or raise ImageFormatError, nothing else."""
    rng = random.Random(20261122)
    base = build_pe([TEXT, DATA, Spec(".reloc", b"\0" * 12)], certificate=SIGNATURE)
    candidates = [base[:n] for n in range(0, len(base), 7)]
    for _ in range(400):
        damaged = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(0x40, 0x200)] = rng.randrange(256)
        candidates.append(bytes(damaged))
    refused = 0
    for data in candidates:
        try:
            authenticode_digest(data)
        except ImageFormatError:
            refused += 1
    assert 0 < refused < len(candidates)
