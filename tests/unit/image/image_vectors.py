"""The PE images and UKIs pinned under tests/vectors/image/ (``scripts/gen_vectors.py``).

``pe_vectors()`` are plain PE images (their Authenticode digest and sections are pinned, or
the error a hostile one raises); ``uki_vectors()`` are UKIs (their predicted PCRs and events,
or the error). Names say what each one exercises. Kept small: every file is a few KiB.
"""

from __future__ import annotations

import struct
from functools import partial
from typing import Any

from tests.unit.image import builder
from tests.unit.image.builder import MACHINE_I386, Spec

# Small files: a FileAlignment of 0x20 instead of 0x200 (see builder.build_pe).
SMALL: dict[str, Any] = {"file_alignment": 0x20}
build_pe = partial(builder.build_pe, **SMALL)
build_uki = partial(builder.build_uki, **SMALL)
fake_kernel = partial(builder.fake_kernel, **SMALL)

SIGNATURE = struct.pack("<IHH", 8 + 24, 0x0200, 0x0002) + b"not a real PKCS#7 blob!!"


def _patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def pe_vectors() -> dict[str, bytes]:
    text = Spec(".text", b"\x55\x48\x89\xe5" * 12)
    data = Spec(".data", b"embassy " * 9)
    plus = build_pe([text, data])
    out = {
        "pe32plus": plus,
        "pe32": build_pe([text, data], pe32=True),
        "pe32plus-bss": build_pe([text, Spec(".bss", b"", virtual_size=0x3000, raw_size=0)]),
        "pe32plus-trailing-data": build_pe([text, data], trailing=b"debug data after sections"),
        "pe32plus-signed": build_pe([text, data], certificate=SIGNATURE),
        "pe32plus-four-directories": build_pe([text, data], n_directories=4),
    }
    lfanew = 0x40
    optional = lfanew + 24
    table = optional + 112 + 8 * 16
    text_offset = builder.align(table + 2 * 40, SMALL["file_alignment"])  # SizeOfHeaders
    out |= {
        "bad-truncated-dos-header": plus[:40],
        "bad-no-mz": b"ZM" + plus[2:],
        "bad-lfanew-beyond-file": _patch(plus, 0x3C, "<I", len(plus) + 8),
        "bad-pe-signature": _patch(plus, lfanew, "<4s", b"PX\0\0"),
        "bad-zero-sections": _patch(plus, lfanew + 6, "<H", 0),
        "bad-too-many-sections": _patch(plus, lfanew + 6, "<H", 97),
        "bad-optional-magic": _patch(plus, optional, "<H", 0x107),
        "bad-too-many-directories": _patch(plus, optional + 108, "<I", 17),
        "bad-section-beyond-eof": _patch(plus, table + 40 + 16, "<I", 0x10000),
        "bad-sections-overlap": _patch(plus, table + 40 + 20, "<I", text_offset + 0x10),
        "bad-section-in-headers": _patch(plus, table + 20, "<I", 0x100),
        "bad-headers-beyond-eof": _patch(plus, optional + 60, "<I", len(plus) + 1),
        "bad-headers-before-table": _patch(plus, optional + 60, "<I", 0x100),
        "bad-signature-not-at-end": build_pe([text, data], certificate=SIGNATURE)
        + b"appended after the signature",
    }
    return out


def uki_vectors() -> dict[str, bytes]:
    kernel = fake_kernel(b"\x90" * 64)
    common = [
        Spec(".osrel", b"ID=embassy\nIMAGE_VERSION=1\n"),
        Spec(".cmdline", b"console=ttyS0 roothash=" + b"5a" * 32),
        Spec(".uname", b"6.12.0-embassy"),
        Spec(".linux", kernel),
        Spec(".initrd", b"070701" + bytes(100)),
        Spec(".pcrsig", b'{"sha256":[]}'),
    ]
    minimal = [Spec(".linux", kernel)]
    zero_filled = Spec(".linux", kernel, virtual_size=len(kernel) + 0x200, raw_size=len(kernel))
    return {
        # the same payload under stubs that measure different section sets
        "uki-252": build_uki("252.39-1~deb12u2", common),
        "uki-254": build_uki("254.5", common),
        "uki-256-ucode": build_uki("256.7", [*common, Spec(".ucode", b"GenuineIntel ucode")]),
        "uki-258": build_uki("258~rc3", common),
        # .linux declared 512 bytes bigger than its raw data: the loader zero-fills
        "uki-257-zero-filled": build_uki("257.6", [zero_filled]),
        "bad-uki-no-sdmagic": build_uki(None, minimal),
        "bad-uki-stub-261": build_uki("261", minimal),
        "bad-uki-multi-profile": build_uki("257.6", [*minimal, Spec(".profile", b"ID=a\n")]),
        "bad-uki-dtbauto": build_uki("257.6", [*minimal, Spec(".dtbauto", b"\xd0\x0d\xfe\xed")]),
        "bad-uki-duplicate-linux": build_uki("255.4", [*minimal, Spec(".linux", kernel)]),
        "bad-uki-prefix-name": build_uki("253.1", [*minimal, Spec(".initrd2", b"more initrd")]),
        "bad-uki-no-linux": build_uki("255.4", [Spec(".osrel", b"ID=x\n")]),
        "bad-uki-memory-overlap": build_uki(
            "255.4", [*minimal, Spec(".initrd", b"x" * 64, virtual_address=0x1000)]
        ),
        "bad-uki-kernel-i386": build_uki(
            "255.4", [Spec(".linux", fake_kernel(machine=MACHINE_I386))]
        ),
        "bad-uki-kernel-handover-only": build_uki(
            "252.39", [Spec(".linux", fake_kernel(major_image_version=0))]
        ),
    }
