"""A real measured boot agrees with the model an auditor computes expected.json with.

A UKI (systemd-stub + a Debian kernel + a busybox initrd) boots under OVMF in QEMU with a
software TPM; its /init prints the TPM's SHA-256 PCRs and the firmware's TCG event log on the
serial console (tests/integration/measured_boot.py). The PCRs a verifier pins -- 4, 11 and 12
(docs/architecture.md, "PCR layout") -- must be exactly what ``predict_boot_pcrs`` computes
from the UKI's bytes alone. The initrd runs no systemd, so no boot phases reach PCR 11.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

from tests.integration import measured_boot as mb
from tests.integration import tcg_eventlog as tcg
from tests.integration.conftest import IN_CI, require

if TYPE_CHECKING:
    from embassy.image.uki import BootPrediction

pytestmark = pytest.mark.integration

ROOT_HASH = hashlib.sha256(b"embassy measured-boot test: a stand-in verity root hash").hexdigest()
# The kernel ignores roothash= (it hands it to /init's environment); to the measurement it is
# what it is in the real image: the part of the command line that names the root file system.
CMDLINE = f"console=ttyS0 panic=-1 roothash={ROOT_HASH}"
# The attacker's UKI: the same stub, kernel and initrd, one hex digit of the root hash changed.
TAMPERED_CMDLINE = CMDLINE[:-1] + ("0" if CMDLINE[-1] != "0" else "1")
ZERO = bytes(32)
# PCR 10 is IMA's (the kernel extends it; the firmware's log does not cover it).
FIRMWARE_LOGGED_PCRS = tuple(i for i in range(24) if i != 10)


def _unavailable(msg: str) -> NoReturn:
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def _require_components() -> None:
    require(*mb.REQUIRED_BINARIES)
    missing = [str(p) for p in (mb.STUB,) if not p.is_file()]
    try:
        mb.ovmf_files()
    except RuntimeError as e:
        missing.append(str(e))
    if missing:
        _unavailable(f"real component(s) missing: {', '.join(missing)} (run scripts/setup.sh)")


@dataclass(frozen=True)
class Booted:
    uki: bytes
    result: mb.BootResult


@pytest.fixture(scope="module")
def kernel() -> Path:
    _require_components()
    try:
        return mb.fetch_kernel(download=False)
    except (RuntimeError, OSError) as e:  # setup did not fetch it: the component is missing
        _unavailable(f"no test kernel: {e}")


@pytest.fixture(scope="module")
def initrd() -> bytes:
    return mb.build_initrd()


def _build_and_boot(
    tmp_path_factory: pytest.TempPathFactory, kernel: Path, initrd: bytes, cmdline: str
) -> Booted:
    work = tmp_path_factory.mktemp("mboot")
    uki = mb.build_uki(kernel, initrd, cmdline, work / "uki.efi")
    return Booted(uki, mb.boot_uki(work / "uki.efi", work / "vm"))


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory, kernel: Path, initrd: bytes) -> Booted:
    return _build_and_boot(tmp_path_factory, kernel, initrd, CMDLINE)


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory, kernel: Path, initrd: bytes) -> Booted:
    return _build_and_boot(tmp_path_factory, kernel, initrd, TAMPERED_CMDLINE)


def _predict(uki: bytes) -> BootPrediction:
    from embassy.image.uki import predict_boot_pcrs

    return predict_boot_pcrs(uki, phases=())


def _comparison(prediction: BootPrediction, booted: Booted, pcrs: Sequence[int]) -> str:
    """The predicted events next to the real ones, for the PCRs in question."""
    lines = [f"stub version (model): {prediction.stub_version}"]
    for pcr in pcrs:
        lines.append(f"PCR {pcr} predicted {prediction.pcrs[pcr].hex()}:")
        lines += [f"  {e.digest.hex()}  {e.description}" for e in prediction.events if e.pcr == pcr]
        lines.append(f"PCR {pcr} real      {booted.result.pcrs[pcr].hex()} (event log):")
        lines += [f"  {e.describe()}" for e in booted.result.events_for(pcr)]
    return "\n".join(lines)


def test_event_log_replays_to_the_tpm_pcrs(booted: Booted) -> None:
    replayed = tcg.replay(booted.result.events)
    wrong = [
        f"PCR {i}: TPM {booted.result.pcrs[i].hex()} replayed {replayed[i].hex()}"
        for i in FIRMWARE_LOGGED_PCRS
        if replayed[i] != booted.result.pcrs[i]
    ]
    assert not wrong, "\n".join(wrong) + "\n" + booted.result.describe(*range(24))
    # The boot did reach the PCRs this test is about.
    assert booted.result.events_for(4)
    assert booted.result.events_for(11)


def test_the_kernel_ran_with_the_uki_command_line(booted: Booted) -> None:
    assert booted.result.cmdline == CMDLINE


def test_pcr12_is_all_zero(booted: Booted) -> None:
    assert booted.result.pcrs[12] == ZERO, booted.result.describe(12)
    assert _predict(booted.uki).pcrs[12] == ZERO


@pytest.mark.parametrize("pcr", [4, 11])
def test_boot_pcr_is_what_the_model_predicts(booted: Booted, pcr: int) -> None:
    prediction = _predict(booted.uki)
    assert prediction.pcrs[pcr] == booted.result.pcrs[pcr], _comparison(prediction, booted, [4, 11])


def test_uki_authenticode_digest_is_the_boot_application_in_pcr4(booted: Booted) -> None:
    from embassy.image.pe import authenticode_digest

    apps = [
        e
        for e in booted.result.events_for(4)
        if e.event_type == tcg.EV_EFI_BOOT_SERVICES_APPLICATION
    ]
    assert apps, booted.result.describe(4)
    # The first application the firmware starts is the UKI itself, all of it.
    assert apps[0].sha256 == authenticode_digest(booted.uki), booted.result.describe(4)
    assert apps[0].image_length == len(booted.uki)


def _differing_offsets(a: bytes, b: bytes, chunk: int = 1 << 16) -> list[int]:
    """Where two equally long byte strings differ (compared a chunk at a time: UKIs are big)."""
    assert len(a) == len(b)
    offsets = []
    for start in range(0, len(a), chunk):
        x, y = a[start : start + chunk], b[start : start + chunk]
        if x != y:
            offsets += [start + i for i, (p, q) in enumerate(zip(x, y, strict=True)) if p != q]
    return offsets


def test_one_byte_of_the_command_line_moves_pcr11(booted: Booted, tampered: Booted) -> None:
    # The two UKIs differ in one byte of .cmdline (and in the PE checksum, which nothing
    # measures: Authenticode skips it).
    checksum = mb.pe_checksum_offset(booted.uki)
    changed = [
        i for i in _differing_offsets(booted.uki, tampered.uki) if not checksum <= i < checksum + 4
    ]
    assert changed == [booted.uki.index(CMDLINE.encode()) + len(CMDLINE) - 1]
    assert tampered.result.cmdline == TAMPERED_CMDLINE
    # A different PCR 11, and a different UKI digest in PCR 4: the pin on either catches it.
    assert tampered.result.pcrs[11] != booted.result.pcrs[11]
    assert tampered.result.pcrs[4] != booted.result.pcrs[4]
    # The expectation computed from the genuine UKI refuses the tampered boot ...
    genuine = _predict(booted.uki)
    assert genuine.pcrs[11] != tampered.result.pcrs[11]
    assert genuine.pcrs[4] != tampered.result.pcrs[4]
    # ... and the model is not merely different: it predicts the tampered boot exactly.
    prediction = _predict(tampered.uki)
    assert prediction.pcrs[11] == tampered.result.pcrs[11], _comparison(prediction, tampered, [11])
    assert prediction.pcrs[4] == tampered.result.pcrs[4], _comparison(prediction, tampered, [4])
    assert tampered.result.pcrs[12] == ZERO
