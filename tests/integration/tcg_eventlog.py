"""The TCG2 crypto-agile event log (``binary_bios_measurements``), for tests.

Enough of the TCG PC Client Platform Firmware Profile to list the records a firmware
extended (PCR, event type, SHA-256 digest, event data) and to replay the SHA-256 bank, so
a measured-boot test can show which event differs when a PCR is not what the model says.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_IPL = 0x0000000D
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_ACTION = 0x80000007

EVENT_TYPE_NAMES: Mapping[int, str] = {
    0x00000000: "EV_PREBOOT_CERT",
    0x00000001: "EV_POST_CODE",
    0x00000003: "EV_NO_ACTION",
    0x00000004: "EV_SEPARATOR",
    0x00000005: "EV_ACTION",
    0x00000006: "EV_EVENT_TAG",
    0x00000007: "EV_S_CRTM_CONTENTS",
    0x00000008: "EV_S_CRTM_VERSION",
    0x00000009: "EV_CPU_MICROCODE",
    0x0000000A: "EV_PLATFORM_CONFIG_FLAGS",
    0x0000000B: "EV_TABLE_OF_DEVICES",
    0x0000000C: "EV_COMPACT_HASH",
    0x0000000D: "EV_IPL",
    0x0000000E: "EV_IPL_PARTITION_DATA",
    0x0000000F: "EV_NONHOST_CODE",
    0x00000010: "EV_NONHOST_CONFIG",
    0x00000011: "EV_NONHOST_INFO",
    0x00000012: "EV_OMIT_BOOT_DEVICE_EVENTS",
    0x80000001: "EV_EFI_VARIABLE_DRIVER_CONFIG",
    0x80000002: "EV_EFI_VARIABLE_BOOT",
    0x80000003: "EV_EFI_BOOT_SERVICES_APPLICATION",
    0x80000004: "EV_EFI_BOOT_SERVICES_DRIVER",
    0x80000005: "EV_EFI_RUNTIME_SERVICES_DRIVER",
    0x80000006: "EV_EFI_GPT_EVENT",
    0x80000007: "EV_EFI_ACTION",
    0x80000008: "EV_EFI_PLATFORM_FIRMWARE_BLOB",
    0x80000009: "EV_EFI_HANDOFF_TABLES",
    0x8000000A: "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
    0x8000000B: "EV_EFI_HANDOFF_TABLES2",
    0x8000000C: "EV_EFI_VARIABLE_BOOT2",
    0x8000000D: "EV_EFI_GPT_EVENT2",
    0x80000010: "EV_EFI_HCRTM_EVENT",
    0x800000E0: "EV_EFI_VARIABLE_AUTHORITY",
    0x800000E1: "EV_EFI_SPDM_FIRMWARE_BLOB",
    0x800000E2: "EV_EFI_SPDM_FIRMWARE_CONFIG",
}

TPM_ALG_SHA256 = 0x000B
_SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
_STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"


class EventLogError(ValueError):
    """The event log is not a well-formed TCG2 crypto-agile log."""


@dataclass(frozen=True)
class LogEvent:
    """One TCG_PCR_EVENT2 record: the PCR, the event type, the SHA-256 digest and the data."""

    pcr: int
    event_type: int
    sha256: bytes
    data: bytes

    @property
    def type_name(self) -> str:
        return EVENT_TYPE_NAMES.get(self.event_type, f"0x{self.event_type:08x}")

    @property
    def extends(self) -> bool:
        return self.event_type != EV_NO_ACTION

    @property
    def image_length(self) -> int | None:
        """For a boot application: ImageLengthInMemory of its UEFI_IMAGE_LOAD_EVENT."""
        if self.event_type != EV_EFI_BOOT_SERVICES_APPLICATION or len(self.data) < 32:
            return None
        (length,) = struct.unpack_from("<Q", self.data, 8)
        return int(length)

    def describe(self) -> str:
        """A one-line human reading of the event data (for assertion messages)."""
        return f"PCR {self.pcr:2d} {self.type_name:<34} {self.sha256.hex()}  {_event_text(self)}"


def _printable(data: bytes) -> str | None:
    """``data`` as text if it is printable ASCII (NULs at the end allowed), else None."""
    text = data.rstrip(b"\x00")
    if text and all(32 <= c < 127 for c in text):
        return repr(text.decode("ascii"))
    return None


def _printable_utf16(data: bytes) -> str | None:
    if len(data) % 2:
        return None
    text = data.decode("utf-16-le", errors="replace").rstrip("\x00")
    if text and text.isprintable() and text.isascii():
        return repr(text)
    return None


def _event_text(event: LogEvent) -> str:
    data = event.data
    if event.event_type == EV_EFI_BOOT_SERVICES_APPLICATION and len(data) >= 32:
        location, length, _link, path_len = struct.unpack_from("<QQQQ", data)
        return f"image @0x{location:x}, {length} bytes, device path of {path_len} bytes"
    if event.event_type == EV_SEPARATOR:
        return f"separator {data.hex()}"
    text = _printable(data) or _printable_utf16(data)
    if text is not None:
        return text
    if len(data) <= 32:
        return data.hex()
    return f"{len(data)} bytes"


def parse_event_log(blob: bytes) -> list[LogEvent]:
    """Parse a TCG2 crypto-agile event log: the SHA-1-format Spec ID header, then PCR_EVENT2s.

    Returns every record after the header (EV_NO_ACTION included, so :func:`replay` can honour a
    StartupLocality event); each with its SHA-256 digest.
    """
    view = memoryview(blob)
    if len(view) < 32:
        raise EventLogError("event log shorter than its header")
    pcr, event_type = struct.unpack_from("<II", view, 0)
    (size,) = struct.unpack_from("<I", view, 28)
    header = bytes(view[32 : 32 + size])
    if event_type != EV_NO_ACTION or pcr != 0 or len(header) != size:
        raise EventLogError("first event is not the EV_NO_ACTION Spec ID event")
    if not header.startswith(_SPEC_ID_SIGNATURE) or len(header) < 28:
        raise EventLogError("not a crypto-agile (Spec ID Event03) log")
    (count,) = struct.unpack_from("<I", header, 24)
    if len(header) < 28 + 4 * count:
        raise EventLogError("Spec ID event truncated")
    digest_sizes: dict[int, int] = {}
    for i in range(count):
        alg, digest_size = struct.unpack_from("<HH", header, 28 + 4 * i)
        digest_sizes[alg] = digest_size
    if TPM_ALG_SHA256 not in digest_sizes:
        raise EventLogError("the log has no SHA-256 bank")

    events: list[LogEvent] = []
    offset = 32 + size
    while offset < len(view):
        if len(view) - offset < 12:
            raise EventLogError(f"truncated event at offset {offset}")
        pcr, event_type, n_digests = struct.unpack_from("<III", view, offset)
        offset += 12
        sha256: bytes | None = None
        for _ in range(n_digests):
            if len(view) - offset < 2:
                raise EventLogError(f"truncated digest at offset {offset}")
            (alg,) = struct.unpack_from("<H", view, offset)
            if alg not in digest_sizes:
                raise EventLogError(f"digest of undeclared algorithm 0x{alg:04x}")
            digest = bytes(view[offset + 2 : offset + 2 + digest_sizes[alg]])
            if len(digest) != digest_sizes[alg]:
                raise EventLogError(f"truncated digest at offset {offset}")
            offset += 2 + digest_sizes[alg]
            if alg == TPM_ALG_SHA256:
                sha256 = digest
        if len(view) - offset < 4:
            raise EventLogError(f"truncated event size at offset {offset}")
        (data_size,) = struct.unpack_from("<I", view, offset)
        offset += 4
        data = bytes(view[offset : offset + data_size])
        if len(data) != data_size:
            raise EventLogError(f"truncated event data at offset {offset}")
        offset += data_size
        if sha256 is None:
            raise EventLogError(f"event at offset {offset} has no SHA-256 digest")
        events.append(LogEvent(pcr, event_type, sha256, data))
    return events


def replay(events: Sequence[LogEvent]) -> dict[int, bytes]:
    """The SHA-256 PCR values (0-23) the events extend to, from a TPM reset."""
    # PCRs 17-22 (the dynamic-launch ones) reset to all ones; the rest to zeros.
    pcrs = {i: (b"\xff" * 32 if 17 <= i <= 22 else bytes(32)) for i in range(24)}
    for event in events:
        if event.event_type == EV_NO_ACTION:
            if event.data.startswith(_STARTUP_LOCALITY_SIGNATURE) and len(event.data) == 17:
                pcrs[0] = bytes(31) + event.data[16:17]
            continue
        pcrs[event.pcr] = hashlib.sha256(pcrs[event.pcr] + event.sha256).digest()
    return pcrs
