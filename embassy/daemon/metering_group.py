"""One group of activation files: checked by name, read and scored in parallel, one statement.

The metering service (``embassy.daemon.metering``) hands the files that are ready together
to :func:`admit`, which decides from names and sizes alone (no byte read) which are worth
reading; each is then read by :func:`read_job` (in a reader process:
``embassy.daemon.activation_reader``), which returns only its :class:`Rows` or its verdict,
scored by :func:`prepare` in the daemon, and the group's ``meter-batch`` statement is built
by :func:`batch_statement`.

What a ``meter-batch:v1`` statement carries (docs/protocol.md): the registry batch ids, and
per session the seq range and count of the files handled, each signature write (seq,
instruction, authority, capability, polarity, tensor digest, dimension) and each meter
update (seq, authority, capabilities, formula, model digest, tensor digest). Its subjects
are the activations' SHA-256 checksums. Never meter values, never a name the workload chose
(tensor names are digests; the subjects' names are the embassy's session ids and the
sequence numbers it checked).

Pure but for the file read in :func:`read_rows` and the registry's cached model lookup.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embassy.errors import (
    ActivationCorruptError,
    ActivationError,
    ActivationForeignError,
    ActivationOversizedError,
    ActivationSequenceError,
    EmbassyError,
)
from embassy.metering.activation import read_activation_file
from embassy.metering.formula_v2 import (
    FORMULA_V2,
    CentroidModel,
    pool_windows,
    score_v2,
)
from embassy.metering.instruction import Instruction, Op
from embassy.wire.statement import Subject

FOREIGN = ActivationForeignError.code


def tensor_digest(tensor: str) -> str:
    """The tensor name as statements carry it: its SHA-256 (hex). The name is the
    workload's choice (128 characters a file, which would be a channel); an authority
    recomputes the digest of the names it cares about."""
    return hashlib.sha256(tensor.encode("ascii")).hexdigest()


@dataclass(frozen=True, slots=True)
class Candidate:
    """A file whose name passed: an open session's, in sequence, within its limits."""

    path: Path
    session: bytes
    seq: int
    size: int


@dataclass(frozen=True, slots=True)
class Refusal:
    """A file refused (by name, or once read): its code and size, charged to ``session``."""

    path: Path
    session: bytes | None
    code: str
    size: int
    error: EmbassyError | None = None  # a failure that is not the file's (logged by type)


@dataclass(frozen=True, slots=True)
class Update:
    authority: str
    deltas: Mapping[str, int]
    model_sha256: str


@dataclass(frozen=True, slots=True)
class Job:
    """One candidate as a reader (a worker process) is given it: its name's fields."""

    path: str
    session: bytes
    seq: int
    max_bytes: int
    nonzero: bool  # a write instruction needs a mean that is not the zero vector


@dataclass(frozen=True, slots=True)
class Rows:
    """What metering needs of one good file: never its data, only formula v2's rows."""

    tensor: str
    sha256: bytes
    nbytes: int  # the data's size (the summary's "bytes")
    windows: npt.NDArray[np.float32]


@dataclass(slots=True)
class Prepared:
    """A candidate read, checked and scored (or refused: ``refusal``)."""

    candidate: Candidate
    rows: Rows | None = None
    updates: tuple[Update, ...] = ()
    refusal: Refusal | None = None


@dataclass(frozen=True, slots=True)
class Expected:
    """What :func:`admit` needs of one open session."""

    next_seq: int
    files: int
    instructions: tuple[Instruction, ...]


def admit(
    named: Sequence[tuple[Path, bytes | None, int, int]],
    sessions: Mapping[bytes, Expected],
    max_files: int,
    max_bytes: int,
) -> tuple[list[Candidate], list[Refusal]]:
    """Judge files by name and size only: (path, session or None, seq, size) each.

    A file of no open session is foreign; in each session, files are taken in seq order and
    must follow on from the session's next seq (a gap or a repeat is out of sequence), and
    stay within the session's file limit and the size limit. Nothing is read.
    """
    candidates: list[Candidate] = []
    refusals: list[Refusal] = []
    expected = {s: (e.next_seq, e.files) for s, e in sessions.items()}
    for path, session, seq, size in sorted(named, key=lambda n: (n[1] or b"", n[2], n[0].name)):
        if session is None or session not in expected:
            refusals.append(Refusal(path, None, FOREIGN, size))
            continue
        next_seq, files = expected[session]
        if size > max_bytes:
            code = ActivationOversizedError.code
        elif seq != next_seq:
            code = ActivationSequenceError.code
        elif files >= max_files:
            code = ActivationOversizedError.code
        else:
            candidates.append(Candidate(path, session, seq, size))
            expected[session] = (next_seq + 1, files + 1)
            continue
        refusals.append(Refusal(path, session, code, size))
    return candidates, refusals


def read_rows(job: Job) -> Rows:
    """Read one candidate strictly, check it against its name and pool it (formula v2's
    windows). Raises ``ActivationError`` for what the file holds, ``OSError`` when it
    cannot be read."""
    activation = read_activation_file(Path(job.path), max_bytes=job.max_bytes)
    if (activation.session, activation.seq) != (job.session, job.seq):
        raise ActivationCorruptError("activation: header and file name disagree")
    windows = pool_windows(activation.data)
    if job.nonzero and not windows[0].any():
        raise ActivationCorruptError("activation: its mean is the zero vector")
    return Rows(activation.tensor, activation.sha256, activation.data.nbytes, windows)


def read_job(job: Job) -> Rows | str:
    """:func:`read_rows`, or the refusal's code: what a reader process sends back. ""
    for a file gone before it was read (not counted); ``activation-foreign`` for one the
    embassy could not read (rejected all the same: a workload must not stall the intake)."""
    try:
        return read_rows(job)
    except FileNotFoundError:
        return ""
    except OSError:
        return FOREIGN
    except ActivationError as exc:
        return exc.code


def job_of(candidate: Candidate, instructions: Sequence[Instruction], max_bytes: int) -> Job:
    return Job(
        str(candidate.path),
        candidate.session,
        candidate.seq,
        max_bytes,
        any(i.op is Op.WRITE for i in instructions),
    )


def prepare(
    candidate: Candidate,
    read: Rows | str,
    instructions: Sequence[Instruction],
    *,
    model: Callable[[str, str, int], CentroidModel | None],
) -> Prepared:
    """Score a candidate's rows for each authority with an update instruction (or note its
    refusal). Never raises for what the file holds: a refusal says why."""
    out = Prepared(candidate)
    if isinstance(read, str):
        out.refusal = Refusal(
            candidate.path, candidate.session, read, candidate.size if read else 0
        )
        return out
    try:
        out.updates = _score(read, instructions, model)
    except EmbassyError as exc:  # the registry (a model that does not load)
        out.refusal = Refusal(candidate.path, candidate.session, exc.code, candidate.size, exc)
        return out
    out.rows = read
    return out


def _score(
    rows: Rows,
    instructions: Sequence[Instruction],
    model: Callable[[str, str, int], CentroidModel | None],
) -> tuple[Update, ...]:
    """Formula v2, per authority with an update instruction, restricted to its capabilities."""
    wanted: dict[str, set[str]] = {}
    for instruction in instructions:
        if instruction.op is Op.UPDATE:
            wanted.setdefault(instruction.authority, set()).update(instruction.capabilities)
    updates = []
    for authority, capabilities in sorted(wanted.items()):
        fitted = model(authority, rows.tensor, int(rows.windows.shape[1]))
        if fitted is None:
            continue  # no signature of this authority for this tensor: nothing to meter
        scores = score_v2(fitted, rows.windows)
        deltas = {c: scores[c] for c in sorted(capabilities) if c in scores}
        if deltas:
            updates.append(Update(authority, deltas, fitted.digest.hex()))
    return tuple(updates)


@dataclass
class SessionPart:
    """One session's share of a group, as its statement states it."""

    session: bytes
    seqs: list[int] = field(default_factory=list)
    writes: list[dict[str, Any]] = field(default_factory=list)
    updates: list[dict[str, Any]] = field(default_factory=list)
    subjects: list[Subject] = field(default_factory=list)

    def add(self, prepared: Prepared, instructions: Sequence[Instruction]) -> tuple[int, int]:
        """Note one accepted file; return (signature writes, meter updates) it makes."""
        rows, seq = prepared.rows, prepared.candidate.seq
        assert rows is not None
        self.seqs.append(seq)
        tensor = tensor_digest(rows.tensor)
        writes = 0
        for instruction in instructions:
            if instruction.op is Op.WRITE:
                assert instruction.polarity is not None  # parse_instruction ensures it
                writes += 1
                self.writes.append(
                    {
                        "seq": seq,
                        "instruction_sha256": instruction.digest.hex(),
                        "authority": instruction.authority,
                        "capability": instruction.capabilities[0],
                        "polarity": instruction.polarity.value,
                        "tensor_sha256": tensor,
                        "dim": int(rows.windows.shape[1]),
                    }
                )
        for update in prepared.updates:
            self.updates.append(
                {
                    "seq": seq,
                    "authority": update.authority,
                    "capabilities": sorted(update.deltas),
                    "formula": FORMULA_V2,
                    "model_sha256": update.model_sha256,
                    "tensor_sha256": tensor,
                }
            )
        if writes or prepared.updates:
            self.subjects.append(Subject(f"activation:{self.session.hex()}:{seq}", rows.sha256))
        return writes, len(prepared.updates)

    def body(self) -> dict[str, Any]:
        return {
            "session": self.session.hex(),
            "seq": [min(self.seqs), max(self.seqs)],
            "files": len(self.seqs),
            "signature_writes": self.writes,
            "meter_updates": self.updates,
        }


def batch_statement(
    batches: Sequence[str], parts: Sequence[SessionPart]
) -> tuple[list[Subject], dict[str, Any]]:
    """The ``meter-batch:v1`` statement of one group: subjects and body."""
    subjects = [s for part in parts for s in part.subjects]
    body = {
        "batches": list(batches),
        "sessions": [part.body() for part in parts if part.seqs],
    }
    return subjects, body
