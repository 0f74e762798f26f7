"""Log entries, checkpoints and segments, and the daemon's StatementLog recovery."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from embassy.config import parse_config
from embassy.daemon.keys import derive_keys
from embassy.daemon.statement_log import StatementLog
from embassy.errors import LogIntegrityError, TamperError, TpmError, WireFormatError
from embassy.log.entry import (
    GENESIS,
    Checkpoint,
    EntryType,
    LogEntry,
    checkpoint_qualifying_data,
    encode_entry,
    parse_checkpoint,
    parse_entry,
)
from embassy.log.segment import Segment, check_chain, extend, parse_segment, replay
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import LIFECYCLE_V1
from tests.fakes import FakeTpm
from tests.unit.conftest import EmbassyFactory


def chain(n: int, reset_count: int = 1) -> list[LogEntry]:
    out, prev = [], GENESIS
    for seq in range(n):
        entry = encode_entry(
            seq=seq, prev=prev, reset_count=reset_count, pcr=14, type=EntryType.STATEMENT,
            data=f"entry {seq}".encode(),
        )  # fmt: skip
        out.append(entry)
        prev = entry.digest
    return out


# -- entries --------------------------------------------------------------------------------


def test_entry_round_trip() -> None:
    entry = chain(3)[2]
    parsed = parse_entry(entry.raw)
    assert parsed == entry
    assert parsed.digest == hashlib.sha256(entry.raw).digest()
    assert json.loads(entry.raw) == {
        "data": "ZW50cnkgMg==",
        "pcr": 14,
        "prev": chain(2)[1].digest.hex(),
        "reset_count": 1,
        "seq": 2,
        "type": "statement",
        "v": 1,
    }
    assert canonical_json(json.loads(entry.raw)) == entry.raw


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"v": 2}, "unsupported version 2"),
        ({"seq": -1}, "out of range"),
        ({"pcr": 24}, "out of range"),
        ({"type": "note"}, "unknown type 'note'"),
        ({"prev": "00"}, "expected 32 bytes"),
        ({"extra": 0}, "unknown field"),
    ],
)
def test_entry_parse_refuses(change: dict[str, Any], reason: str) -> None:
    obj = {**json.loads(chain(1)[0].raw), **change}
    with pytest.raises(WireFormatError, match=reason):
        parse_entry(canonical_json(obj))


def test_checkpoint_round_trip(tpm: FakeTpm) -> None:
    head = chain(2)[1]
    quote = tpm.quote([13, 14], checkpoint_qualifying_data(head.seq, head.digest))
    checkpoint = Checkpoint(head.seq, head.digest, quote)
    assert parse_checkpoint(json.loads(canonical_json(checkpoint.to_json()))) == checkpoint


def test_checkpoint_qualifying_data_binds_seq_and_head() -> None:
    a = checkpoint_qualifying_data(1, b"\x01" * 32)
    assert a != checkpoint_qualifying_data(2, b"\x01" * 32)
    assert a != checkpoint_qualifying_data(1, b"\x02" * 32)


def test_checkpoint_refuses_bad_pcr_index(tpm: FakeTpm) -> None:
    obj = Checkpoint(0, bytes(32), tpm.quote([14], b"n")).to_json()
    obj["quote"]["pcrs"] = {"014": "00" * 32}
    with pytest.raises(WireFormatError, match="bad PCR index '014'"):
        parse_checkpoint(obj)


def test_segment_round_trip(tpm: FakeTpm) -> None:
    entries = chain(3)
    closing = Checkpoint(2, entries[2].digest, tpm.quote([14], b"n"))
    segment = Segment(None, tuple(entries), closing)
    assert parse_segment(json.loads(canonical_json(segment.to_json()))) == segment


# -- chain checks ---------------------------------------------------------------------------


def test_chain_accepts_an_intact_chain() -> None:
    entries = chain(4)
    check_chain(entries, after_seq=None, after=None)
    check_chain(entries[2:], after_seq=1, after=entries[1].digest)


def test_chain_gap() -> None:
    e = chain(4)
    with pytest.raises(LogIntegrityError, match="entry seq 3 follows seq 1: 1 entries missing"):
        check_chain([e[0], e[1], e[3]], after_seq=None, after=None)


def test_chain_duplicate() -> None:
    e = chain(3)
    with pytest.raises(LogIntegrityError, match=r"entry seq 1 appears twice \(duplicate\)"):
        check_chain([e[0], e[1], e[1], e[2]], after_seq=None, after=None)


def test_chain_reorder() -> None:
    e = chain(4)
    with pytest.raises(LogIntegrityError, match=r"entry seq 1 follows seq 3 \(reordered\)"):
        check_chain([e[2], e[3], e[1]], after_seq=None, after=None)


def test_chain_broken_link() -> None:
    e = chain(3)
    forged = encode_entry(
        seq=1, prev=hashlib.sha256(b"x").digest(), reset_count=1, pcr=14,
        type=EntryType.STATEMENT, data=b"x",
    )  # fmt: skip
    with pytest.raises(LogIntegrityError, match="entry seq 1 does not chain to its predecessor"):
        check_chain([e[0], forged], after_seq=None, after=None)


def test_chain_must_follow_the_named_predecessor() -> None:
    e = chain(3)
    with pytest.raises(LogIntegrityError, match="entry seq 2 does not chain"):
        check_chain(e[2:], after_seq=1, after=e[0].digest)
    with pytest.raises(LogIntegrityError, match="1 entries missing"):
        check_chain(e[2:], after_seq=0, after=None)


def test_replay_is_pcr_extend() -> None:
    e = chain(2)
    expected = extend(extend(bytes(32), e[0].digest), e[1].digest)
    assert replay(e, {}, [13, 14]) == {13: bytes(32), 14: expected}
    start = {14: b"\x05" * 32}
    assert replay(e[:1], start, [14]) == {14: hashlib.sha256(b"\x05" * 32 + e[0].digest).digest()}
    with pytest.raises(LogIntegrityError, match="extends PCR 14, not one of the log's PCRs"):
        replay(e, {}, [13])


# -- the daemon's log: recovery -------------------------------------------------------------


def open_log(data_dir: Path, tpm: FakeTpm) -> StatementLog:
    config = parse_config({"data_dir": str(data_dir), "socket": str(data_dir / "s.sock")})
    return StatementLog(
        data_dir=data_dir,
        tpm=tpm,
        keys=derive_keys(bytes(range(32))),
        pcrs=config.pcrs,
        checkpoint_every=100,
    )


def append(log: StatementLog, n: int) -> None:
    log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n})


def test_recover_finishes_an_interrupted_extend(
    tmp_path: Path, tpm: FakeTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = open_log(tmp_path, tpm)
    log.recover()
    append(log, 0)
    append(log, 1)

    def crash(pcr: int, digest: bytes) -> None:
        raise TpmError("power lost")

    monkeypatch.setattr(tpm, "extend", crash)
    with pytest.raises(TpmError, match="power lost"):
        append(log, 2)  # written and fsynced, never extended
    monkeypatch.undo()
    log.close()
    entries = list(log.entries)
    assert len(entries) == 3
    assert tpm.read_pcrs([14]) == replay(entries[:2], {}, [14])

    reopened = open_log(tmp_path, tpm)
    reopened.recover()
    assert tpm.read_pcrs([13, 14]) == replay(entries, {}, [13, 14])
    reopened.recover()  # now consistent: nothing more to do
    assert tpm.read_pcrs([13, 14]) == replay(entries, {}, [13, 14])
    reopened.close()


def test_recover_refuses_a_foreign_extend(tmp_path: Path, tpm: FakeTpm) -> None:
    log = open_log(tmp_path, tpm)
    append(log, 0)
    log.close()
    tpm.extend(14, hashlib.sha256(b"junk").digest())
    reopened = open_log(tmp_path, tpm)
    with pytest.raises(TamperError, match="the log does not match the TPM for boot 1: PCR 14"):
        reopened.recover()
    reopened.close()


def test_recover_refuses_an_entry_the_tpm_never_saw_twice(tmp_path: Path, tpm: FakeTpm) -> None:
    """Two unextended entries are not a crash (only the last can be): it is tampering."""
    log = open_log(tmp_path, tpm)
    append(log, 0)
    log.close()
    tpm.reset()
    log = open_log(tmp_path, tpm)
    log.recover()
    append(log, 1)
    append(log, 2)
    log.close()
    tpm.reset()
    tpm.reset_count -= 1  # the same boot number with PCRs at zero: both entries unextended
    reopened = open_log(tmp_path, tpm)
    with pytest.raises(TamperError, match="does not match the TPM"):
        reopened.recover()
    reopened.close()


def test_partial_last_line_is_dropped_on_open(tmp_path: Path, tpm: FakeTpm) -> None:
    log = open_log(tmp_path, tpm)
    append(log, 0)
    append(log, 1)
    log.close()
    path = tmp_path / "log.jsonl"
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"data":"AAAA","pcr":14,"pr')
    reopened = open_log(tmp_path, tpm)
    assert [e.seq for e in reopened.entries] == [0, 1]
    assert path.read_bytes() == whole
    reopened.recover()
    append(reopened, 2)
    assert [e.seq for e in reopened.entries] == [0, 1, 2]
    reopened.close()


def test_a_corrupt_complete_line_is_tampering(tmp_path: Path, tpm: FakeTpm) -> None:
    log = open_log(tmp_path, tpm)
    append(log, 0)
    log.close()
    path = tmp_path / "log.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"seq":0', b'"seq":-1'))
    with pytest.raises(TamperError, match=r"log\.jsonl line 1 is corrupt"):
        open_log(tmp_path, tpm)


def test_recover_refuses_a_log_from_a_later_boot(tmp_path: Path, tpm: FakeTpm) -> None:
    log = open_log(tmp_path, tpm)
    append(log, 0)
    log.close()
    rolled_back = FakeTpm(b"seed")
    rolled_back.reset_count = 0
    reopened = open_log(tmp_path, rolled_back)
    with pytest.raises(TamperError, match="after the TPM's current boot 0"):
        reopened.recover()
    reopened.close()


def test_recover_refuses_to_extend_a_line_it_did_not_sign(
    make_embassy: EmbassyFactory, tpm: FakeTpm
) -> None:
    """Someone who can write log.jsonl (but not sign) appends a chained, well-formed start
    event. Repair would extend it into the PCR and make it part of the verified log; it must
    be refused as tampering instead."""
    embassy = make_embassy(tpm)
    head = embassy.log.head
    assert head is not None
    make_embassy.crash(embassy)
    forged = encode_entry(
        seq=head.seq + 1, prev=head.digest, reset_count=tpm.reset_count, pcr=13,
        type=EntryType.EMBASSY_START, data=b'{"v":1}',
    )  # fmt: skip
    log_file = embassy.config.data_dir / "log.jsonl"
    log_file.write_bytes(log_file.read_bytes() + forged.raw + b"\n")
    before = tpm.read_pcrs([13, 14])
    with pytest.raises(TamperError, match="not one this embassy signed"):
        make_embassy(tpm)
    assert tpm.read_pcrs([13, 14]) == before, "nothing was extended"


def test_recover_extends_its_own_unextended_entry_after_a_crash(
    make_embassy: EmbassyFactory, tpm: FakeTpm
) -> None:
    embassy = make_embassy(tpm)
    head = embassy.log.head
    assert head is not None
    real_extend = tpm.extend

    def crash_before_extend(pcr: int, digest: bytes) -> None:
        raise RuntimeError("killed between fsync and extend")

    tpm.extend = crash_before_extend  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "half-done"})
    tpm.extend = real_extend  # type: ignore[method-assign]
    make_embassy.crash(embassy)
    assert (
        tpm.read_pcrs([14])
        != replay(
            [e for e in embassy.log.entries if e.reset_count == tpm.reset_count], {}, (13, 14)
        )[14]
    ), "the crash left the PCR one entry behind the file"
    restarted = make_embassy(tpm)  # recover() repairs, then the start event is appended
    entries = restarted.log.entries
    half_done = entries[head.seq + 1]
    assert half_done.type is EntryType.STATEMENT
    assert b"half-done" in parse_envelope(half_done.data).payload
    boot = [e for e in entries if e.reset_count == tpm.reset_count]
    assert tpm.read_pcrs([13, 14]) == replay(boot, {}, (13, 14))
