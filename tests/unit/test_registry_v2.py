"""The registry's formula v2 state on a real SQLite file: pooled windows stored with each
signature, the model fitted from exactly those rows, calibration recorded at commit and at
recovery, and the one-way migration of a schema 1 file."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from embassy.errors import StorageError
from embassy.metering.formula_v2 import Sample, fit, pool_windows, score_v2
from embassy.metering.registry import Registry, SignatureRow
from embassy.metering.score import Polarity

POS = Polarity.POSITIVE
NEG = Polarity.NEGATIVE
SESSION = "ab" * 16
TENSOR = "encoder.layer.5"
DIM = 16


@pytest.fixture
def reg(tmp_path: Path) -> Iterator[Registry]:
    with Registry.open(tmp_path / "registry.sqlite") as registry:
        yield registry


def activation(seed: int, tokens: int = 40, shift: int | None = None) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    array = rng.normal(size=(tokens, DIM)).astype(np.float32)
    if shift is not None:  # a capability's direction
        array[:, shift] += 3.0
    return array


def row(
    capability: str, polarity: Polarity, array: npt.NDArray[np.float32], authority: str = "aisi"
) -> SignatureRow:
    windows = pool_windows(array)
    return SignatureRow(capability, authority, polarity, TENSOR, windows[0], windows)


def teach(reg: Registry, rows: list[SignatureRow], seq: int) -> str:
    batch = reg.stage_signatures(rows, session=SESSION)
    reg.commit(batch, seq)
    return batch


def test_the_model_is_fitted_from_the_stored_windows(reg: Registry) -> None:
    rows = [row("bio", POS, activation(i, shift=0)) for i in range(3)]
    rows += [row("cyber", POS, activation(10 + i, shift=1)) for i in range(3)]
    rows += [row("bio", NEG, activation(20 + i)) for i in range(4)]
    teach(reg, rows, seq=5)
    model = reg.centroid_model("aisi", TENSOR, DIM)
    assert model is not None
    direct = fit([Sample(r.capability, r.polarity, pool_windows_of(r)) for r in rows])
    assert model.digest == direct.digest
    assert model.capabilities == ("bio", "cyber")
    probe = pool_windows(activation(99, shift=0))
    assert score_v2(model, probe) == score_v2(direct, probe)
    assert score_v2(model, probe)["bio"] > score_v2(model, probe)["cyber"]
    assert reg.centroid_model("aisi", TENSOR, DIM + 1) is None
    assert reg.centroid_model("someone-else", TENSOR, DIM) is None


def pool_windows_of(r: SignatureRow) -> npt.NDArray[np.float32]:
    assert r.windows is not None
    return np.asarray(r.windows, dtype=np.float32)


def test_calibration_is_recorded_at_every_commit(reg: Registry) -> None:
    teach(reg, [row("bio", POS, activation(1, shift=0))], seq=3)
    first = reg.calibrations("aisi")
    assert [(c.capability, c.threshold, c.statement_seq) for c in first] == [("bio", 0, 3)]
    teach(reg, [row("bio", NEG, activation(i)) for i in range(2, 6)], seq=4)
    second = reg.calibrations("aisi")
    model = reg.centroid_model("aisi", TENSOR, DIM)
    assert model is not None
    assert {c.capability: c.threshold for c in second} == model.calibration()
    assert [c.model_sha256 for c in second] == [model.digest.hex()]
    assert second[0].statement_seq == 4
    assert second[0].threshold > 0  # fitted from the negatives just written
    assert (second[0].tensor, second[0].dim) == (TENSOR, DIM)
    assert reg.calibrations("nobody") == []


def test_negatives_alone_record_no_calibration(reg: Registry) -> None:
    teach(reg, [row("bio", NEG, activation(i)) for i in range(3)], seq=1)
    assert reg.centroid_model("aisi", TENSOR, DIM) is None
    assert reg.calibrations("aisi") == []


def test_a_model_is_per_authority(reg: Registry) -> None:
    teach(reg, [row("bio", POS, activation(1, shift=0))], seq=1)
    teach(reg, [row("cyber", POS, activation(2, shift=1), authority="ukaisi")], seq=2)
    aisi = reg.centroid_model("aisi", TENSOR, DIM)
    ukaisi = reg.centroid_model("ukaisi", TENSOR, DIM)
    assert aisi is not None
    assert ukaisi is not None
    assert aisi.capabilities == ("bio",)
    assert ukaisi.capabilities == ("cyber",)


def test_a_commit_replaces_the_cached_model(reg: Registry) -> None:
    teach(reg, [row("bio", POS, activation(1, shift=0))], seq=1)
    before = reg.centroid_model("aisi", TENSOR, DIM)
    assert before is reg.centroid_model("aisi", TENSOR, DIM)  # cached
    teach(reg, [row("bio", POS, activation(2, shift=0))], seq=2)
    after = reg.centroid_model("aisi", TENSOR, DIM)
    assert before is not None
    assert after is not None
    assert after.digest != before.digest


def test_recovery_calibrates_with_the_statement_seq_it_found(reg: Registry) -> None:
    teach(reg, [row("bio", POS, activation(1, shift=0))], seq=1)
    batch = reg.stage_signatures([row("bio", NEG, activation(7))], session=SESSION)
    assert reg.calibrations("aisi")[0].threshold == 0  # pending rows change nothing
    reg.recover({batch: 12})
    recorded = reg.calibrations("aisi")
    assert recorded[0].statement_seq == 12
    model = reg.centroid_model("aisi", TENSOR, DIM)
    assert model is not None
    assert recorded[0].model_sha256 == model.digest.hex()


@pytest.mark.parametrize(
    ("windows", "message"),
    [
        (np.zeros((2, DIM + 1), np.float32), "windows of shape"),
        (np.zeros((0, DIM), np.float32), "windows of shape"),
        (np.ones((2, 2, DIM), np.float32), "windows of shape"),
        (np.full((2, DIM), np.nan, np.float32), "non-finite"),
        (np.ones((2, DIM), np.float32) * 2, "first window is not its vector"),
    ],
)
def test_bad_windows_are_refused_at_staging(
    reg: Registry, windows: npt.NDArray[np.float32], message: str
) -> None:
    vector = np.ones(DIM, np.float32)
    with pytest.raises(ValueError, match=message):
        reg.stage_signatures([SignatureRow("bio", "aisi", POS, TENSOR, vector, windows)])
    assert reg.pending_batches() == []


def test_a_row_without_windows_is_a_one_window_sample(reg: Registry) -> None:
    vector = pool_windows(activation(3, shift=0))[0]
    teach(reg, [SignatureRow("bio", "aisi", POS, TENSOR, vector)], seq=1)
    model = reg.centroid_model("aisi", TENSOR, DIM)
    assert model is not None
    assert model.digest == fit([Sample("bio", POS, vector[None, :])]).digest


def _downgrade_to_schema_1(path: Path) -> None:
    """The file as schema 1 left it: no windows column, no calibrations table."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TABLE calibrations")
        conn.execute("ALTER TABLE signatures DROP COLUMN windows")
        conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    finally:
        conn.close()


def test_a_schema_1_file_is_migrated_once_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "registry.sqlite"
    vector = pool_windows(activation(3, shift=0))[0]
    with Registry.open(path) as reg:
        teach(reg, [SignatureRow("bio", "aisi", POS, TENSOR, vector)], seq=1)
    _downgrade_to_schema_1(path)
    with (
        caplog.at_level(logging.WARNING, logger="embassy.metering.registry"),
        Registry.open(path) as reg,
    ):
        model = reg.centroid_model("aisi", TENSOR, DIM)
        assert model is not None  # the old row reads as its mean
        teach(reg, [row("bio", NEG, activation(9))], seq=2)
        assert reg.calibrations("aisi")[0].statement_seq == 2
    assert "schema 1 migrated to 2" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embassy.metering.registry"):
        Registry.open(path).close()
    assert "migrated" not in caplog.text


def test_an_unknown_schema_is_refused_not_migrated(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    Registry.open(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE meta SET value = '7' WHERE key = 'schema_version'")
    conn.close()
    with pytest.raises(StorageError, match="schema version '7'"):
        Registry.open(path)
