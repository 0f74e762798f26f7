"""The boot model: which events a stub version extends, in which order, over which bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import pytest

from embassy.errors import ImageFormatError
from embassy.image import DEFAULT_PHASES, predict_boot_pcrs, stub_version
from embassy.image.pe import authenticode_digest, pe_sections
from embassy.image.uki import (
    CALLING_EFI_APPLICATION,
    MAX_STUB_VERSION,
    MIN_STUB_VERSION,
    ZERO_PCR,
    extend,
    replay,
    stub_sections,
)
from tests.unit.image.builder import (
    MACHINE_I386,
    Spec,
    build_pe,
    build_uki,
    fake_kernel,
    sdmagic,
    standard_sections,
)

KERNEL = fake_kernel(b"\x90" * 300)


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chain(digests: Sequence[bytes]) -> bytes:
    value = ZERO_PCR
    for digest in digests:
        value = extend(value, digest)
    return value


def sections_pcr(pairs: Sequence[tuple[str, bytes]], phases: Sequence[str] = ()) -> bytes:
    """PCR 11 spelled out: name with NUL, then contents, per section; then the phases."""
    digests = []
    for name, content in pairs:
        digests += [sha(name.encode() + b"\0"), sha(content)]
    return chain(digests + [sha(p.encode()) for p in phases])


def contents(uki: bytes, name: str) -> bytes:
    return next(s.data[: s.virtual_size] for s in pe_sections(uki) if s.name == name)


@pytest.mark.parametrize(
    ("marker", "version"),
    [
        ("252.39-1~deb12u2", 252),
        ("257.6", 257),
        ("258~rc3", 258),
        ("v256.1", 256),
        ("255", 255),
    ],
)
def test_stub_version(marker: str, version: int) -> None:
    assert stub_version(build_uki(marker, [Spec(".linux", KERNEL)])) == version


def test_stub_version_absent_or_unreadable() -> None:
    assert stub_version(build_uki(None, [])) is None
    garbled = build_pe([Spec(".text", b"\xc3"), Spec(".sdmagic", b"#### LoaderInfo: grub ####")])
    assert stub_version(garbled) is None
    no_number = build_pe([Spec(".sdmagic", b"#### LoaderInfo: systemd-stub devel ####\0")])
    assert stub_version(no_number) is None


def test_known_answer_pcr11_in_canonical_order_not_pe_order() -> None:
    # PE order: .initrd, .cmdline, .linux, .osrel; the stub measures .linux first.
    pe_order = [
        Spec(".initrd", b"initrd bytes"),
        Spec(".cmdline", b"root=/dev/vda"),
        Spec(".linux", KERNEL),
        Spec(".osrel", b"ID=test\n"),
    ]
    uki = build_uki("252.5", pe_order, sbat=None)
    expected = sections_pcr(
        [
            (".linux", KERNEL),
            (".osrel", b"ID=test\n"),
            (".cmdline", b"root=/dev/vda"),
            (".initrd", b"initrd bytes"),
        ],
        DEFAULT_PHASES,
    )
    prediction = predict_boot_pcrs(uki)
    assert prediction.pcrs[11] == expected
    assert prediction.pcrs[12] == ZERO_PCR
    assert prediction.stub_version == 252
    assert prediction.phases == DEFAULT_PHASES
    reordered = build_uki("252.5", list(reversed(pe_order)), sbat=None)
    assert predict_boot_pcrs(reordered).pcrs[11] == expected
    assert predict_boot_pcrs(reordered).pcrs[4] != prediction.pcrs[4]  # a different file


def test_known_answer_pcr4() -> None:
    uki = build_uki("255.4", [Spec(".linux", KERNEL)])
    expected = chain(
        [
            sha(CALLING_EFI_APPLICATION.encode()),
            sha(bytes(4)),  # EV_SEPARATOR
            authenticode_digest(uki),
            authenticode_digest(KERNEL),
        ]
    )
    prediction = predict_boot_pcrs(uki)
    assert prediction.pcrs[4] == expected
    assert [e.event_type for e in prediction.events if e.pcr == 4] == [
        "EV_EFI_ACTION",
        "EV_SEPARATOR",
        "EV_EFI_BOOT_SERVICES_APPLICATION",
        "EV_EFI_BOOT_SERVICES_APPLICATION",
    ]


def test_events_replay_to_the_pcrs_in_boot_order() -> None:
    prediction = predict_boot_pcrs(build_uki("254.1", standard_sections()))
    assert replay(prediction.events) == dict(prediction.pcrs)
    kinds = [(e.pcr, e.event_type) for e in prediction.events]
    # firmware before the stub, the stub's sections before it starts the kernel, the
    # kernel before userspace's phases
    assert kinds[:3] == [
        (4, "EV_EFI_ACTION"),
        (4, "EV_SEPARATOR"),
        (4, "EV_EFI_BOOT_SERVICES_APPLICATION"),
    ]
    kernel_at = kinds.index((4, "EV_EFI_BOOT_SERVICES_APPLICATION"), 3)
    assert all(k == (11, "EV_IPL") for k in kinds[3:kernel_at])
    assert kinds[kernel_at + 1 :] == [(11, "userspace")] * 4
    assert all(e.description for e in prediction.events)
    with pytest.raises(ValueError, match="PCR 4"):
        replay(prediction.events, pcrs=(11,))


@pytest.mark.parametrize(
    ("marker", "measured"),
    [
        ("252.1", [".linux", ".osrel", ".cmdline", ".initrd", ".pcrpkey"]),
        ("253.9", [".linux", ".osrel", ".cmdline", ".initrd", ".pcrpkey"]),
        ("254.1", [".linux", ".osrel", ".cmdline", ".initrd", ".uname", ".sbat", ".pcrpkey"]),
        (
            "256.2",
            [".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".uname", ".sbat", ".pcrpkey"],
        ),
        (
            "260.1",
            [".linux", ".osrel", ".cmdline", ".initrd", ".ucode", ".uname", ".sbat", ".pcrpkey"],
        ),
    ],
)
def test_which_sections_each_stub_version_measures(marker: str, measured: list[str]) -> None:
    uki = build_uki(marker, [*standard_sections(KERNEL), Spec(".ucode", b"microcode")])
    expected = sections_pcr([(name, contents(uki, name)) for name in measured])
    assert predict_boot_pcrs(uki, phases=()).pcrs[11] == expected


def test_pcrsig_is_never_measured_but_is_in_the_file() -> None:
    one = build_uki("257.1", [*standard_sections(KERNEL)])
    sections = [
        s if s.name != ".pcrsig" else Spec(".pcrsig", b'{"other":1}')
        for s in standard_sections(KERNEL)
    ]
    two = build_uki("257.1", sections)
    assert predict_boot_pcrs(one).pcrs[11] == predict_boot_pcrs(two).pcrs[11]
    assert predict_boot_pcrs(one).pcrs[4] != predict_boot_pcrs(two).pcrs[4]


def test_section_contents_are_virtual_size_bytes_as_loaded() -> None:
    # VirtualSize shorter than the raw data: bytes past it are not measured.
    cut = build_uki(
        "255.1", [Spec(".linux", KERNEL), Spec(".osrel", b"ID=a\nJUNK", virtual_size=5)]
    )
    also_cut = build_uki(
        "255.1", [Spec(".linux", KERNEL), Spec(".osrel", b"ID=a\nJUNKJUNK", virtual_size=5)]
    )
    assert predict_boot_pcrs(cut).pcrs[11] == predict_boot_pcrs(also_cut).pcrs[11]
    assert predict_boot_pcrs(cut).pcrs[11] == sections_pcr(
        [(".linux", KERNEL), (".osrel", b"ID=a\n"), (".sbat", contents(cut, ".sbat"))],
        DEFAULT_PHASES,
    )
    # VirtualSize beyond the raw data: the loader zero-fills, the stub measures the zeros.
    filled = build_uki(
        "255.1",
        [Spec(".linux", KERNEL), Spec(".osrel", b"ID=b\n", virtual_size=0x300, raw_size=0x200)],
    )
    assert predict_boot_pcrs(filled, phases=()).pcrs[11] == sections_pcr(
        [
            (".linux", KERNEL),
            (".osrel", b"ID=b\n" + bytes(0x300 - 5)),
            (".sbat", contents(filled, ".sbat")),
        ]
    )


def test_an_empty_section_is_skipped() -> None:
    uki = build_uki("252.1", [Spec(".linux", KERNEL), Spec(".cmdline", b"", raw_size=0)], sbat=None)
    assert predict_boot_pcrs(uki, phases=()).pcrs[11] == sections_pcr([(".linux", KERNEL)])


@pytest.mark.parametrize("version", range(MIN_STUB_VERSION, MAX_STUB_VERSION + 1))
def test_kernel_event_by_version_and_secure_boot(version: int) -> None:
    uki = build_uki(f"{version}.1", [Spec(".linux", KERNEL)])
    kernel_events = [
        e for e in predict_boot_pcrs(uki).events if e.digest == authenticode_digest(KERNEL)
    ]
    assert len(kernel_events) == (1 if version <= 257 else 0)
    if kernel_events:
        assert kernel_events[0].pcr == 4
        assert "LoadImage" in kernel_events[0].description
    secure = predict_boot_pcrs(uki, secure_boot=True)
    assert secure.secure_boot
    assert authenticode_digest(KERNEL) not in [e.digest for e in secure.events]


def test_the_kernel_is_hashed_as_the_stub_hands_it_over() -> None:
    # .linux with VirtualSize past its raw data: LoadImage gets the zero-filled buffer.
    uki = build_uki(
        "256.1", [Spec(".linux", KERNEL, virtual_size=len(KERNEL) + 64, raw_size=len(KERNEL))]
    )
    digests = [e.digest for e in predict_boot_pcrs(uki).events if e.pcr == 4]
    assert digests[-1] == authenticode_digest(KERNEL + bytes(64))
    assert digests[-1] != authenticode_digest(KERNEL)


def test_prior_boot_attempts_add_returning_and_calling_again() -> None:
    uki = build_uki("258.1", [Spec(".linux", KERNEL)])
    first = predict_boot_pcrs(uki)
    third = predict_boot_pcrs(uki, prior_boot_attempts=2)
    actions = [e.description for e in third.events if e.event_type == "EV_EFI_ACTION"]
    assert len(actions) == 5
    assert [("Returning" in a, "Calling" in a) for a in actions] == [
        (False, True),
        (True, False),
        (False, True),
        (True, False),
        (False, True),
    ]
    assert third.pcrs[4] != first.pcrs[4]
    assert third.pcrs[11] == first.pcrs[11]
    with pytest.raises(ValueError, match="negative"):
        predict_boot_pcrs(uki, prior_boot_attempts=-1)


def test_phases() -> None:
    uki = build_uki("257.1", [Spec(".linux", KERNEL)])
    none = predict_boot_pcrs(uki, phases=())
    some = predict_boot_pcrs(uki, phases=["enter-initrd"])
    assert some.pcrs[11] == extend(none.pcrs[11], sha(b"enter-initrd"))
    assert predict_boot_pcrs(uki).pcrs[11] == chain(
        [e.digest for e in none.events if e.pcr == 11] + [sha(p.encode()) for p in DEFAULT_PHASES]
    )
    for bad in (["enter initrd"], ["a:b"], [""], ["é"]):
        with pytest.raises(ImageFormatError, match="is not a boot phase word"):
            predict_boot_pcrs(uki, phases=bad)
    with pytest.raises(ImageFormatError, match="one string"):
        predict_boot_pcrs(uki, phases="ready")


def test_stub_sections_table() -> None:
    assert stub_sections(252) == (
        ".linux",
        ".osrel",
        ".cmdline",
        ".initrd",
        ".splash",
        ".dtb",
        ".pcrsig",
        ".pcrpkey",
    )
    assert stub_sections(258)[-4:] == (".profile", ".dtbauto", ".hwids", ".efifw")
    with pytest.raises(ImageFormatError, match="251"):
        stub_sections(251)


LINUX = Spec(".linux", KERNEL)


@pytest.mark.parametrize(
    ("uki", "message"),
    [
        (build_uki(None, [LINUX]), "no systemd-stub .sdmagic marker"),
        (build_uki("251.4", [LINUX]), "systemd-stub 251 is outside"),
        (build_uki("261", [LINUX]), "systemd-stub 261 is outside"),
        (build_uki("257.1", [LINUX, Spec(".profile", b"ID=x")]), "multi-profile"),
        (build_uki("252.1", [LINUX, Spec(".profile", b"ID=x")]), "multi-profile"),
        (build_uki("257.1", [LINUX, Spec(".dtbauto", b"dtb")]), ".dtbauto section"),
        (build_uki("252.1", [LINUX, Spec(".dtbauto", b"dtb")]), ".dtbauto section"),
        (build_uki("258.1", [LINUX, Spec(".efifw", b"fw")]), ".efifw section"),
        (build_uki("255.1", [LINUX, LINUX]), "2 sections named '.linux'"),
        (build_uki("255.1", [LINUX, Spec(".linuxx", b"x")]), "'.linuxx' starts with '.linux'"),
        (build_uki("253.1", [LINUX, Spec(".dtb2", b"x")]), "'.dtb2' starts with '.dtb'"),
        (build_uki("255.1", [LINUX, sdmagic("255.1")]), "2 sections named '.sdmagic'"),
        (build_uki("255.1", [Spec(".osrel", b"ID=x")]), "no (non-empty) .linux section"),
        (build_uki("255.1", [Spec(".linux", b"", raw_size=0)]), "no (non-empty) .linux section"),
        (build_uki("255.1", [Spec(".linux", b"not a PE")]), ".linux is not a PE kernel"),
        (
            build_uki("255.1", [Spec(".linux", fake_kernel(machine=MACHINE_I386))]),
            ".linux is for machine 0x14c",
        ),
        (
            build_uki("258.1", [Spec(".linux", fake_kernel(major_image_version=0))]),
            "EFI handover protocol",
        ),
        (
            build_uki("255.1", [Spec(".linux", fake_kernel(subsystem=11))]),
            "PE subsystem 11",
        ),
        (
            build_uki("255.1", [LINUX, Spec(".initrd", b"x", virtual_address=0x1000)]),
            "and '.text' overlap in memory",
        ),
        (
            build_uki("255.1", [LINUX, Spec(".initrd", b"x", virtual_address=0x100)]),
            "overlaps the headers in memory",
        ),
        (build_uki("255.1", [LINUX], size_of_image=0x2000), "extends beyond SizeOfImage"),
        (b"MZ", "truncated"),
    ],
)
def test_refused(uki: bytes, message: str) -> None:
    with pytest.raises(ImageFormatError) as caught:
        predict_boot_pcrs(uki)
    assert message in caught.value.message
    assert caught.value.code == "image-malformed"


def test_an_unknown_section_is_neither_measured_nor_refused() -> None:
    plain = build_uki("255.1", [LINUX])
    extra = build_uki("255.1", [LINUX, Spec(".extra", b"not for the stub")])
    assert predict_boot_pcrs(plain).pcrs[11] == predict_boot_pcrs(extra).pcrs[11]
    # .ucode is unknown to 255: not measured (256 measures it)
    ucode = build_uki("255.1", [LINUX, Spec(".ucode", b"microcode")])
    assert predict_boot_pcrs(ucode).pcrs[11] == predict_boot_pcrs(plain).pcrs[11]
