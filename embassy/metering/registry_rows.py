"""The registry's row types and the checks on what is staged (pure: no SQL but reads).

Part of :mod:`embassy.metering.registry`, which re-exports the row types.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.metering.formula_v2 import Sample
from embassy.metering.score import Polarity

HEX = re.compile(r"(?:[0-9a-f]{2})+")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
VECTOR_DTYPE = np.dtype("<f4")  # float32, little-endian, whatever the host's byte order


@dataclass(frozen=True, slots=True, eq=False)
class SignatureRow:
    """One signature to stage: ``vector`` is stored as given (float32), normalised on use."""

    capability: str
    authority: str
    polarity: Polarity
    tensor: str
    vector: npt.NDArray[Any]
    # Formula v2's pooled windows of the activation ((m, d), row 0 equal to ``vector``);
    # None stores the mean alone, which v2 then reads as a one-window sample.
    windows: npt.NDArray[Any] | None = None


@dataclass(frozen=True, slots=True)
class Meter:
    capability: str
    authority: str
    value: int  # cumulative, micro-units
    count: int  # committed updates applied
    last_seq: int  # log seq of the latest statement that moved it


@dataclass(frozen=True, slots=True)
class Update:
    id: int
    batch: str
    capability: str
    authority: str
    delta: int
    session: str
    activation_sha256: str
    statement_seq: int


@dataclass(frozen=True, slots=True)
class Calibration:
    """A capability's v2 calibration, recorded when its model was last refitted."""

    capability: str
    tensor: str
    dim: int
    threshold: int  # micro-units
    model_sha256: str  # the fitted model's digest (hex), as meter-update statements name it
    statement_seq: int  # the signatures batch's statement that refitted it


@dataclass(frozen=True, slots=True)
class FileProgress:
    """One activation file a session's metering handled (``stage_group``)."""

    session: str
    seq: int
    activation_sha256: str
    bytes: int
    signatures_written: int
    meter_updates: int


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """An open session's persisted metering: instructions in order, files in seq order."""

    session: str
    refused: int
    instructions: tuple[bytes, ...]
    files: tuple[FileProgress, ...]


@dataclass(frozen=True, slots=True)
class Recovery:
    committed: tuple[str, ...]
    discarded: tuple[str, ...]


def text(value: object, what: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"registry: {what} must be a non-empty string")
    return value


def hex_field(value: object, what: str, pattern: re.Pattern[str] = HEX) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"registry: {what} must be lowercase hex")
    return value


def owner(conn: sqlite3.Connection, capability: str, *, pending: bool) -> str | None:
    """The authority a capability belongs to: its meter's, else its signatures'."""
    row = conn.execute(
        "SELECT authority FROM meters WHERE capability = ?", (capability,)
    ).fetchone()
    if row is not None:
        return str(row[0])
    # Staging signatures also checks pending rows: two authorities must not race for a name.
    sql = "SELECT authority FROM signatures WHERE capability = ?"
    if not pending:
        sql += " AND state = 'committed'"
    row = conn.execute(sql + " LIMIT 1", (capability,)).fetchone()
    return None if row is None else str(row[0])


def samples(conn: sqlite3.Connection, authority: str, tensor: str, dim: int) -> list[Sample]:
    """An authority's committed signatures of (tensor, dim) as formula v2 samples."""
    samples = []
    for capability, polarity, vector, windows in conn.execute(
        "SELECT capability, polarity, vector, windows FROM signatures"
        " WHERE authority = ? AND tensor = ? AND dim = ? AND state = 'committed' ORDER BY id",
        (authority, tensor, dim),
    ):
        raw = vector if windows is None else windows
        matrix = np.frombuffer(raw, dtype=VECTOR_DTYPE).reshape(-1, dim)
        samples.append(Sample(capability, Polarity(polarity), matrix))
    return samples


def prepare_signature(row: SignatureRow) -> tuple[str, str, str, str, int, bytes, bytes | None]:
    text(row.capability, "capability")
    text(row.authority, "authority")
    text(row.tensor, "tensor")
    if not isinstance(row.polarity, Polarity):
        raise TypeError("registry: polarity must be a score.Polarity")
    vector = np.asarray(row.vector, dtype=VECTOR_DTYPE)
    if vector.ndim != 1 or vector.size == 0:
        raise ValueError(f"registry: a signature vector is 1-D, not of shape {vector.shape}")
    if not np.isfinite(vector).all() or not vector.any():
        raise ValueError("registry: a signature vector must be finite and not all zero")
    windows = None
    if row.windows is not None:
        matrix = np.asarray(row.windows, dtype=VECTOR_DTYPE)
        if matrix.ndim != 2 or matrix.shape[0] == 0 or matrix.shape[1] != vector.size:
            raise ValueError(
                f"registry: windows of shape {matrix.shape} for a vector of {vector.size}"
            )
        if not np.isfinite(matrix).all():
            raise ValueError("registry: non-finite values in a signature's windows")
        # Row 0 is the mean the vector column holds: v1 and v2 read one activation alike.
        if matrix[0].tobytes() != vector.tobytes():
            raise ValueError("registry: a signature's first window is not its vector")
        windows = np.ascontiguousarray(matrix).tobytes()
    return (
        row.capability,
        row.authority,
        row.polarity.value,
        row.tensor,
        int(vector.size),
        vector.tobytes(),
        windows,
    )
