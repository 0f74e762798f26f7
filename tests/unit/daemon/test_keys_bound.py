"""The master secret is bound to the boot PCRs: refused after a PCR change, never re-keyed.

The policy digest is checked against the TPM's own computation in
tests/integration/test_keys_bound.py; here the format, the fake TPM's policy and the
daemon's start-up are checked from the attacker's side.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from embassy.daemon.keys import SEALED_KEY_FILE, derive_keys, load_or_create_keys
from embassy.errors import (
    BootStateChangedError,
    ConfigError,
    TpmError,
    UnboundSealedKeyError,
)
from embassy.tpm.sealed import (
    SEALED_MAGIC,
    SealedBlob,
    parse_sealed,
    pcr_selection,
    policy_pcr_digest,
)
from tests.fakes import FakeTpm

BOOT = (4, 11, 12)
SECRET = bytes(range(32))


def test_policy_pcr_digest_is_the_tpm_formula() -> None:
    values = [bytes([p]) * 32 for p in BOOT]
    expected = hashlib.sha256(
        bytes(32)
        + bytes.fromhex("0000017f")
        + bytes.fromhex("00000001000b03101800")  # PCRs 4, 11, 12
        + hashlib.sha256(b"".join(values)).digest()
    ).digest()
    assert pcr_selection(BOOT) == bytes.fromhex("00000001000b03101800")
    assert policy_pcr_digest(BOOT, values) == expected
    assert policy_pcr_digest(BOOT, values[::-1]) != expected


def test_seal_records_the_selection_and_round_trips() -> None:
    tpm = FakeTpm()
    tpm.extend(4, b"\x04" * 32)
    blob = tpm.seal(SECRET, [12, 4, 11, 4])
    assert blob.startswith(SEALED_MAGIC)
    sealed = parse_sealed(blob)
    assert sealed.pcrs == BOOT
    assert sealed.values == tuple(tpm.pcrs[p] for p in BOOT)
    assert sealed.encode() == blob
    assert SECRET not in blob
    assert tpm.unseal(blob) == SECRET


@pytest.mark.parametrize("pcr", BOOT)
def test_a_boot_pcr_change_refuses_the_unseal_naming_it(pcr: int) -> None:
    tpm = FakeTpm()
    blob = tpm.seal(SECRET, BOOT)
    tpm.extend(pcr, hashlib.sha256(b"another kernel").digest())
    with pytest.raises(BootStateChangedError) as caught:
        tpm.unseal(blob)
    assert caught.value.code == "sealed-boot-changed"
    assert f"PCR {pcr} was" in caught.value.message
    assert [p for p in BOOT if f"PCR {p} was" in caught.value.message] == [pcr]


def test_a_pcr_outside_the_policy_does_not_matter() -> None:
    tpm = FakeTpm()
    blob = tpm.seal(SECRET, BOOT)
    tpm.extend(13, b"\x13" * 32)  # the embassy's own PCR moves at every start
    tpm.extend(14, b"\x14" * 32)
    assert tpm.unseal(blob) == SECRET


def test_rewriting_the_recorded_values_to_the_new_boot_does_not_help() -> None:
    """The attacker's edit: claim the blob was sealed to today's (changed) PCR values."""
    tpm = FakeTpm()
    blob = parse_sealed(tpm.seal(SECRET, BOOT))
    tpm.extend(11, b"\x11" * 32)
    forged = SealedBlob(blob.pcrs, tuple(tpm.pcrs[p] for p in BOOT), blob.public, blob.private)
    with pytest.raises(TpmError, match="policy is not PolicyPCR over the PCR values"):
        tpm.unseal(forged.encode())
    # Nor dropping the PCR that moved from the recorded selection.
    fewer = SealedBlob((4, 12), (blob.values[0], blob.values[2]), blob.public, blob.private)
    with pytest.raises(TpmError, match="policy is not PolicyPCR"):
        tpm.unseal(fewer.encode())


def test_malformed_blobs_are_refused() -> None:
    tpm = FakeTpm()
    blob = tpm.seal(SECRET, BOOT)
    n = len(SEALED_MAGIC)
    for bad in (
        b"",
        blob[:-1],
        blob + b"\x00",
        blob[:n] + b"\x00\x04" + blob[n + 2 :],  # SHA-1 bank
        blob[:n] + b"\x00\x0b\x00" + blob[n + 3 :],  # no PCR
        blob[:n] + b"\x00\x0b\x03\x0b\x04\x0c" + blob[n + 6 :],  # not ascending
        blob[:n] + b"\x00\x0b\x03\x04\x0b\x18" + blob[n + 6 :],  # PCR 24
        b"EMBSEAL9" + blob[n:],
    ):
        with pytest.raises(TpmError):
            tpm.unseal(bad)
    assert tpm.unseal(blob) == SECRET


def test_a_format_1_blob_is_refused_not_used() -> None:
    """The old format had no policy: whoever had root could have a copy of its secret."""
    with pytest.raises(UnboundSealedKeyError) as caught:
        FakeTpm().unseal(b"EMBSEAL1" + bytes(100))
    assert caught.value.code == "sealed-key-unbound"
    assert "no PCR policy" in caught.value.message


def test_sealing_to_no_pcr_is_refused() -> None:
    with pytest.raises(TpmError, match="no PCR"):
        FakeTpm().seal(SECRET, [])
    with pytest.raises(TpmError, match="outside"):
        FakeTpm().seal(SECRET, [24])


# -- the daemon's keys ---------------------------------------------------------------------


def test_keys_survive_a_restart_on_the_same_boot(tmp_path: Path) -> None:
    tpm = FakeTpm()
    first = load_or_create_keys(tpm, tmp_path, BOOT)
    blob = (tmp_path / SEALED_KEY_FILE).read_bytes()
    assert parse_sealed(blob).pcrs == BOOT
    tpm.extend(13, b"\x13" * 32)
    again = load_or_create_keys(tpm, tmp_path, BOOT)
    assert again.public_json() == first.public_json()


def test_another_boot_gets_no_keys_and_no_silent_rekey(tmp_path: Path) -> None:
    tpm = FakeTpm()
    load_or_create_keys(tpm, tmp_path, BOOT)
    blob = (tmp_path / SEALED_KEY_FILE).read_bytes()
    tpm.reset()
    tpm.extend(4, hashlib.sha256(b"another UKI").digest())
    with pytest.raises(BootStateChangedError) as caught:
        load_or_create_keys(tpm, tmp_path, BOOT)
    assert "PCR 4 was" in caught.value.message
    assert "move this file aside" in caught.value.message
    assert str(tmp_path / SEALED_KEY_FILE) in caught.value.message
    assert (tmp_path / SEALED_KEY_FILE).read_bytes() == blob  # left as it was


def test_an_old_unbound_blob_is_refused_at_start(tmp_path: Path) -> None:
    (tmp_path / SEALED_KEY_FILE).write_bytes(b"EMBSEAL1" + bytes(80))
    with pytest.raises(UnboundSealedKeyError, match="move this file aside"):
        load_or_create_keys(FakeTpm(), tmp_path, BOOT)


def test_empty_boot_pcrs_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pcrs\.boot"):
        load_or_create_keys(FakeTpm(), tmp_path, ())
    assert not (tmp_path / SEALED_KEY_FILE).exists()


def test_the_embassy_refuses_to_start_on_another_boot(make_embassy: Any) -> None:
    """End to end through the daemon's start-up: nothing is signed with keys it lacks."""
    tpm = FakeTpm(b"seed")
    embassy = make_embassy(tpm)
    assert embassy.keys.public_json() == derive_keys(SECRET).public_json()
    make_embassy.crash(embassy)
    tpm.extend(11, hashlib.sha256(b"init=/bin/sh").digest())
    with pytest.raises(BootStateChangedError, match="PCR 11 was"):
        make_embassy(tpm)
