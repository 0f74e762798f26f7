"""Every statement kind the daemon makes is a valid in-toto Statement v1, checked by an
independent reader (tests/unit/wire/intoto_v1.py); and that reader refuses what breaks the
rules, as the embassy's own parser does."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from embassy.daemon.runtime import Embassy
from embassy.errors import InstructionSignatureError, WireFormatError
from embassy.log.entry import EntryType, parse_entry
from embassy.metering.instruction import Op, Polarity
from embassy.wire.codec import canonical_json
from embassy.wire.statement import (
    ACTIVATION_REJECTED_V1,
    ACTIVATION_REJECTED_V2,
    INSTRUCTION_REFUSED_V1,
    JOB_ABORTED_V1,
    JOB_DESTROYED_V1,
    JOB_STARTED_V1,
    KNOWN_PREDICATES,
    LIFECYCLE_V1,
    METER_UPDATE_V1,
    METER_UPDATE_V2,
    SEAL_V1,
    SESSION_ABORT_V1,
    SIGNATURE_WRITE_V1,
    SIGNATURE_WRITE_V2,
    UNSEAL_V1,
    WEIGHTS_KEY_DENIED_V1,
    WEIGHTS_KEY_RELEASED_V1,
    parse_statement,
)
from tests.fakes import FakeTpm, FakeWorkloadRuntime, MemorySeal
from tests.unit.conftest import EmbassyFactory
from tests.unit.daemon.test_metering import AISI, AUTHORITIES, RIGHTS, Authority, begin, feed
from tests.unit.daemon.test_weights_keys import release_and_deny
from tests.unit.jobs.test_service import drive_job_kinds
from tests.unit.sessions.test_manager import Clock, manager, release_key
from tests.unit.verify.conftest import WORKLOAD
from tests.unit.wire.intoto_v1 import envelope_violations, statement_violations
from workload_sdk.activations import file_name

# Predicate types only older embassies made (still read, never written).
LEGACY = {
    SEAL_V1,
    UNSEAL_V1,
    SESSION_ABORT_V1,
    METER_UPDATE_V1,
    SIGNATURE_WRITE_V1,
    INSTRUCTION_REFUSED_V1,
    ACTIVATION_REJECTED_V1,
    # One statement per file, before group commit (meter-batch:v1).
    METER_UPDATE_V2,
    SIGNATURE_WRITE_V2,
}


def _vector(i: int) -> np.ndarray:
    v = np.zeros(8, dtype=np.float32)
    v[i] = 1.0
    return np.stack([v, v * 2])


def _drive_every_kind(embassy: Embassy, tmp_path: Path) -> None:
    """Make the embassy state each kind of statement it has (identity is made at start)."""
    aisi = Authority(embassy, AISI, "aisi")
    # meter-batch (a signature write), then meter-batch (a meter update) and meter-reading
    session, _ = begin(embassy, [aisi.instruction(Op.WRITE, ["cyber"], Polarity.POSITIVE)])
    feed(embassy, tmp_path, session, [_vector(0)])
    assert embassy.metering.finish(session, lambda: 0) is not None
    session, _ = begin(embassy, [aisi.instruction(Op.UPDATE, ["cyber"])])
    feed(embassy, tmp_path, session, [_vector(0)])
    assert embassy.metering.finish(session, lambda: 0) is not None
    begin(embassy, [aisi.instruction(Op.READ, [])])
    # instruction-refused (signed by another authority's key)
    with pytest.raises(InstructionSignatureError):
        begin(embassy, [Authority(embassy, RIGHTS, "aisi").instruction(Op.UPDATE, ["cyber"])])
    # activation-rejected: one charged to a session, one to nobody
    session, _ = begin(embassy, [])
    (tmp_path / "junk.act").write_bytes(b"junk")
    embassy.metering.handle(tmp_path / "junk.act")
    (tmp_path / file_name(session, 0)).write_bytes(b"junk")
    embassy.metering.handle(tmp_path / file_name(session, 0))
    embassy.metering.flush(final=True)
    # seal, unseal, session-abort, lifecycle (reconcile), through the session manager
    m = manager(embassy, MemorySeal(), Clock())
    opened = m.open(60, release=release_key)
    m.close(opened.session, m._token(opened.session), bytes(32))
    m.open(60, release=release_key)
    assert m.abort_all("intrusion") == 1
    m.reconcile()


def _logged_envelopes(data_dir: Path) -> list[bytes]:
    entries = [parse_entry(line) for line in (data_dir / "log.jsonl").read_bytes().splitlines()]
    return [e.data for e in entries if e.type is EntryType.STATEMENT]


def test_every_statement_kind_the_daemon_makes_is_valid_in_toto_v1(
    make_embassy: EmbassyFactory, tpm: FakeTpm, tmp_path: Path
) -> None:
    with FakeWorkloadRuntime():  # a launched workload: it may ask for weights keys
        embassy = make_embassy(tpm, extra={**AUTHORITIES, "workload": WORKLOAD})
    _drive_every_kind(embassy, tmp_path)
    release_and_deny(embassy, tpm)  # weights-key-released and weights-key-denied
    drive_job_kinds(embassy, tmp_path / "jobs")  # job-started, -destroyed, -aborted
    make_embassy._running.remove(embassy)  # closed here, not by the fixture's teardown
    embassy.close()  # the stop statement
    envelopes = _logged_envelopes(tmp_path / "embassy")
    kinds: dict[str, int] = {}
    subjects: dict[str, set[str]] = {}
    for envelope in envelopes:
        assert envelope_violations(envelope) == [], envelope
        payload = base64.b64decode(json.loads(envelope)["payload"])
        statement = parse_statement(payload)
        assert statement.encode() == payload  # one byte form: what was signed re-encodes
        kinds[statement.predicate_type] = kinds.get(statement.predicate_type, 0) + 1
        subjects[statement.predicate_type] = {s.name.split(":")[0] for s in statement.subjects}
    # Every kind a current embassy writes was made and checked: a new kind must join here.
    assert set(kinds) == KNOWN_PREDICATES - LEGACY
    # A statement about no artifact of its own is about the embassy (its signing key).
    assert subjects[LIFECYCLE_V1] == {"embassy-signing-key"}
    # A weights-key statement is about the key request (the digest the broker's log names).
    assert (
        subjects[WEIGHTS_KEY_RELEASED_V1] == subjects[WEIGHTS_KEY_DENIED_V1] == {"weights-request"}
    )
    # A job's statements are about the job (SHA-256 of its id).
    assert subjects[JOB_STARTED_V1] == subjects[JOB_DESTROYED_V1] == {"job"}
    assert subjects[JOB_ABORTED_V1] == {"job"}
    assert kinds[ACTIVATION_REJECTED_V2] == 2  # one charged to a session, one to nobody


def _good() -> dict[str, Any]:
    return {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "a", "digest": {"sha256": "ab" * 32}}],
        "predicateType": "urn:embassy:predicate:lifecycle:v1",
        "predicate": {},
    }


def test_the_checker_accepts_a_valid_statement() -> None:
    assert statement_violations(canonical_json(_good())) == []
    # Other algorithms of the DigestSet, and a subject without a name, are valid in-toto.
    other = _good()
    other["subject"] = [{"digest": {"sha512": "0" * 128, "gitCommit": "1" * 40}}]
    assert statement_violations(canonical_json(other)) == []


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        (lambda o: o.update(subject=[]), "subject: a non-empty list"),
        (lambda o: o.pop("subject"), "subject: a non-empty list"),
        (lambda o: o["subject"][0].pop("digest"), "subject[0].digest: a Statement's subject"),
        (lambda o: o["subject"][0].update(digest={}), "at least one digest"),
        (lambda o: o["subject"][0].update(digest={"sha256": "AB" * 32}), "not lower-case hex"),
        (lambda o: o["subject"][0].update(digest={"sha256": "ab" * 31}), "62 hex digits"),
        (lambda o: o["subject"][0].update(digest={"sha1": "ab" * 32}), "64 hex digits"),
        (lambda o: o["subject"][0].update(name=7), "subject[0].name: expected a string"),
        (lambda o: o["subject"].append(dict(o["subject"][0])), "subject[1].name: 'a' repeats"),
        (lambda o: o.update(_type="https://in-toto.io/Statement/v0.1"), "_type"),
        (lambda o: o.update(predicateType="lifecycle"), "predicateType: 'lifecycle' is not"),
        (lambda o: o.update(predicate=[]), "predicate: expected an object"),
    ],
)
def test_the_checker_refuses_what_breaks_a_rule(
    change: Callable[[dict[str, Any]], None], rule: str
) -> None:
    obj = _good()
    change(obj)
    violations = statement_violations(json.dumps(obj).encode())
    assert any(rule in v for v in violations), violations


@pytest.mark.parametrize(
    ("subject", "reason"),
    [
        ([], r"statement\.subject: empty"),
        ([{"name": "a"}], r"subject\[0\]: missing field 'digest'"),
        ([{"name": "a", "digest": {}}], r"subject\[0\]\.digest: missing field 'sha256'"),
        ([{"name": "", "digest": {"sha256": "ab" * 32}}], r"subject\[0\]\.name: empty"),
        (
            [{"name": "a", "digest": {"sha256": "ab" * 32, "md5": "0" * 32}}],
            r"subject\[0\]\.digest: unknown field\(s\) 'md5'",
        ),
        (
            [{"name": "a", "digest": {"sha256": "ab" * 31}}],
            r"subject\[0\]\.digest\.sha256: expected 32 bytes, got 31",
        ),
        (
            [{"name": "a", "digest": {"sha256": "ab" * 32}}] * 2,
            r"subject\[1\]\.name: 'a' is also subject\[0\]'s",
        ),
    ],
)
def test_the_embassy_parser_refuses_subjects_that_break_the_rules(
    subject: list[dict[str, Any]], reason: str
) -> None:
    """The embassy reads a subset of in-toto (sha256 only, names required and unique); what
    breaks the in-toto rules is refused with the field that breaks them."""
    good = base64.b64decode(
        json.loads((Path(__file__).parents[2] / "vectors" / "good-statement-payload.json")
                   .read_bytes())["input"]["payload_b64"]
    )  # fmt: skip
    obj = json.loads(good)
    obj["subject"] = subject
    with pytest.raises(WireFormatError, match=reason):
        parse_statement(canonical_json(obj))
