"""PE/COFF parsing and the Authenticode image hash, strict and pure.

The firmware measures every EFI application it loads as the *Authenticode* hash of the
image (TCG PC Client Platform Firmware Profile, EV_EFI_BOOT_SERVICES_APPLICATION). What is
hashed follows the PE/COFF specification's appendix "Calculating the PE Image Hash", as
tianocore EDK2 implements it (``SecurityPkg/Tcg/Tcg2Dxe/MeasureBootPeCoff.c``,
``MeasurePeImageAndExtend``), which is what OVMF extends into PCR 4:

1. the headers from offset 0 up to ``SizeOfHeaders``, leaving out the optional header's
   ``CheckSum`` field (4 bytes) and, when the optional header has one, the Certificate
   Table entry of the data directories (8 bytes, index 4);
2. the raw data (``SizeOfRawData`` bytes at ``PointerToRawData``) of every section with
   raw data, in ascending ``PointerToRawData`` order;
3. the bytes from offset ``SizeOfHeaders + sum(SizeOfRawData)`` to the end of the file
   minus the size the Certificate Table entry gives (the attribute certificates, i.e. the
   signature, which must therefore be the last thing in the file).

Both PE32 (optional header magic 0x10b) and PE32+ (0x20b) are read. Parsing is strict and
bounds-checked: anything a loader could read two ways (sections overlapping each other or
the headers, a certificate table that is not at the end, a section table outside the
headers) is refused with an :class:`~embassy.errors.ImageFormatError` that says what and
where, never an ``IndexError`` or ``struct.error``.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass

from embassy.errors import ImageFormatError

DOS_HEADER_SIZE = 0x40
_E_LFANEW = 0x3C
_PE_SIGNATURE = b"PE\0\0"
_COFF = struct.Struct("<HHIIIHH")  # Machine .. Characteristics, right after "PE\0\0"
_SECTION = struct.Struct("<8sIIIIIIHHI")
SECTION_HEADER_SIZE = _SECTION.size  # 40

PE32_MAGIC = 0x10B
PE32PLUS_MAGIC = 0x20B
# Offsets inside the optional header (PE/COFF spec, "Optional Header Windows-Specific
# Fields"): CheckSum is at 64 in both formats; the data directories start after
# NumberOfRvaAndSizes, at 96 (PE32) or 112 (PE32+) since ImageBase and the four stack/heap
# fields are 8 bytes wide in PE32+.
_CHECKSUM_OFFSET = 64
_DATA_DIRECTORIES_OFFSET = {PE32_MAGIC: 96, PE32PLUS_MAGIC: 112}
_CERTIFICATE_TABLE_INDEX = 4
# EDK2's PE loader refuses more directory entries than the 16 the specification defines.
_MAX_DATA_DIRECTORIES = 16
# "The Windows loader limits the number of sections to 96" (PE/COFF spec, COFF File Header).
MAX_SECTIONS = 96

IMAGE_SUBSYSTEM_EFI_APPLICATION = 10
_HASHES = {"sha1", "sha256", "sha384", "sha512"}


@dataclass(frozen=True, slots=True)
class Section:
    """One section header and the raw bytes it points at in the file."""

    name: str
    data: bytes  # SizeOfRawData bytes at PointerToRawData (empty if there are none)
    virtual_size: int
    raw_size: int
    virtual_address: int
    raw_offset: int
    characteristics: int
    index: int  # position in the section table

    @property
    def memory_size(self) -> int:
        """How many bytes a loader maps at ``virtual_address``.

        EDK2's ``PeCoffLoaderLoadImage`` copies ``min(VirtualSize, SizeOfRawData)`` bytes
        (all of the raw data when VirtualSize is 0) and zero-fills up to VirtualSize."""
        return self.virtual_size or self.raw_size

    def loaded(self) -> bytes:
        """The section's first ``VirtualSize`` bytes as they are in memory once loaded:
        its raw data, cut at VirtualSize or zero-filled up to it."""
        size = self.virtual_size
        return self.data[:size] + bytes(max(0, size - self.raw_size))


@dataclass(frozen=True, slots=True)
class PeImage:
    """The fields of a parsed PE image the hash and the boot model need."""

    machine: int
    magic: int
    subsystem: int
    major_image_version: int
    size_of_image: int
    size_of_headers: int
    checksum_offset: int  # file offset of the optional header's CheckSum field
    certificate_entry_offset: int | None  # file offset of data directory 4, if present
    certificate_table: tuple[int, int] | None  # (file offset, size) of the signature
    sections: tuple[Section, ...]
    size: int  # the file's length

    def section(self, name: str) -> Section | None:
        """The only section called ``name``; None if there is none; refuses duplicates."""
        found = [s for s in self.sections if s.name == name]
        if len(found) > 1:
            raise ImageFormatError(
                f"PE image: {len(found)} sections named {name!r} "
                f"(table entries {', '.join(str(s.index) for s in found)})"
            )
        return found[0] if found else None


def _u16(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<H", data, offset)[0]
    return value


def _u32(data: bytes, offset: int) -> int:
    value: int = struct.unpack_from("<I", data, offset)[0]
    return value


def _section_name(raw: bytes, index: int) -> str:
    name = raw.rstrip(b"\0")
    if not name:
        raise ImageFormatError(f"PE image: section {index} has an empty name")
    if any(b <= 0x20 or b >= 0x7F for b in name):
        raise ImageFormatError(
            f"PE image: section {index} name {raw!r} is not printable ASCII padded with NULs"
        )
    return name.decode("ascii")


def parse_pe(data: bytes) -> PeImage:
    """Parse and check the headers and section table of a PE32 or PE32+ image."""
    size = len(data)
    optional_offset, machine, n_sections, optional_size = _coff_header(data)
    magic, n_directories = _optional_header(data, optional_offset, optional_size)
    size_of_image = _u32(data, optional_offset + 56)
    size_of_headers = _u32(data, optional_offset + 60)

    table_offset = optional_offset + optional_size
    table_end = table_offset + n_sections * SECTION_HEADER_SIZE
    if table_end > size:
        raise ImageFormatError(
            f"PE image: the section table of {n_sections} entries at 0x{table_offset:x} "
            f"extends beyond the end of the {size}-byte file"
        )
    if size_of_headers > size:
        raise ImageFormatError(
            f"PE image: SizeOfHeaders 0x{size_of_headers:x} is beyond the end of the "
            f"{size}-byte file"
        )
    if size_of_headers < table_end:
        # The hash covers the headers up to SizeOfHeaders: a section table past it would
        # not be covered, so the hash would not pin where the sections are.
        raise ImageFormatError(
            f"PE image: SizeOfHeaders 0x{size_of_headers:x} ends before the section table "
            f"(which ends at 0x{table_end:x})"
        )
    sections = tuple(
        _read_section(data, table_offset, i, size_of_headers) for i in range(n_sections)
    )
    _check_no_file_overlap(sections)

    certificate_entry_offset: int | None = None
    certificate_table: tuple[int, int] | None = None
    if n_directories > _CERTIFICATE_TABLE_INDEX:
        certificate_entry_offset = (
            optional_offset + _DATA_DIRECTORIES_OFFSET[magic] + 8 * _CERTIFICATE_TABLE_INDEX
        )
        cert_offset = _u32(data, certificate_entry_offset)
        cert_size = _u32(data, certificate_entry_offset + 4)
        if cert_size:
            certificate_table = _check_certificate_table(
                cert_offset, cert_size, size, size_of_headers, sections
            )
    return PeImage(
        machine=machine,
        magic=magic,
        subsystem=_u16(data, optional_offset + 68),
        major_image_version=_u16(data, optional_offset + 44),
        size_of_image=size_of_image,
        size_of_headers=size_of_headers,
        checksum_offset=optional_offset + _CHECKSUM_OFFSET,
        certificate_entry_offset=certificate_entry_offset,
        certificate_table=certificate_table,
        sections=sections,
        size=size,
    )


def _coff_header(data: bytes) -> tuple[int, int, int, int]:
    """(optional header offset, Machine, NumberOfSections, SizeOfOptionalHeader)."""
    size = len(data)
    if size < DOS_HEADER_SIZE:
        raise ImageFormatError(
            f"PE image: truncated: {size} bytes, shorter than the {DOS_HEADER_SIZE}-byte DOS header"
        )
    if data[:2] != b"MZ":
        raise ImageFormatError(f"PE image: no MZ DOS signature (starts with {data[:2]!r})")
    pe_offset = _u32(data, _E_LFANEW)
    coff_offset = pe_offset + len(_PE_SIGNATURE)
    optional_offset = coff_offset + _COFF.size
    if pe_offset < DOS_HEADER_SIZE:
        raise ImageFormatError(
            f"PE image: e_lfanew 0x{pe_offset:x} points into the {DOS_HEADER_SIZE}-byte DOS header"
        )
    if optional_offset > size:
        raise ImageFormatError(
            f"PE image: e_lfanew 0x{pe_offset:x} leaves no room for the PE signature and "
            f"COFF header in a {size}-byte file"
        )
    if data[pe_offset:coff_offset] != _PE_SIGNATURE:
        raise ImageFormatError(
            f"PE image: no PE signature at e_lfanew 0x{pe_offset:x} "
            f"(found {data[pe_offset:coff_offset]!r})"
        )
    machine, n_sections, _, _, _, optional_size, _ = _COFF.unpack_from(data, coff_offset)
    if n_sections == 0:
        raise ImageFormatError("PE image: NumberOfSections is 0")
    if n_sections > MAX_SECTIONS:
        raise ImageFormatError(
            f"PE image: NumberOfSections {n_sections} exceeds the PE limit of {MAX_SECTIONS}"
        )
    if optional_offset + optional_size > size:
        raise ImageFormatError(
            f"PE image: the {optional_size}-byte optional header at 0x{optional_offset:x} "
            f"extends beyond the end of the {size}-byte file"
        )
    return optional_offset, machine, n_sections, optional_size


def _optional_header(data: bytes, offset: int, size: int) -> tuple[int, int]:
    """(magic, NumberOfRvaAndSizes) of the optional header at ``offset``, ``size`` bytes."""
    if size < 2:
        raise ImageFormatError(f"PE image: SizeOfOptionalHeader {size} has no room for a magic")
    magic = _u16(data, offset)
    if magic not in _DATA_DIRECTORIES_OFFSET:
        raise ImageFormatError(
            f"PE image: optional header magic 0x{magic:x} is neither PE32 (0x10b) nor PE32+ (0x20b)"
        )
    directories = _DATA_DIRECTORIES_OFFSET[magic]
    if size < directories:
        kind = "PE32+" if magic == PE32PLUS_MAGIC else "PE32"
        raise ImageFormatError(
            f"PE image: SizeOfOptionalHeader {size} is smaller than the {directories} bytes "
            f"a {kind} optional header needs"
        )
    n_directories = _u32(data, offset + directories - 4)
    if n_directories > _MAX_DATA_DIRECTORIES:
        raise ImageFormatError(
            f"PE image: NumberOfRvaAndSizes {n_directories} exceeds {_MAX_DATA_DIRECTORIES}"
        )
    if directories + 8 * n_directories > size:
        raise ImageFormatError(
            f"PE image: {n_directories} data directories do not fit in the "
            f"{size}-byte optional header"
        )
    return magic, n_directories


def _read_section(data: bytes, table_offset: int, index: int, size_of_headers: int) -> Section:
    raw_name, v_size, v_addr, r_size, r_offset, _, _, _, _, flags = _SECTION.unpack_from(
        data, table_offset + index * SECTION_HEADER_SIZE
    )
    name = _section_name(raw_name, index)
    if r_size:
        if r_offset < size_of_headers:
            raise ImageFormatError(
                f"PE image: section {name!r} raw data at 0x{r_offset:x} overlaps the headers "
                f"(SizeOfHeaders 0x{size_of_headers:x})"
            )
        if r_offset + r_size > len(data):
            raise ImageFormatError(
                f"PE image: section {name!r} raw data [0x{r_offset:x}, 0x{r_offset + r_size:x}) "
                f"extends beyond the end of the {len(data)}-byte file"
            )
    return Section(
        name=name,
        data=data[r_offset : r_offset + r_size] if r_size else b"",
        virtual_size=v_size,
        raw_size=r_size,
        virtual_address=v_addr,
        raw_offset=r_offset,
        characteristics=flags,
        index=index,
    )


def _check_no_file_overlap(sections: tuple[Section, ...]) -> None:
    with_data = sorted((s for s in sections if s.raw_size), key=lambda s: s.raw_offset)
    for before, after in itertools.pairwise(with_data):
        if after.raw_offset < before.raw_offset + before.raw_size:
            raise ImageFormatError(
                f"PE image: sections {before.name!r} and {after.name!r} overlap in the file "
                f"(0x{before.raw_offset:x}+0x{before.raw_size:x} and 0x{after.raw_offset:x})"
            )


def _check_certificate_table(
    offset: int, size: int, file_size: int, size_of_headers: int, sections: tuple[Section, ...]
) -> tuple[int, int]:
    # EDK2 leaves the last `size` bytes of the file out of the hash whatever the entry's
    # offset says; that is only the signature when the signature is where the offset says
    # and at the very end, after everything else.
    if offset + size != file_size:
        raise ImageFormatError(
            f"PE image: the attribute certificate table [0x{offset:x}, 0x{offset + size:x}) "
            f"is not at the end of the {file_size}-byte file"
        )
    data_end = max([size_of_headers, *(s.raw_offset + s.raw_size for s in sections if s.raw_size)])
    if offset < data_end:
        raise ImageFormatError(
            f"PE image: the attribute certificate table at 0x{offset:x} overlaps the headers "
            f"or section data (which end at 0x{data_end:x})"
        )
    return offset, size


def pe_sections(data: bytes) -> tuple[Section, ...]:
    """The sections of a PE image, in section-table order."""
    return parse_pe(data).sections


def authenticode_digest(data: bytes, algorithm: str = "sha256") -> bytes:
    """The Authenticode image hash of a PE image, as the firmware measures it."""
    if algorithm not in _HASHES:
        raise ValueError(f"unsupported Authenticode hash algorithm {algorithm!r}")
    image = parse_pe(data)
    view = memoryview(data)
    h = hashlib.new(algorithm)
    h.update(view[: image.checksum_offset])
    if image.certificate_entry_offset is None:
        h.update(view[image.checksum_offset + 4 : image.size_of_headers])
    else:
        h.update(view[image.checksum_offset + 4 : image.certificate_entry_offset])
        h.update(view[image.certificate_entry_offset + 8 : image.size_of_headers])
    hashed = image.size_of_headers
    # sorted() is stable: sections at the same offset keep table order, as EDK2's insertion
    # sort does (only empty sections can share an offset after the overlap check).
    for section in sorted(image.sections, key=lambda s: s.raw_offset):
        if section.raw_size:
            h.update(section.data)
            hashed += section.raw_size
    signature = image.certificate_table[1] if image.certificate_table else 0
    if image.size > hashed + signature:
        h.update(view[hashed : image.size - signature])
    return h.digest()
