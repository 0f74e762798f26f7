"""Predict PCRs 4, 11 and 12 of a measured UEFI boot of a systemd unified kernel image (UKI).

The boot modelled: UEFI firmware (tianocore EDK2, i.e. OVMF, with a TPM 2.0) boots the UKI
itself as its boot application (the removable-media path ``\\EFI\\BOOT\\BOOTX64.EFI``, or
a boot entry without optional data), no shim and no boot loader in between; the stub finds
no command-line override, credentials, system extensions, add-ons or SMBIOS command-line
extras; systemd in the booted system then measures its boot phases. Only the SHA-256 bank.

PCR 4 (firmware, EDK2 ``SecurityPkg/Tcg/Tcg2Dxe/Tcg2Dxe.c`` ``OnReadyToBoot`` and
``SecurityPkg/Library/DxeTpm2MeasureBootLib``):

* EV_EFI_ACTION "Calling EFI Application from Boot Option" (digest of the string, no NUL),
  measured when the boot manager signals ReadyToBoot for its first boot attempt;
* EV_SEPARATOR, the digest of four zero bytes, right after it (PCRs 0-7 get one each);
* a later attempt (after earlier boot options failed) adds "Returning from EFI Application
  from Boot Option" and "Calling EFI Application from Boot Option" again: see
  ``prior_boot_attempts``;
* EV_EFI_BOOT_SERVICES_APPLICATION: the Authenticode hash of the UKI file;
* EV_EFI_BOOT_SERVICES_APPLICATION: the Authenticode hash of the ``.linux`` section, when
  systemd-stub hands the kernel to the firmware's LoadImage() and nothing bypasses the
  firmware's security handlers: stub versions 252 to 257 (``src/boot/efi/linux.c``,
  ``linux_exec``/``load_image``, since "stub: Use LoadImage/StartImage", systemd PR 24777)
  with Secure Boot off. With Secure Boot on, those versions replace the firmware's
  security-protocol hooks for the kernel buffer (``install_security_override``, which does
  nothing when Secure Boot is off), and the hook that would measure is not called. From
  258 on the stub copies the kernel into memory itself ("stub: call inner kernel
  directly", PR 37372) unless Secure Boot and shim are both present: no firmware event.

PCR 11 (systemd-stub ``measure_sections``, then ``systemd-pcrphase``): for each section the
stub knows, in the canonical order of systemd's ``unified_sections`` list (not PE order),
skipping ``.pcrsig``: one event over the section name including its trailing NUL, one over
the section's contents as loaded in memory, ``VirtualSize`` bytes (systemd's
``PeSectionVector.memory_size``; the loader zero-fills past ``SizeOfRawData``). Then one
event per boot phase word, the SHA-256 of the word without a NUL
(docs/TPM2_PCR_MEASUREMENTS.md). PCR 12: nothing is measured, so it stays all-zero.

Which sections a stub knows depends on its version, read from its ``.sdmagic`` section:

=========  ==========================================================================
252, 253   .linux .osrel .cmdline .initrd .splash .dtb (.pcrsig) .pcrpkey
254, 255   adds .uname and .sbat after .dtb (PRs 27358 and 28187)
256        adds .ucode after .initrd (PR 31872)
257-260    adds .profile, .dtbauto, .hwids after .pcrpkey (.efifw from 258)
=========  ==========================================================================

Refused (:class:`~embassy.errors.ImageFormatError`) rather than guessed: stubs before 252
(no PCR 11 measurements of this kind) or after 260 (systemd 261 adds
``systemd-pcrosseparator.service``, which extends an "os-separator" into PCRs 0-7, 9 and
12-14 from userspace, and SMBIOS measurements from the stub; not modelled); multi-profile
UKIs (``.profile``); ``.dtbauto`` and ``.efifw`` (chosen by hardware ID at boot); a section
a stub would find twice or by a name prefix (older stubs' ``locate_sections`` compare only
the first ``strlen(name)`` bytes and let the last match win, newer ones take the first
exact match); sections that overlap in memory; a kernel the stub would start through the
deprecated EFI handover protocol (PE MajorImageVersion 0).

Checked against ``systemd-measure`` (252), ``pesign``, and a real boot under OVMF with
swtpm (tests/integration/test_image_tools.py, tests/integration/test_measured_boot.py).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from embassy.errors import ImageFormatError
from embassy.image.pe import (
    IMAGE_SUBSYSTEM_EFI_APPLICATION,
    PeImage,
    Section,
    authenticode_digest,
    parse_pe,
)

DEFAULT_PHASES: tuple[str, ...] = ("enter-initrd", "leave-initrd", "sysinit", "ready")
PREDICTED_PCRS = (4, 11, 12)
MIN_STUB_VERSION = 252
MAX_STUB_VERSION = 260
ZERO_PCR = bytes(32)

CALLING_EFI_APPLICATION = "Calling EFI Application from Boot Option"
RETURNING_FROM_EFI_APPLICATION = "Returning from EFI Application from Boot Option"
SEPARATOR_DATA = bytes(4)

_SDMAGIC = re.compile(rb"#### LoaderInfo: systemd-stub ([^ \x00]+) ####")
_LEADING_VERSION = re.compile(r"v?([0-9]+)")
# A phase word is one of systemd-measure's colon-separated path elements.
_PHASE_WORD = re.compile(r"[A-Za-z0-9_.@+-]{1,64}")
_NOT_MEASURED = ".pcrsig"  # the signature of the expected PCRs cannot be input to them
_HARDWARE_SELECTED = (".dtbauto", ".efifw")
_MULTI_PROFILE = ".profile"


def stub_sections(version: int) -> tuple[str, ...]:
    """The sections a systemd-stub of ``version`` looks up, in measurement order
    (``.pcrsig`` included, although it is never measured)."""
    _check_supported(version)
    names = [".linux", ".osrel", ".cmdline", ".initrd"]
    if version >= 256:
        names.append(".ucode")
    names += [".splash", ".dtb"]
    if version >= 254:
        names += [".uname", ".sbat"]
    names += [".pcrsig", ".pcrpkey"]
    if version >= 257:
        names += [".profile", ".dtbauto", ".hwids"]
    if version >= 258:
        names.append(".efifw")
    return tuple(names)


def _check_supported(version: int) -> None:
    if not MIN_STUB_VERSION <= version <= MAX_STUB_VERSION:
        raise ImageFormatError(
            f"UKI: systemd-stub {version} is outside the versions this model covers "
            f"({MIN_STUB_VERSION} to {MAX_STUB_VERSION}); refusing to guess its measurements"
        )


@dataclass(frozen=True, slots=True)
class BootEvent:
    """One extend: into ``pcr``, of ``digest`` (SHA-256), described for a human comparing
    it with a TCG event log; ``event_type`` is the TCG event type the firmware logs it as,
    or ``userspace`` for systemd's own log (``/run/log/systemd/tpm2-measure.log``)."""

    pcr: int
    description: str
    digest: bytes
    event_type: str = field(kw_only=True)


@dataclass(frozen=True, slots=True)
class BootPrediction:
    pcrs: Mapping[int, bytes]  # 4, 11, 12 -> SHA-256 bank value
    events: tuple[BootEvent, ...]  # in the order they happen
    stub_version: int | None
    phases: tuple[str, ...] = ()
    secure_boot: bool = False


def extend(value: bytes, digest: bytes) -> bytes:
    """TPM2_PCR_Extend in the SHA-256 bank."""
    return hashlib.sha256(value + digest).digest()


def replay(events: Sequence[BootEvent], pcrs: Sequence[int] = PREDICTED_PCRS) -> dict[int, bytes]:
    """The values ``pcrs`` hold after ``events``, starting from zero."""
    values = dict.fromkeys(pcrs, ZERO_PCR)
    for event in events:
        if event.pcr not in values:
            raise ValueError(f"event for PCR {event.pcr}, which is not replayed")
        values[event.pcr] = extend(values[event.pcr], event.digest)
    return values


def stub_version(uki: bytes) -> int | None:
    """The major version in systemd-stub's ``.sdmagic`` marker
    (``#### LoaderInfo: systemd-stub 257.6 ####``); None if there is no such marker."""
    return _stub_version(parse_pe(uki))


def _stub_version(image: PeImage) -> int | None:
    section = image.section(".sdmagic")
    if section is None:
        return None
    found = _SDMAGIC.search(section.loaded())
    if found is None:
        return None
    version = _LEADING_VERSION.match(found.group(1).decode("ascii"))
    return int(version.group(1)) if version else None


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def check_phases(phases: Sequence[str]) -> tuple[str, ...]:
    if isinstance(phases, str):
        raise ImageFormatError("phases: expected a sequence of words, got one string")
    for word in phases:
        if not isinstance(word, str) or not _PHASE_WORD.fullmatch(word):
            raise ImageFormatError(f"phases: {word!r} is not a boot phase word")
    return tuple(phases)


def predict_boot_pcrs(
    uki: bytes,
    *,
    phases: Sequence[str] = DEFAULT_PHASES,
    secure_boot: bool = False,
    prior_boot_attempts: int = 0,
) -> BootPrediction:
    """PCRs 4, 11 and 12 after the boot described in the module docstring, once
    ``phases`` have been measured (the default: everything up to ``ready``).

    ``secure_boot``: whether UEFI Secure Boot is on (it decides whether stubs 252-257 let
    the firmware measure the kernel). ``prior_boot_attempts``: boot options the firmware
    tried and gave up on before the UKI (each adds two EV_EFI_ACTION events to PCR 4; a
    failed attempt is assumed to have loaded no image)."""
    words = check_phases(phases)
    if prior_boot_attempts < 0:
        raise ValueError("prior_boot_attempts must not be negative")
    image = parse_pe(uki)
    version = _stub_version(image)
    if version is None:
        raise ImageFormatError(
            "UKI: no systemd-stub .sdmagic marker; cannot tell which stub would measure it"
        )
    _check_supported(version)
    measured = _measured_sections(image, version)
    kernel = measured[0][1]  # .linux always comes first, and _measured_sections insists on it

    events = _firmware_events(uki, prior_boot_attempts)
    for name, section in measured:
        events.append(
            BootEvent(
                11,
                f"systemd-stub {version}: section name {name!r} with its NUL",
                _sha256(name.encode("ascii") + b"\0"),
                event_type="EV_IPL",
            )
        )
        events.append(
            BootEvent(
                11,
                f"systemd-stub {version}: section {name} contents, VirtualSize "
                f"{section.virtual_size} bytes (SizeOfRawData {section.raw_size})",
                _sha256(section.loaded()),
                event_type="EV_IPL",
            )
        )
    kernel_event = _kernel_event(image, kernel, version, secure_boot)
    if kernel_event is not None:
        events.append(kernel_event)
    events += [
        BootEvent(
            11,
            f"systemd-pcrphase: boot phase {word!r}",
            _sha256(word.encode("ascii")),
            event_type="userspace",
        )
        for word in words
    ]
    return BootPrediction(
        pcrs=MappingProxyType(replay(events)),
        events=tuple(events),
        stub_version=version,
        phases=words,
        secure_boot=secure_boot,
    )


def _firmware_events(uki: bytes, prior_boot_attempts: int) -> list[BootEvent]:
    calling = BootEvent(
        4,
        f'firmware ReadyToBoot: "{CALLING_EFI_APPLICATION}"',
        _sha256(CALLING_EFI_APPLICATION.encode("ascii")),
        event_type="EV_EFI_ACTION",
    )
    events = [
        calling,
        BootEvent(
            4,
            "firmware ReadyToBoot: separator between pre-boot and OS (00000000)",
            _sha256(SEPARATOR_DATA),
            event_type="EV_SEPARATOR",
        ),
    ]
    for _ in range(prior_boot_attempts):
        events.append(
            BootEvent(
                4,
                f'firmware ReadyToBoot again: "{RETURNING_FROM_EFI_APPLICATION}"',
                _sha256(RETURNING_FROM_EFI_APPLICATION.encode("ascii")),
                event_type="EV_EFI_ACTION",
            )
        )
        events.append(calling)
    events.append(
        BootEvent(
            4,
            f"firmware LoadImage: the UKI, Authenticode SHA-256 of {len(uki)} bytes",
            authenticode_digest(uki),
            event_type="EV_EFI_BOOT_SERVICES_APPLICATION",
        )
    )
    return events


def _measured_sections(image: PeImage, version: int) -> list[tuple[str, Section]]:
    """The (name, section) pairs the stub measures into PCR 11, in its order."""
    known = stub_sections(version)
    for section in image.sections:
        if section.name == _MULTI_PROFILE:
            raise ImageFormatError(
                "UKI: has a .profile section (a multi-profile UKI); this model covers "
                "single-profile UKIs only"
            )
        if section.name in _HARDWARE_SELECTED:
            raise ImageFormatError(
                f"UKI: has a {section.name} section, which the stub picks by hardware ID at "
                "boot; its measurement cannot be predicted from the file"
            )
        for name in known:
            # Stubs before 257 match a section if its name *starts with* a known name, the
            # last match winning; a name that is only a prefix match is read two ways.
            if section.name != name and section.name.startswith(name):
                raise ImageFormatError(
                    f"UKI: section {section.name!r} starts with {name!r}; systemd-stub "
                    f"{version} may take it for {name}"
                )
    _check_memory_layout(image)
    measured = []
    for name in known:
        found = image.section(name)  # refuses duplicates
        if found is None or found.virtual_size == 0 or name == _NOT_MEASURED:
            continue  # the stub skips a section it did not find or that is empty
        measured.append((name, found))
    if not measured or measured[0][0] != ".linux":
        raise ImageFormatError("UKI: no (non-empty) .linux section; systemd-stub would not boot it")
    return measured


def _check_memory_layout(image: PeImage) -> None:
    # The stub measures sections where the firmware loaded them. If two overlap in memory,
    # one overwrites the other and the bytes measured are not the bytes in the file.
    spans = sorted(
        (s.virtual_address, s.virtual_address + s.memory_size, s.name)
        for s in image.sections
        if s.memory_size
    )
    for start, end, name in spans:
        if start < image.size_of_headers:
            raise ImageFormatError(
                f"UKI: section {name!r} at 0x{start:x} overlaps the headers in memory "
                f"(SizeOfHeaders 0x{image.size_of_headers:x})"
            )
        if end > image.size_of_image:
            raise ImageFormatError(
                f"UKI: section {name!r} [0x{start:x}, 0x{end:x}) extends beyond SizeOfImage "
                f"0x{image.size_of_image:x}"
            )
    for (_, end, before), (start, _, after) in itertools.pairwise(spans):
        if start < end:
            raise ImageFormatError(
                f"UKI: sections {before!r} and {after!r} overlap in memory "
                f"(0x{start:x} < 0x{end:x})"
            )


def _kernel_event(
    image: PeImage, kernel: Section, version: int, secure_boot: bool
) -> BootEvent | None:
    buffer = kernel.loaded()
    try:
        inner = parse_pe(buffer)
    except ImageFormatError as exc:
        raise ImageFormatError(
            f"UKI: .linux is not a PE kernel the stub can boot: {exc.message}"
        ) from None
    if inner.machine != image.machine:
        raise ImageFormatError(
            f"UKI: .linux is for machine 0x{inner.machine:x}, the stub for "
            f"0x{image.machine:x}; the stub would refuse it"
        )
    if inner.major_image_version < 1:
        # pe_kernel_info(): kernels before the LINUX_INITRD_MEDIA protocol (PE
        # MajorImageVersion 0) are started through the EFI handover protocol instead.
        raise ImageFormatError(
            "UKI: .linux has PE MajorImageVersion 0 (a kernel older than 5.8); the stub "
            "would use the EFI handover protocol, which this model does not cover"
        )
    if version >= 258 or secure_boot:
        return None
    if inner.subsystem != IMAGE_SUBSYSTEM_EFI_APPLICATION:
        # DxeTpm2MeasureBootLib logs other subsystems as drivers, into PCR 2.
        raise ImageFormatError(
            f".linux has PE subsystem {inner.subsystem}, not an EFI application (10)"
        )
    return BootEvent(
        4,
        f"firmware LoadImage from systemd-stub {version}: the .linux kernel, Authenticode "
        f"SHA-256 of its {len(buffer)} bytes in memory",
        authenticode_digest(buffer),
        event_type="EV_EFI_BOOT_SERVICES_APPLICATION",
    )
