"""What the verifier replays for group-committed batches (ADR 0016), and each lie about a
batch it must refuse by name. Pure: entries made with encode_entry."""

from __future__ import annotations

import hashlib

import pytest

from embassy.errors import LogIntegrityError, WireFormatError
from embassy.log.entry import (
    GENESIS,
    MAX_BATCH_ENTRIES,
    EntryType,
    LogEntry,
    batch_digest,
    encode_entry,
    parse_entry,
)
from embassy.log.segment import extend, extends, last_commit, replay


def log_of(batches: list[tuple[int, ...] | None], *, pcr: int = 14) -> list[LogEntry]:
    """Entries chained from genesis; ``batches[i]`` is entry i's claimed batch (or None)."""
    out: list[LogEntry] = []
    prev = GENESIS
    for seq, batch in enumerate(batches):
        entry = encode_entry(
            seq=seq, prev=prev, reset_count=1, pcr=pcr, type=EntryType.STATEMENT,
            data=f"statement {seq}".encode(),
            batch=None if batch is None else (batch[0], batch[1]),
        )  # fmt: skip
        out.append(entry)
        prev = entry.digest
    return out


def test_a_batch_of_one_is_todays_entry_and_extend() -> None:
    (entry,) = log_of([None])
    assert entry.raw == (
        b'{"data":"c3RhdGVtZW50IDA=","pcr":14,"prev":"' + GENESIS.hex().encode()
        + b'","reset_count":1,"seq":0,"type":"statement","v":1}'
    )  # fmt: skip
    assert parse_entry(entry.raw) == entry
    assert replay([entry], {}, [14]) == {14: extend(bytes(32), entry.digest)}


def test_a_batch_is_one_extend_of_its_domain_separated_digest() -> None:
    entries = log_of([None, (1, 3), (1, 3), (1, 3), None])
    assert [parse_entry(e.raw) for e in entries] == entries
    digest = hashlib.sha256(
        b"embassy-log-batch-v1\x00" + (1).to_bytes(8, "big") + (3).to_bytes(8, "big")
        + b"".join(e.digest for e in entries[1:4])
    ).digest()  # fmt: skip
    assert batch_digest(1, 3, [e.digest for e in entries[1:4]]) == digest
    assert [(e.seq, d) for e, _, d in extends(entries)] == [
        (0, entries[0].digest),
        (3, digest),
        (4, entries[4].digest),
    ]
    expected = extend(extend(extend(bytes(32), entries[0].digest), digest), entries[4].digest)
    assert replay(entries, {}, [14]) == {14: expected}
    # not the same as extending each entry: a batch cannot be replayed as singles
    singles = bytes(32)
    for e in entries:
        singles = extend(singles, e.digest)
    assert singles != expected
    assert [last_commit(entries[:k]) for k in range(6)] == [0, 1, 1, 2, 3, 1]


@pytest.mark.parametrize(
    ("batches", "start", "message"),
    [
        pytest.param(
            [None, (1, 2), (1, 2), (7, 9)], 0,
            r"entry seq 3 claims batch \[7,9\], which does not hold it", id="range-elsewhere",
        ),
        pytest.param(
            [None, (1, 3), (1, 3), (1, 3)], 2,
            r"entry seq 2 is inside batch \[1,3\] but the entries before it \(from seq 1\) are "
            r"not here: a segment or its anchor falls inside a batch", id="starts-inside",
        ),
        pytest.param(
            [None, (1, 3), (1, 3)], 0,
            r"batch \[1,3\] is cut off after entry seq 2: its last 1 entries are missing",
            id="cut-off",
        ),
        pytest.param(
            [None, (1, 3), (1, 3), (2, 4), (2, 4)], 0,
            r"entry seq 3 lies in batch \[1,3\] but claims batch \[2,4\] \(overlapping",
            id="overlapping",
        ),
        pytest.param(
            [None, (1, 3), (1, 3), None], 0,
            r"entry seq 3 lies in batch \[1,3\] but claims no batch", id="member-claims-none",
        ),
    ],
)  # fmt: skip
def test_lying_batch_ranges_are_refused_by_name(
    batches: list[tuple[int, ...] | None], start: int, message: str
) -> None:
    entries = log_of(batches)[start:]
    with pytest.raises(LogIntegrityError, match=message):
        replay(entries, {}, [14])


def test_a_reordered_batch_is_refused() -> None:
    entries = log_of([None, (1, 3), (1, 3), (1, 3)])
    swapped = [entries[0], entries[1], entries[3], entries[2]]
    with pytest.raises(
        LogIntegrityError, match=r"batch \[1,3\]: entry seq 3 stands where seq 2 belongs"
    ):
        replay(swapped, {}, [14])


def test_a_batch_across_two_pcrs_is_refused() -> None:
    entries = log_of([(0, 1), (0, 1)])
    other = encode_entry(
        seq=1, prev=entries[0].digest, reset_count=1, pcr=13, type=EntryType.STATEMENT,
        data=b"statement 1", batch=(0, 1),
    )  # fmt: skip
    with pytest.raises(LogIntegrityError, match=r"entry seq 1 is extended into PCR 13"):
        replay([entries[0], other], {}, [13, 14])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ("[3,3]", r"\[3,3\] is not a range of two or more entries"),
        ("[4,3]", r"\[4,3\] is not a range of two or more entries"),
        ("[-1,3]", r"\[-1,3\] is not a range"),
        ("[1]", r"expected \[first, last\], two integers"),
        ("[true,3]", r"expected \[first, last\], two integers"),
        ('"1-3"', r"batch: expected list"),
        (f"[0,{MAX_BATCH_ENTRIES}]", rf"holds more than {MAX_BATCH_ENTRIES} entries"),
    ],
)
def test_malformed_batch_fields_do_not_parse(batch: str, message: str) -> None:
    (entry,) = log_of([None])
    raw = entry.raw.replace(b'{"data"', b'{"batch":' + batch.encode() + b',"data"')
    with pytest.raises(WireFormatError, match=message):
        parse_entry(raw)
