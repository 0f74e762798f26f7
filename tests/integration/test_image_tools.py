"""The boot model against the real tools: pesign's Authenticode hashes, systemd-measure's PCR 11.

* ``pesign -h -i FILE`` prints the SHA-256 Authenticode hash of a PE file: it must equal
  :func:`embassy.image.authenticode_digest` on systemd's EFI binaries, on UKIs built here,
  on a signed Debian kernel and on the pinned vectors (with one documented exception).
* ``systemd-measure calculate`` (systemd 252) computes PCR 11 from the files a UKI is made
  of: it must equal :func:`embassy.image.predict_boot_pcrs` on a UKI objcopy builds from
  Debian's systemd-stub 252 and those files, as systemd-stub(7) of 252 describes, for every
  phase path it is asked for.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import pytest

from embassy.image import authenticode_digest, predict_boot_pcrs, stub_version
from embassy.image.pe import parse_pe
from tests.integration.conftest import IN_CI, require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
VECTOR_DIR = ROOT / "tests" / "vectors" / "image"
EFI_DIR = Path("/usr/lib/systemd/boot/efi")
STUB = EFI_DIR / "linuxx64.efi.stub"
MEASURE = Path("/usr/lib/systemd/systemd-measure")
# Above the stub's own sections (they end below 0x20000) and apart from each other, as in
# systemd-stub(7) of systemd 252.
VMAS = {
    ".osrel": 0x20000,
    ".cmdline": 0x30000,
    ".splash": 0x40000,
    ".dtb": 0x50000,
    ".pcrpkey": 0x60000,
    ".uname": 0x70000,
    ".linux": 0x2000000,
    ".initrd": 0x3000000,
}
MEASURE_OPTION = {
    ".osrel": "--osrel",
    ".cmdline": "--cmdline",
    ".splash": "--splash",
    ".dtb": "--dtb",
    ".pcrpkey": "--pcrpkey",
    ".linux": "--linux",
    ".initrd": "--initrd",
}
PHASE_PATHS = (
    "",
    "enter-initrd",
    "enter-initrd:leave-initrd",
    "enter-initrd:leave-initrd:sysinit:ready",
)
# pesign skips the 8 bytes where data directory 4 would be even when the optional header has
# only 4 directories (so those bytes are the start of the section table); EDK2, whose hash
# the firmware measures, skips them only when the directory exists.
PESIGN_DIFFERS = {"pe32plus-four-directories"}


def _unavailable(msg: str) -> NoReturn:
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def require_files(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        _unavailable(f"real component(s) missing: {', '.join(missing)} (run scripts/setup.sh)")


def pesign_hash(path: Path) -> bytes:
    out = subprocess.run(
        ["pesign", "--hash", "--digest_type=sha256", "--in", str(path)],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.fullmatch(r"hash: ([0-9a-f]{64})\n", out)
    assert found, out
    return bytes.fromhex(found.group(1))


def kernel_like(tmp: Path) -> Path:
    """systemd's own stub with PE MajorImageVersion 1: a PE the stub 252 starts with
    LoadImage, as it does a Linux kernel >= 5.8 (any PE does for PCR 11)."""
    data = bytearray(STUB.read_bytes())
    lfanew = int.from_bytes(data[0x3C:0x40], "little")
    data[lfanew + 24 + 44 : lfanew + 24 + 46] = (1).to_bytes(2, "little")
    path = tmp / "linux"
    path.write_bytes(bytes(data))
    return path


def build_uki(tmp: Path, parts: dict[str, Path]) -> Path:
    """objcopy: the stub plus ``parts`` (section name -> file), as systemd 252 documents."""
    out = tmp / "uki.efi"
    argv = ["objcopy"]
    for section, path in parts.items():
        argv += [
            "--add-section",
            f"{section}={path}",
            "--change-section-vma",
            f"{section}=0x{VMAS[section]:x}",
        ]
    subprocess.run([*argv, str(STUB), str(out)], check=True, timeout=120)
    return out


def measure_pcr11(parts: dict[str, Path], phases: Sequence[str]) -> dict[str, bytes]:
    """systemd-measure's PCR 11 per phase path ("" = before any phase)."""
    argv = [str(MEASURE), "calculate", "--bank=sha256", "--json=short"]
    argv += [f"{MEASURE_OPTION[s]}={p}" for s, p in parts.items()]
    # systemd 252 reads ":" as the path with no phase in it.
    argv += [f"--phase={path or ':'}" for path in phases]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout
    entries = json.loads(out)["sha256"]
    assert {e["pcr"] for e in entries} == {11}
    return {e.get("phase", ""): bytes.fromhex(e["hash"]) for e in entries}


def kernel_digests(uki: bytes) -> list[bytes]:
    """The PCR 4 events after the UKI's own: the kernel the stub hands to LoadImage."""
    events = [e for e in predict_boot_pcrs(uki).events if e.pcr == 4]
    assert [e.event_type for e in events[:3]] == [
        "EV_EFI_ACTION",
        "EV_SEPARATOR",
        "EV_EFI_BOOT_SERVICES_APPLICATION",
    ]
    return [e.digest for e in events[3:]]


@pytest.fixture
def parts(tmp_path: Path) -> dict[str, Path]:
    require("objcopy")
    require_files(STUB)
    files = {
        ".osrel": b'ID=embassy\nNAME="Embassy"\nVERSION_ID=1\n',
        ".cmdline": b"console=ttyS0 roothash=" + b"c0ffee" * 10,
        ".initrd": bytes(range(256)) * 20 + b"tail",
        ".splash": b"BM" + bytes(100),
        ".dtb": b"\xd0\x0d\xfe\xed" + bytes(60),
        ".pcrpkey": b"-----BEGIN PUBLIC KEY-----\nMIIB\n-----END PUBLIC KEY-----\n",
    }
    out = {".linux": kernel_like(tmp_path)}
    for section, content in files.items():
        path = tmp_path / section.lstrip(".")
        path.write_bytes(content)
        out[section] = path
    return out


@pytest.mark.parametrize(
    "sections",
    [
        (".linux",),
        (".linux", ".osrel", ".cmdline", ".initrd"),
        (".linux", ".osrel", ".cmdline", ".initrd", ".splash", ".dtb", ".pcrpkey"),
        (".pcrpkey", ".initrd", ".linux", ".cmdline"),  # PE order is not measurement order
    ],
)
def test_pcr11_matches_systemd_measure(
    tmp_path: Path, parts: dict[str, Path], sections: tuple[str, ...]
) -> None:
    require_files(MEASURE)
    chosen = {s: parts[s] for s in sections}
    uki = build_uki(tmp_path, chosen).read_bytes()
    assert stub_version(uki) == 252
    measured = measure_pcr11(chosen, PHASE_PATHS)
    assert set(measured) == set(PHASE_PATHS)
    for path, value in measured.items():
        phases = path.split(":") if path else []
        prediction = predict_boot_pcrs(uki, phases=phases)
        assert prediction.pcrs[11] == value, (path, [e.description for e in prediction.events])


def test_sections_systemd_measure_252_ignores_are_not_measured(
    tmp_path: Path, parts: dict[str, Path]
) -> None:
    """.uname and .sbat are measured from stub 254 on: a 252 UKI with them predicts as without."""
    require_files(MEASURE)
    uname = tmp_path / "uname"
    uname.write_bytes(b"6.1.0-embassy")
    base = {s: parts[s] for s in (".linux", ".osrel", ".cmdline")}
    with_uname = build_uki(tmp_path, {**base, ".uname": uname}).read_bytes()
    expected = measure_pcr11(base, ["enter-initrd"])["enter-initrd"]
    assert predict_boot_pcrs(with_uname, phases=["enter-initrd"]).pcrs[11] == expected


def test_authenticode_matches_pesign_on_systemd_binaries_and_ukis(
    tmp_path: Path, parts: dict[str, Path]
) -> None:
    require("pesign")
    binaries = sorted(p for p in EFI_DIR.glob("*.efi*") if p.name.endswith((".efi", ".efi.stub")))
    require_files(STUB, *binaries)
    uki = build_uki(tmp_path, parts)
    for path in [*binaries, parts[".linux"], uki]:
        assert authenticode_digest(path.read_bytes()) == pesign_hash(path), path
    # and the kernel event the model predicts for that UKI is pesign's hash of the kernel file
    assert kernel_digests(uki.read_bytes()) == [pesign_hash(parts[".linux"])]


def test_authenticode_matches_pesign_on_the_pinned_vectors() -> None:
    require("pesign")
    expected = json.loads((VECTOR_DIR / "expected.json").read_bytes())
    good = sorted(name for name, v in expected.items() if v["expect"] == "ok")
    assert good
    for name in good:
        path = VECTOR_DIR / f"{name}.efi"
        ours = authenticode_digest(path.read_bytes())
        assert ours.hex() == expected[name]["authenticode_sha256"]
        if name in PESIGN_DIFFERS:
            assert pesign_hash(path) != ours, f"{name}: pesign now agrees; drop the exception"
        else:
            assert pesign_hash(path) == ours, name


def test_pesign_skips_a_certificate_entry_that_is_not_there() -> None:
    """The one divergence, spelled out: pesign's hash is EDK2's with 8 more bytes skipped."""
    require("pesign")
    path = VECTOR_DIR / "pe32plus-four-directories.efi"
    data = path.read_bytes()
    image = parse_pe(data)
    assert image.certificate_entry_offset is None
    where = image.checksum_offset - 64 + 112 + 8 * 4  # where directory 4 would start
    h = hashlib.sha256(data[: image.checksum_offset])
    h.update(data[image.checksum_offset + 4 : where] + data[where + 8 : image.size_of_headers])
    for section in sorted(image.sections, key=lambda s: s.raw_offset):
        h.update(section.data)
    assert pesign_hash(path) == h.digest()


def test_a_signed_debian_kernel(tmp_path: Path, parts: dict[str, Path]) -> None:
    """A real, signed kernel: pesign and the model agree on its hash (signature left out),
    and systemd-measure on PCR 11 of a UKI made with it."""
    require("pesign", "apt-get", "dpkg-deb")
    require_files(MEASURE)
    try:
        from tests.integration import measured_boot
    except ImportError as exc:
        _unavailable(f"tests/integration/measured_boot.py is not importable: {exc}")
    try:
        vmlinuz = measured_boot.fetch_kernel()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        _unavailable(f"could not fetch a Debian kernel: {exc}")
    data = vmlinuz.read_bytes()
    assert parse_pe(data).certificate_table is not None, "expected a signed kernel"
    assert authenticode_digest(data) == pesign_hash(vmlinuz)
    chosen = {".linux": vmlinuz, ".osrel": parts[".osrel"], ".cmdline": parts[".cmdline"]}
    uki = build_uki(tmp_path, chosen).read_bytes()
    prediction = predict_boot_pcrs(uki, phases=["enter-initrd"])
    assert prediction.pcrs[11] == measure_pcr11(chosen, ["enter-initrd"])["enter-initrd"]
    assert kernel_digests(uki) == [pesign_hash(vmlinuz)]
