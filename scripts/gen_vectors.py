#!/usr/bin/env python3
"""Generate the pinned verifier test vectors in tests/vectors/ (good and hostile).

    python scripts/gen_vectors.py           # (re)write tests/vectors/
    python scripts/gen_vectors.py --check   # exit 1 if any file differs, is missing or extra

(``--check`` looks at every file under the directory, subdirectories included.)

Everything is deterministic: a FakeTpm seeded with a constant (deterministic ECDSA quotes,
a clock that ticks once per read), a fixed master secret (Ed25519 signing key) and a fixed
measurement. Two runs write byte-identical files, so CI diffs them against the committed ones.

Each vector is a JSON file::

    {"description": ..., "kind": "identity"|"log"|"evidence"|"statement"|"result"|"envelope"
     |"entry"|"statement-payload"|"payload", "input": {...}, "policy": {...},
     "expect": {"ok": true} | {"error": "<EmbassyError code>", "message": "<substring>"}}

``input`` holds exact bytes as base64 (``*_b64`` keys). ``policy`` is what the verifier is
told: the EK CA bundle (a file name in this directory), the expected measurement, whether a
software TPM is allowed, the time certificates are checked at, and the caller's nonce.
A ``payload`` vector is opened by an embassy instead: its ``policy`` is that embassy (its
vector master secret, measurement, workload launch digest and clock, ``now``), and a good
one unwraps to ``input_key_b64``.
An oversize input is written as base64 bytes plus ``pad_to``: the bytes are padded with
JSON whitespace (which a parser ignores) up to that many bytes, so only the size is wrong.
A ``result`` vector's input is the identity document and the result bundle, optionally the
user's ``payload_id`` (hex) and evidence taken before sending and after receiving
(``before_b64``/``before_nonce``, ``after_b64``/``after_nonce``); a ``log`` vector with
``evidence_b64`` asks the verifier to show the log complete (``verify log --complete``) with
that evidence and the policy's nonce.

The activation files of ``scripts/activation_vectors.py`` are pinned under ``activations/``:
each as ``<name>.act`` (its exact bytes), plus ``activations/expected.json``, canonical JSON
(and a newline) that maps each name to ``{"sha256": <hex SHA-256 of the file>, "expect":
<ActivationError code> | "ok"}``, a good file adding its header's ``session`` (hex), ``seq``,
``tensor``, ``dtype`` and ``shape``. These are decoded with the SDK's header struct, not the
embassy's parser (which tests/unit/test_activation_vectors.py checks against them), and are
what ``parse_activation(data, max_bytes=VECTOR_MAX_BYTES)`` must return.

The encrypted model files of ``tests/unit/weights/weights_vectors.py`` are pinned under
``weights/``: each as ``<name>.emw``, plus ``weights/expected.json`` (how to load each one and
its verdict, checked with the workload's loader by tests/unit/test_vectors.py).

The key broker's decision logs of ``tests/unit/broker/decision_log_vectors.py`` are pinned
under ``decision-log/``: a good log, a good tail after a checkpoint, and each way of editing
one (gap, reorder, duplicate, fork, chain, changed, signature, malformed), plus
``decision-log/expected.json`` with each verdict (tests/unit/broker/test_decision_log.py).

The meter formula v2 vectors of ``tests/unit/test_formula_v2.py`` are pinned under
``metering/``: ``good-v2.json`` (samples and an activation, as float32 little-endian base64,
with the model's digest, calibration and deltas) and ``bad-v2-*.json`` (inputs ``fit``,
``pool_windows`` or ``score_v2`` must refuse, with the error and a message substring).

The job results of ``tests/unit/jobs/test_result_vectors.py`` are pinned under
``job-result/``: a good result bundle and each way a relaying host could change one, each
file with the user's reply key, the expected binding and its verdict (docs/protocol.md §14).

The PE images and UKIs of ``tests/unit/image/image_vectors.py`` are pinned under ``image/``:
each as ``<name>.efi``, plus ``image/expected.json``, canonical JSON (and a newline) that
maps each name to ``{"kind": "pe"|"uki", "expect": "ok" | <error code>}``, adding the
error's exact ``message``; a good PE adds its ``authenticode_sha256`` and ``sections``
(``[name, VirtualSize, SizeOfRawData]``), a good UKI its ``authenticode_sha256``,
``stub_version``, predicted ``pcrs`` and ``events`` (``"<pcr> <type> <digest>"`` in boot
order, default phases). ``image/uki-252.expected.json`` is the ``expected.json`` document
(``ExpectedImage.encode()``) of ``uki-252`` with the vectors' measurement. The digests come
from ``embassy.image``; the integration tests check the good files against ``pesign``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.util
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives import serialization  # noqa: E402

from embassy.attest.types import ClockInfo, TpmMode  # noqa: E402
from embassy.config import parse_config  # noqa: E402
from embassy.daemon.keys import derive_keys  # noqa: E402
from embassy.daemon.runtime import Embassy, TpmHandle  # noqa: E402
from embassy.errors import ImageFormatError  # noqa: E402
from embassy.image import (  # noqa: E402
    authenticode_digest,
    expected_image,
    pe_sections,
    predict_boot_pcrs,
)
from embassy.log.entry import (  # noqa: E402
    GENESIS,
    EntryType,
    LogEntry,
    checkpoint_qualifying_data,
    encode_entry,
    quote_to_json,
)
from embassy.log.event import EVENT_PAYLOAD_TYPE, encode_event  # noqa: E402
from embassy.log.segment import parse_segment  # noqa: E402
from embassy.measure import Measurement  # noqa: E402
from embassy.wire.codec import JsonObject, b64encode, canonical_json  # noqa: E402
from embassy.wire.dsse import MAX_ENVELOPE_BYTES, raw_public_key, sign_envelope  # noqa: E402
from embassy.wire.statement import LIFECYCLE_V1, Header, Statement, embassy_subject  # noqa: E402
from tests.fakes import FakeTpm, FakeWorkloadRuntime, ak_chain_for, fake_registrar  # noqa: E402
from tests.unit.broker.decision_log_vectors import decision_log_vectors  # noqa: E402
from tests.unit.image.image_vectors import pe_vectors, uki_vectors  # noqa: E402
from tests.unit.jobs.test_result_vectors import job_result_vectors  # noqa: E402
from tests.unit.payload.payload_vectors import payload_cases  # noqa: E402
from tests.unit.test_formula_v2 import metering_vectors  # noqa: E402
from tests.unit.verify import result_vectors  # noqa: E402
from tests.unit.weights.weights_vectors import weights_vectors  # noqa: E402
from workload_sdk.activations import DTYPES, FIXED_HEADER_LEN, HEADER  # noqa: E402

VECTOR_DIR = ROOT / "tests" / "vectors"
CA_FILE = "ek-ca.pem"
REGISTRAR_FILE = "registrar-ca.pem"
REGISTRAR = fake_registrar()
ACTIVATION_DIR = "activations"
ACTIVATION_EXPECTED = f"{ACTIVATION_DIR}/expected.json"
IMAGE_DIR = "image"
IMAGE_EXPECTED = f"{IMAGE_DIR}/expected.json"
IMAGE_EXPECTED_DOCUMENT = f"{IMAGE_DIR}/uki-252.expected.json"

SEED = b"embassy-test-vectors"
OTHER_SEED = b"embassy-test-vectors-other-tpm"
MASTER = bytes(range(32))
OTHER_MASTER = bytes(range(32, 64))
MEASUREMENT = Measurement(code=bytes(32), config=bytes([1]) * 32, policy=bytes([2]) * 32)
WRONG_MEASUREMENT = Measurement(
    code=bytes([9]) * 32, config=bytes([1]) * 32, policy=bytes([2]) * 32
)
NONCE = hashlib.sha256(b"auditor nonce 1").digest()
STALE_NONCE = hashlib.sha256(b"auditor nonce 0").digest()
AT = "2026-06-01T00:00:00+00:00"
CHECKPOINT_EVERY = 3
EMBASSY_PCR, LOG_PCR = 13, 14
BOOT_PCRS = (4, 11, 12)  # the default pcrs.boot: the master secret is sealed to them
# The launch digest of the workload the payload vectors are sealed for.
PAYLOAD_LAUNCH_DIGEST = hashlib.sha256(b"embassy vectors: the workload's launch config").digest()
QUOTED_PCRS = (4, 11, 12, 13, 14)

Vectors = dict[str, bytes]


# -- building an embassy -------------------------------------------------------------------


def start_embassy(
    data_dir: Path,
    tpm: FakeTpm,
    master: bytes = MASTER,
    *,
    certify_ak: bool = True,
    workload: JsonObject | None = None,
) -> Embassy:
    """An in-process embassy on ``tpm``, its AK certified by the test registrar; reuses
    ``data_dir`` (a restart) if it exists. With ``workload`` (a config section) it launches
    a fake workload: its launch events are logged, nothing runs."""
    if not data_dir.exists():
        data_dir.mkdir(mode=0o700)
        (data_dir / "master.sealed").write_bytes(tpm.seal(master, BOOT_PCRS))
    config = parse_config(
        {
            "data_dir": str(data_dir),
            "socket": str(data_dir.parent / "s.sock"),
            "statement_log": {"checkpoint_every": CHECKPOINT_EVERY},
            **({} if workload is None else {"workload": workload}),
        }
    )
    if workload is None:
        embassy = Embassy(config, TpmHandle(tpm), measurement=MEASUREMENT)
    else:
        with FakeWorkloadRuntime():
            embassy = Embassy(config, TpmHandle(tpm), measurement=MEASUREMENT)
    if certify_ak:
        embassy.install_ak_chain(ak_chain_for(tpm, REGISTRAR), None)
    return embassy


def append(embassy: Embassy, n: int) -> bytes:
    return embassy.log.append_statement(LIFECYCLE_V1, [], {"event": "test", "n": n}).envelope


def cj(value: JsonObject) -> bytes:
    return canonical_json(value)


def b64(data: bytes) -> str:
    return b64encode(data)


# -- forging (an attacker who can extend and quote the TPM) --------------------------------


def sign_statement(
    *, seq: int, prev: bytes, clock_ms: int, body: JsonObject, master: bytes = MASTER
) -> bytes:
    header = Header(
        seq=seq, prev=prev, clock=ClockInfo(clock_ms, 1, 0, True), tpm_mode=TpmMode.SOFTWARE
    )
    signing = derive_keys(master).signing
    subject = (embassy_subject(raw_public_key(signing.public_key())),)
    payload = Statement(LIFECYCLE_V1, subject, header, body).encode()
    return sign_envelope(payload, signing)


def signed_start(master: bytes = MASTER) -> bytes:
    """The embassy-start event at seq 0, signed as an honest embassy signs it."""
    payload = encode_event(EntryType.EMBASSY_START.value, 0, GENESIS, MEASUREMENT.to_json())
    return sign_envelope(payload, derive_keys(master).signing, EVENT_PAYLOAD_TYPE)


def forge_segment(items: list[tuple[EntryType, bytes]], *, quote_at_ms: int = 5000) -> JsonObject:
    """A segment of boot 1 holding ``items`` in order, chained, extended into a fresh FakeTpm
    with the vectors' seed (so its AK is the embassy's) and closed by a real quote."""
    tpm = FakeTpm(SEED)
    entries: list[LogEntry] = []
    prev = GENESIS
    for seq, (kind, data) in enumerate(items):
        pcr = LOG_PCR if kind is EntryType.STATEMENT else EMBASSY_PCR
        entry = encode_entry(seq=seq, prev=prev, reset_count=1, pcr=pcr, type=kind, data=data)
        tpm.extend(pcr, entry.digest)
        entries.append(entry)
        prev = entry.digest
    tpm.ms = quote_at_ms
    head = entries[-1]
    quote = tpm.quote(QUOTED_PCRS, checkpoint_qualifying_data(head.seq, head.digest))
    return {
        "v": 1,
        "type": "embassy-log-segment",
        "segment": {
            "v": 1,
            "anchor": None,
            "entries": [b64(e.raw) for e in entries],
            "head": {"v": 1, "seq": head.seq, "head": head.digest.hex(), **quote_to_json(quote)},
        },
    }


def forged_log(order: list[int], signers: dict[int, bytes] | None = None) -> JsonObject:
    """Statements signed for log positions 1, 2, 3 (clock rising), placed in ``order``.

    The envelopes are signed as an honest log would have them; each is then put at the
    position ``order`` names and the entries are re-chained and re-extended around them.
    """
    signers = signers or {}
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=EMBASSY_PCR, type=EntryType.EMBASSY_START,
        data=signed_start(),
    )  # fmt: skip
    honest: list[bytes] = []
    prev = start.digest
    for seq in (1, 2, 3):
        env = sign_statement(
            seq=seq,
            prev=prev,
            clock_ms=1000 + 100 * seq,
            body={"event": "test", "n": seq},
            master=signers.get(seq, MASTER),
        )
        honest.append(env)
        prev = encode_entry(
            seq=seq, prev=prev, reset_count=1, pcr=LOG_PCR, type=EntryType.STATEMENT, data=env
        ).digest
    items = [(EntryType.EMBASSY_START, signed_start())]
    items += [(EntryType.STATEMENT, honest[i - 1]) for i in order]
    return forge_segment(items)


def forged_clock_log() -> JsonObject:
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=EMBASSY_PCR, type=EntryType.EMBASSY_START,
        data=signed_start(),
    )  # fmt: skip
    items = [(EntryType.EMBASSY_START, signed_start())]
    prev = start.digest
    for seq, clock_ms in ((1, 1500), (2, 1200)):
        env = sign_statement(seq=seq, prev=prev, clock_ms=clock_ms, body={"event": "test"})
        items.append((EntryType.STATEMENT, env))
        prev = encode_entry(
            seq=seq, prev=prev, reset_count=1, pcr=LOG_PCR, type=EntryType.STATEMENT, data=env
        ).digest
    return forge_segment(items)


def forged_noncanonical_log() -> JsonObject:
    """A statement signed with the embassy key over a payload that says what an honest one
    says, in a non-canonical encoding (a space after each separator)."""
    start = encode_entry(
        seq=0, prev=GENESIS, reset_count=1, pcr=EMBASSY_PCR, type=EntryType.EMBASSY_START,
        data=signed_start(),
    )  # fmt: skip
    honest = sign_statement(seq=1, prev=start.digest, clock_ms=1500, body={"event": "test"})
    payload = base64.b64decode(json.loads(honest)["payload"])
    loose = json.dumps(json.loads(payload), sort_keys=True, separators=(", ", ": ")).encode()
    env = sign_envelope(loose, derive_keys(MASTER).signing)
    return forge_segment([(EntryType.EMBASSY_START, signed_start()), (EntryType.STATEMENT, env)])


# -- group-committed batches (ADR 0016) ----------------------------------------------------

# The batched log's statements after its start event: each one's claimed batch (or None).
HONEST_BATCHES: list[tuple[int, int] | None] = [(1, 3), (1, 3), (1, 3), None, (5, 6), (5, 6)]


def batched_entries(claims: list[tuple[int, int] | None]) -> list[LogEntry]:
    """A start event, then statements at seq 1.. claiming ``claims``, signed honestly for
    their positions (each batch with one clock, as the daemon reads it once per batch)."""
    entries = [
        encode_entry(
            seq=0, prev=GENESIS, reset_count=1, pcr=EMBASSY_PCR, type=EntryType.EMBASSY_START,
            data=signed_start(),
        )
    ]  # fmt: skip
    for seq, claim in enumerate(claims, start=1):
        prev = entries[-1].digest
        clock_ms = 1000 + 100 * (claim[0] if claim else seq)
        env = sign_statement(seq=seq, prev=prev, clock_ms=clock_ms, body={"event": "batched"})
        entries.append(
            encode_entry(
                seq=seq, prev=prev, reset_count=1, pcr=LOG_PCR, type=EntryType.STATEMENT,
                data=env, batch=claim,
            )
        )  # fmt: skip
    return entries


def batched_segment(
    entries: list[LogEntry],
    extend_as: list[tuple[int, bytes]],
    *,
    first: int = 0,
    anchor_after: int = 0,
    last: int | None = None,
) -> JsonObject:
    """A segment of ``entries[first:last+1]`` whose TPM (the vectors' AK) saw the extends
    ``extend_as``; with ``first`` > 0, anchored by a checkpoint of entry ``first - 1``
    quoted after the first ``anchor_after`` extends; closed by a quote after all of them."""
    from embassy.log.entry import Checkpoint

    tpm = FakeTpm(SEED)
    last = len(entries) - 1 if last is None else last
    anchor = None
    for upto, (pcr, digest) in enumerate(extend_as):
        tpm.extend(pcr, digest)
        if first and upto == anchor_after - 1:
            tpm.ms = 1000 + 100 * first - 50  # between the statements around it
            at = entries[first - 1]
            quote = tpm.quote(QUOTED_PCRS, checkpoint_qualifying_data(at.seq, at.digest))
            anchor = Checkpoint(at.seq, at.digest, quote).to_json()
    tpm.ms = 5000
    head = entries[last]
    quote = tpm.quote(QUOTED_PCRS, checkpoint_qualifying_data(head.seq, head.digest))
    return {
        "v": 1,
        "type": "embassy-log-segment",
        "segment": {
            "v": 1,
            "anchor": anchor,
            "entries": [b64(e.raw) for e in entries[first : last + 1]],
            "head": {"v": 1, "seq": head.seq, "head": head.digest.hex(), **quote_to_json(quote)},
        },
    }


def honest_extends(entries: list[LogEntry]) -> list[tuple[int, bytes]]:
    from embassy.log.segment import extends

    return [(pcr, digest) for _, pcr, digest in extends(entries)]


def single_extends(entries: list[LogEntry]) -> list[tuple[int, bytes]]:
    return [(e.pcr, e.digest) for e in entries]


def add_batch_vectors(
    log: Callable[[str, str, list[bytes], JsonObject, bytes], None], ident: bytes
) -> None:
    """Batched logs: one good, and each lie about a batch the verifier refuses by name."""
    from embassy.log.entry import batch_digest

    good = batched_entries(HONEST_BATCHES)
    log(
        "good-log-batched",
        "a group-committed log: start event, batch [1,3], seq 4 alone, batch [5,6]; one "
        "extend per batch of its batch digest",
        [cj(batched_segment(good, honest_extends(good)))],
        ok(),
        ident,
    )
    # an anchor at seq 4 (between batches) and the tail after it
    tail_ext = honest_extends(good)
    log(
        "good-log-batched-anchored",
        "the batched log from an anchor checkpoint at seq 4 (between batches)",
        [cj(batched_segment(good, tail_ext, first=5, anchor_after=3))],
        ok(),
        ident,
    )
    lies: list[tuple[str, str, list[tuple[int, int] | None], str]] = [
        (
            "bad-log-batch-overlapping",
            "seq 3 claims batch [3,4] inside batch [1,3] (overlapping ranges)",
            [(1, 3), (1, 3), (3, 4), (3, 4), (5, 6), (5, 6)],
            "entry seq 3 lies in batch [1,3] but claims batch [3,4]",
        ),
        (
            "bad-log-batch-range-too-long",
            "the batch claims [1,4] but seq 4 claims none (the range does not match the "
            "entries present)",
            [(1, 4), (1, 4), (1, 4), None, (5, 6), (5, 6)],
            "entry seq 4 lies in batch [1,4] but claims no batch",
        ),
        (
            "bad-log-batch-not-its-own",
            "seq 4 claims batch [7,8], which does not hold it",
            [(1, 3), (1, 3), (1, 3), (7, 8), (5, 6), (5, 6)],
            "entry seq 4 claims batch [7,8], which does not hold it",
        ),
        (
            "bad-log-batch-cut-off-at-the-end",
            "the last batch claims [5,7] and the segment ends at seq 6",
            [(1, 3), (1, 3), (1, 3), None, (5, 7), (5, 7)],
            "batch [5,7] is cut off after entry seq 6",
        ),
    ]
    for name, desc, claims, message in lies:
        entries = batched_entries(claims)
        log(name, desc, [cj(batched_segment(entries, single_extends(entries)))],
            error("log-integrity", message), ident)  # fmt: skip
    log(
        "bad-log-batch-quote-inside",
        "a quote closing the segment at seq 2, inside batch [1,3]",
        [cj(batched_segment(good, single_extends(good[:3]), last=2))],
        error("log-integrity", "batch [1,3] is cut off after entry seq 2"),
        ident,
    )
    log(
        "bad-log-batch-anchor-inside",
        "a segment anchored at seq 1, inside batch [1,3]",
        [cj(batched_segment(good, single_extends(good), first=2, anchor_after=2))],
        error("log-integrity", "entry seq 2 is inside batch [1,3] but the entries before it"),
        ident,
    )
    members = [e.digest for e in good[1:4]]
    reordered = honest_extends(good)
    reordered[1] = (LOG_PCR, batch_digest(1, 3, [members[1], members[0], members[2]]))
    log(
        "bad-log-batch-reordered",
        "the TPM holds batch [1,3]'s digest over its entries in another order",
        [cj(batched_segment(good, reordered))],
        error("pcr-mismatch", "PCR 14: the log replays to"),
        ident,
    )
    log(
        "bad-log-batch-extended-singly",
        "the TPM saw batch [1,3] as three single extends (a batch passed off as singles)",
        [cj(batched_segment(good, [*single_extends(good[:4]), *honest_extends(good[4:])]))],
        error("pcr-mismatch", "PCR 14: the log replays to"),
        ident,
    )


# -- the honest run ------------------------------------------------------------------------


class Run:
    """Everything an honest embassy served, plus what a second TPM served."""

    def __init__(self, tmp: Path) -> None:
        tpm = FakeTpm(SEED)
        self.tpm = tpm
        data = tmp / "embassy"
        e1 = start_embassy(data, tpm)
        self.identity1 = cj(e1.identity_document())
        self.envelopes = [append(e1, n) for n in range(5)]  # seq 2..6; checkpoint at 4
        self.segment_anchored = e1.log_segment(5)  # anchor at 4, entries 5, 6
        self.segment_full = e1.log_segment(0)  # entries 0..6
        self.evidence = e1.evidence(NONCE)
        e1.log.close()  # a crash: same TPM boot, same data dir
        e2 = start_embassy(data, tpm)
        self.identity2 = cj(e2.identity_document())  # start 7, identity 8
        self.envelopes += [append(e2, n) for n in range(5, 7)]  # seq 9, 10
        self.segment_restart = e2.log_segment(0)  # entries 0..10, boot 1
        e2.log.close()
        tpm.reset()
        e3 = start_embassy(data, tpm)
        self.identity3 = cj(e3.identity_document())  # boot 2: start 11, identity 12
        self.boot2_envelope = append(e3, 7)  # seq 13
        self.segment_boot2 = e3.log_segment(0)  # entries 11..13
        boot1_head = parse_segment(self.segment_restart["segment"]).head
        # A quote taken in boot 2 over boot 1's head (TPM access in boot 2).
        self.boot2_quote_on_boot1 = tpm.quote(
            QUOTED_PCRS, checkpoint_qualifying_data(boot1_head.seq, boot1_head.head)
        )
        e3.log.close()
        other_tpm = FakeTpm(OTHER_SEED)
        e_other = start_embassy(tmp / "other", other_tpm)
        self.identity_other = cj(e_other.identity_document())
        e_other.log.close()
        # The attacker's own TPM, presenting the first TPM's EK and EK certificate.
        impostor = _Impostor(OTHER_SEED, tpm)
        e_impostor = start_embassy(tmp / "impostor", impostor, certify_ak=False)
        self.identity_impostor = cj(e_impostor.identity_document())
        e_impostor.log.close()
        # A software TPM whose statements claim a hardware TPM.
        liar = FakeTpm(SEED + b"-liar", mode=TpmMode.HARDWARE, ca=(tpm.ca_key, tpm.ca_cert))
        e_liar = start_embassy(tmp / "liar", liar)
        self.identity_liar = cj(e_liar.identity_document())
        e_liar.log.close()
        self.ca_pem = tpm.ca_pem()


class _Impostor(FakeTpm):
    def __init__(self, seed: bytes, genuine: FakeTpm) -> None:
        super().__init__(seed)
        self._genuine = genuine

    def ek_public(self) -> bytes:
        return self._genuine.ek_public()

    def ek_certificate(self) -> bytes:
        return self._genuine.ek_certificate()


# -- vector assembly ----------------------------------------------------------------------


def policy(
    *,
    measurement: Measurement = MEASUREMENT,
    allow_software_tpm: bool = True,
    nonce: bytes | None = None,
) -> JsonObject:
    out: JsonObject = {
        "swtpm_ca": CA_FILE,
        "ak_ca": REGISTRAR_FILE,
        "expected_measurement": measurement.digest.hex(),
        "allow_software_tpm": allow_software_tpm,
        "at": AT,
    }
    if nonce is not None:
        out["nonce"] = nonce.hex()
    return out


def ok() -> JsonObject:
    return {"ok": True}


def error(code: str, message: str) -> JsonObject:
    return {"error": code, "message": message}


def vector(
    description: str, kind: str, inputs: JsonObject, expect: JsonObject, pol: JsonObject | None
) -> bytes:
    obj = {
        "description": description,
        "kind": kind,
        "input": inputs,
        "policy": pol if pol is not None else {},
        "expect": expect,
    }
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def mutate(doc: bytes, change: Callable[[JsonObject], None]) -> bytes:
    obj = json.loads(doc)
    change(obj)
    return cj(obj)


def seg_entries(obj: JsonObject) -> list[str]:
    entries: list[str] = obj["segment"]["entries"]
    return entries


def entry_bytes(segment_file: JsonObject, i: int) -> bytes:
    return base64.b64decode(seg_entries(segment_file)[i])


def _replace_entries(segment_file: JsonObject, edit: Callable[[list[str]], list[str]]) -> bytes:
    obj = json.loads(json.dumps(segment_file))
    obj["segment"]["entries"] = edit(list(seg_entries(obj)))
    return cj(obj)


def _entry_json(raw: bytes) -> JsonObject:
    value: JsonObject = json.loads(raw)
    return value


def build_vectors() -> Vectors:  # noqa: PLR0915 (a flat list of vectors reads best)
    with tempfile.TemporaryDirectory(prefix="embassy-vectors-") as tmp:
        run = Run(Path(tmp))
    out: Vectors = {
        CA_FILE: run.ca_pem,
        REGISTRAR_FILE: REGISTRAR.certificate.public_bytes(serialization.Encoding.PEM),
    }

    def add(name: str, *args: Any) -> None:
        out[f"{name}.json"] = vector(*args)

    pol = policy()
    id1 = run.identity1

    def identity(name: str, desc: str, doc: bytes, expect: JsonObject, p: JsonObject = pol) -> None:
        add(name, desc, "identity", {"document_b64": b64(doc)}, expect, p)

    def log(name: str, desc: str, segments: list[bytes], expect: JsonObject, ident: bytes) -> None:
        inputs = {"identity_b64": b64(ident), "segments_b64": [b64(s) for s in segments]}
        add(name, desc, "log", inputs, expect, pol)

    # ---- identity documents
    identity("good-identity", "identity document of a fresh embassy", id1, ok())
    identity(
        "good-identity-after-restart",
        "identity document after a daemon restart in the same TPM boot (anchored segment)",
        run.identity2,
        ok(),
    )
    identity(
        "bad-identity-wrong-measurement",
        "the auditor expects another measurement than the embassy's",
        id1,
        error("measurement-mismatch", "embassy measurement is"),
        policy(measurement=WRONG_MEASUREMENT),
    )
    identity(
        "bad-identity-software-tpm-not-allowed",
        "software-TPM identity checked without allow_software_tpm",
        id1,
        error("software-tpm", "software TPM"),
        policy(allow_software_tpm=False),
    )
    identity(
        "bad-identity-ak-uncertified",
        "an AK of the attacker's own TPM beside a genuine TPM's EK and EK certificate, "
        "with no AK certificate",
        run.identity_impostor,
        error("ak-not-certified", "carries no AK certificate"),
    )
    identity(
        "bad-identity-ak-from-other-tpm",
        "the same forgery with the genuine TPM's AK certificate copied in",
        mutate(
            run.identity_impostor,
            lambda o: o.update(ak_certificates=json.loads(id1)["ak_certificates"]),
        ),
        error("key-binding", "certifies another key than the document's AK"),
    )
    identity(
        "bad-identity-software-tpm-claims-hardware",
        "a software TPM (EK certificate from swtpm's CA) whose statements claim hardware",
        run.identity_liar,
        error("tpm-kind-contradiction", "claims a hardware TPM but its EK certificate"),
    )
    identity(
        "bad-identity-ek-from-other-ca",
        "identity of an embassy on another TPM, whose EK certificate is issued by another CA "
        "(with the same name); checked against the first TPM's CA",
        run.identity_other,
        error("bad-ek-certificate", "does not verify with any trusted certificate"),
    )

    def change_identity_payload(obj: JsonObject) -> None:
        entries = seg_entries(obj)
        entry = _entry_json(base64.b64decode(entries[-1]))
        env = json.loads(base64.b64decode(entry["data"]))
        payload = base64.b64decode(env["payload"])
        assert payload.count(b'"name":"embassy"') == 1
        env["payload"] = b64(payload.replace(b'"name":"embassy"', b'"name":"embasy!"'))
        entry["data"] = b64(cj(env))
        entries[-1] = b64(cj(entry))

    identity(
        "bad-identity-payload-byte-changed",
        "one byte of the identity statement's payload changed inside its envelope",
        mutate(id1, change_identity_payload),
        error("bad-signature", "does not verify"),
    )

    def swap_quote(obj: JsonObject) -> None:
        other = json.loads(run.identity2)
        obj["segment"]["head"]["quote"] = other["segment"]["head"]["quote"]

    identity(
        "bad-identity-swapped-quote",
        "the closing quote replaced by the (genuine) quote of another identity document of "
        "the same embassy: the quote is real but over another statement",
        mutate(id1, swap_quote),
        error("bad-quote", "qualifying data"),
    )

    def swap_foreign_quote(obj: JsonObject) -> None:
        other = json.loads(run.identity_other)
        obj["segment"]["head"]["quote"] = other["segment"]["head"]["quote"]

    identity(
        "bad-identity-quote-from-other-tpm",
        "the closing quote replaced by one another TPM's AK signed",
        mutate(id1, swap_foreign_quote),
        error("bad-signature", "does not verify with the AK"),
    )

    def alter_pcr(obj: JsonObject) -> None:
        pcrs = obj["segment"]["head"]["quote"]["pcrs"]
        pcrs[str(LOG_PCR)] = hashlib.sha256(b"forged").hexdigest()

    identity(
        "bad-identity-pcr-altered",
        "the value of the log PCR in the closing quote's pcrs map changed",
        mutate(id1, alter_pcr),
        error("pcr-mismatch", "do not hash to its pcrDigest"),
    )
    identity(
        "bad-identity-truncated",
        "the identity document cut in half",
        id1[: len(id1) // 2],
        error("malformed", "invalid JSON"),
    )
    identity(
        "bad-identity-duplicate-key",
        "a second 'segment' key (an empty object) after the real one: two parsers could read "
        "two documents",
        id1[:-1] + b',"segment":{}}',
        error("malformed", "duplicate JSON key"),
    )
    identity(
        "bad-identity-wrong-version",
        "identity document version 3",
        mutate(id1, lambda o: o.update(v=3)),
        error("malformed", "expected v 1 or 2"),
    )
    identity(
        "bad-identity-v1-with-ak-certificates",
        "a version 1 document (which has no AK chain) carrying one",
        mutate(id1, lambda o: o.update(v=1)),
        error("malformed", "ak_certificates"),
    )
    identity(
        "bad-identity-segment-wrong-version",
        "the identity document's segment claims version 2",
        mutate(id1, lambda o: o["segment"].update(v=2)),
        error("malformed", "unsupported version 2"),
    )
    identity(
        "bad-identity-non-utf8",
        "a byte 0xff in the document type string",
        id1.replace(b'"embassy-identity-document"', b'"embassy-identity-\xffocument"'),
        error("malformed", "not UTF-8"),
    )
    identity(
        "bad-identity-nan",
        "NaN as the document version",
        id1.replace(b'"v":1}', b'"v":NaN}'),
        error("malformed", "NaN"),
    )

    # ---- log segments
    full = run.segment_full
    full_b = cj(full)
    log(
        "good-log",
        "the whole first run's log: start, identity, five statements",
        [full_b],
        ok(),
        id1,
    )
    log(
        "good-log-anchored",
        "a segment anchored at a checkpoint (checkpoint_every=3)",
        [cj(run.segment_anchored)],
        ok(),
        id1,
    )
    log(
        "good-log-restart",
        "one TPM boot spanning a daemon restart: two start events, two identity statements",
        [cj(run.segment_restart)],
        ok(),
        run.identity2,
    )
    log(
        "good-log-two-boots",
        "two segments across a TPM reset, chained",
        [cj(run.segment_restart), cj(run.segment_boot2)],
        ok(),
        run.identity3,
    )

    def boot2_quote(obj: JsonObject) -> None:
        obj["segment"]["head"].update(quote_to_json(run.boot2_quote_on_boot1))

    log(
        "bad-log-quote-from-other-boot",
        "a boot-1 segment closed by a genuine boot-2 quote over boot 1's head",
        [mutate(cj(run.segment_restart), boot2_quote)],
        error("log-integrity", "one segment covers one boot"),
        run.identity3,
    )

    # entries 0..6: 0 start, 1 identity, 2..6 lifecycle statements
    forged_entry = _entry_json(entry_bytes(full, 4))
    forged_env = sign_statement(
        seq=4, prev=bytes.fromhex(forged_entry["prev"]), clock_ms=1, body={}
    )
    forged_entry["data"] = b64(forged_env)

    def insert_forged(entries: list[str]) -> list[str]:
        # The attacker re-chains everything after the inserted entry.
        out_entries = entries[:4]
        prev = hashlib.sha256(base64.b64decode(out_entries[-1])).hexdigest()
        for seq, old in enumerate([cj(forged_entry)] + [base64.b64decode(e) for e in entries[4:]]):
            obj = _entry_json(old)
            obj["seq"], obj["prev"] = 4 + seq, prev
            new = cj(obj)
            out_entries.append(b64(new))
            prev = hashlib.sha256(new).hexdigest()
        return out_entries

    log(
        "bad-log-forged-entry-inserted",
        "a forged statement inserted at seq 4 and the rest re-chained after it",
        [_replace_entries(full, insert_forged)],
        error("log-integrity", "entries were dropped from or added to its end"),
        id1,
    )
    log(
        "bad-log-dropped-middle",
        "entry seq 3 dropped",
        [_replace_entries(full, lambda e: e[:3] + e[4:])],
        error("log-integrity", "1 entries missing"),
        id1,
    )
    log(
        "bad-log-dropped-last",
        "the last entry dropped",
        [_replace_entries(full, lambda e: e[:-1])],
        error("log-integrity", "dropped from or added to its end"),
        id1,
    )
    log(
        "bad-log-reordered",
        "entries seq 3 and 4 swapped",
        [_replace_entries(full, lambda e: [*e[:3], e[4], e[3], *e[5:]])],
        error("log-integrity", "entry seq 4 follows seq 2"),
        id1,
    )
    log(
        "bad-log-duplicated",
        "entry seq 3 appears twice",
        [_replace_entries(full, lambda e: [*e[:4], e[3], *e[4:]])],
        error("log-integrity", "appears twice"),
        id1,
    )
    add_batch_vectors(log, id1)

    def change_statement(entries: list[str]) -> list[str]:
        obj = _entry_json(base64.b64decode(entries[3]))
        env = json.loads(base64.b64decode(obj["data"]))
        env["payload"] = b64(base64.b64decode(env["payload"]).replace(b'"n":1', b'"n":9'))
        obj["data"] = b64(cj(env))
        return [*entries[:3], b64(cj(obj)), *entries[4:]]

    log(
        "bad-log-statement-changed",
        "one payload byte of the statement at seq 3 changed (its entry no longer chains)",
        [_replace_entries(full, change_statement)],
        error("log-integrity", "does not chain to its predecessor"),
        id1,
    )
    log(
        "bad-log-statement-moved",
        "statements signed for positions 1, 2, 3 placed as 2, 1, 3 by an attacker who "
        "re-chains the entries and extends the TPM to match (no signing key)",
        [cj(forged_log([2, 1, 3]))],
        error("log-integrity", "it was moved"),
        id1,
    )
    log(
        "bad-log-statement-other-key",
        "a statement signed by another key, in a log whose PCR replay matches (the attacker "
        "extends the TPM)",
        [cj(forged_log([1, 2, 3], {2: OTHER_MASTER}))],
        error("bad-signature", "no signature by key"),
        id1,
    )
    log(
        "bad-log-clock-backwards",
        "two statements signed with the embassy key, the later one dated earlier (1500 ms "
        "then 1200 ms) in one boot",
        [cj(forged_clock_log())],
        error("clock-backwards", "went backwards"),
        id1,
    )
    log(
        "bad-log-statement-noncanonical",
        "a statement signed with the embassy key over a valid but non-canonical payload "
        "(spaces after separators): refused after its signature verifies",
        [cj(forged_noncanonical_log())],
        error("malformed", "statement: not canonical JSON"),
        id1,
    )
    log(
        "bad-log-segment-wrong-version",
        "a segment claiming version 2",
        [mutate(full_b, lambda o: o["segment"].update(v=2))],
        error("malformed", "unsupported version 2"),
        id1,
    )

    # ---- evidence
    evidence_inputs = {"identity_b64": b64(id1), "evidence_b64": b64(cj(run.evidence))}
    add(
        "good-evidence",
        "evidence (a fresh quote over the log head) over the auditor's nonce",
        "evidence",
        evidence_inputs,
        ok(),
        policy(nonce=NONCE),
    )
    add(
        "bad-evidence-stale-nonce",
        "the same evidence checked against another (the auditor's current) nonce",
        "evidence",
        evidence_inputs,
        error("stale-nonce", "qualifying data"),
        policy(nonce=STALE_NONCE),
    )

    # ---- statements in a segment
    statement_inputs = {
        "identity_b64": b64(id1),
        "statement_b64": b64(run.envelopes[1]),
        "segment_b64": b64(full_b),
    }
    add(
        "good-statement",
        "a lifecycle statement (seq 3) found in a verified segment",
        "statement",
        statement_inputs,
        ok(),
        pol,
    )
    add(
        "bad-statement-not-in-segment",
        "a genuine statement from TPM boot 2 looked up in a boot-1 segment",
        "statement",
        {**statement_inputs, "statement_b64": b64(run.boot2_envelope)},
        error("log-integrity", "not in the verified log segment"),
        pol,
    )

    # ---- envelopes
    keys = derive_keys(MASTER)
    public = b64(raw_public_key(keys.signing.public_key()))
    env = run.envelopes[0]
    env_obj = json.loads(env)

    def envelope(name: str, desc: str, data: bytes, expect: JsonObject, **extra: Any) -> None:
        add(name, desc, "envelope", {"envelope_b64": b64(data), "public_key_b64": public, **extra},
            expect, None)  # fmt: skip

    envelope("good-envelope", "a DSSE envelope the embassy signed", env, ok())
    payload = base64.b64decode(env_obj["payload"])
    assert payload.count(b'"event":"test"') == 1
    envelope(
        "bad-envelope-payload-byte-changed",
        "one byte of the payload changed",
        cj({**env_obj, "payload": b64(payload.replace(b'"event":"test"', b'"event":"tesT"'))}),
        error("bad-signature", "does not verify"),
    )
    envelope(
        "bad-envelope-other-key",
        "the same payload signed by another Ed25519 key",
        sign_envelope(payload, derive_keys(OTHER_MASTER).signing),
        error("bad-signature", "no signature by key"),
    )
    sig = env_obj["signatures"][0]["sig"]
    assert sig.endswith("==")  # 64 bytes: the last symbol carries 4 unused bits
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    loose = alphabet[alphabet.index(sig[-3]) ^ 1]
    envelope(
        "bad-envelope-noncanonical-base64",
        "the signature's base64 with a non-zero unused bit (decodes to the same bytes)",
        cj(
            {
                **env_obj,
                "signatures": [{**env_obj["signatures"][0], "sig": sig[:-3] + loose + "=="}],
            }
        ),
        error("malformed", "not in canonical form"),
    )
    envelope(
        "bad-envelope-unknown-field",
        "an unknown top-level field",
        cj({**env_obj, "extra": 1}),
        error("malformed", "unknown field"),
    )
    envelope(
        "bad-envelope-duplicate-payload",
        "two 'payload' keys: a parser keeping the first would read another statement",
        env.replace(b'{"payload":', b'{"payload":"e30=","payload":', 1),
        error("malformed", "duplicate JSON key 'payload'"),
    )
    pad_to = MAX_ENVELOPE_BYTES + 1
    envelope(
        "bad-envelope-oversize",
        f"a valid envelope padded with trailing whitespace to {pad_to} bytes",
        env,
        error("malformed", "exceeds"),
        pad_to=pad_to,
    )

    # ---- log entries
    good_entry = entry_bytes(full, 2)
    entry_obj = _entry_json(good_entry)

    def entry(name: str, desc: str, raw: bytes, expect: JsonObject, **extra: Any) -> None:
        add(name, desc, "entry", {"entry_b64": b64(raw), **extra}, expect, None)

    entry("good-entry", "a log entry (a statement at seq 2)", good_entry, ok())
    entry(
        "bad-entry-negative-seq",
        "seq -1",
        cj({**entry_obj, "seq": -1}),
        error("malformed", "out of range"),
    )
    entry(
        "bad-entry-bool-seq",
        "seq true (a bool is not an int on the wire)",
        cj({**entry_obj, "seq": True}),
        error("malformed", "expected int, got bool"),
    )
    entry(
        "bad-entry-float-seq",
        "seq 2.0",
        good_entry.replace(b'"seq":2', b'"seq":2.0'),
        error("malformed", "expected int, got float"),
    )
    entry(
        "bad-entry-nan",
        "reset_count NaN",
        good_entry.replace(b'"reset_count":1', b'"reset_count":NaN'),
        error("malformed", "NaN"),
    )
    entry(
        "bad-entry-wrong-version",
        "entry version 2",
        cj({**entry_obj, "v": 2}),
        error("malformed", "unsupported version 2"),
    )
    entry(
        "bad-entry-unknown-field",
        "an unknown field",
        cj({**entry_obj, "note": "x"}),
        error("malformed", "unknown field"),
    )
    entry(
        "bad-entry-duplicate-key",
        "two 'seq' keys",
        good_entry.replace(b'"seq":2', b'"seq":2,"seq":3'),
        error("malformed", "duplicate JSON key 'seq'"),
    )
    entry(
        "bad-entry-non-utf8",
        "a byte 0xff inside the type string",
        good_entry.replace(b'"statement"', b'"st\xffement"'),
        error("malformed", "not UTF-8"),
    )
    entry(
        "bad-entry-truncated",
        "the entry cut in half",
        good_entry[: len(good_entry) // 2],
        error("malformed", "invalid JSON"),
    )
    data_b64 = entry_obj["data"]
    assert data_b64.endswith("=")  # the padding this vector strips
    assert not data_b64.endswith("==")
    entry(
        "bad-entry-noncanonical-base64",
        "the data base64 without its padding",
        cj({**entry_obj, "data": data_b64.rstrip("=")}),
        error("malformed", "base64"),
    )
    entry(
        "bad-entry-oversize",
        "a valid entry padded with trailing whitespace past the 8 MiB limit",
        good_entry,
        error("malformed", "exceeds"),
        pad_to=8 * 1024 * 1024 + 1,
    )

    # ---- statement payloads
    good_payload = base64.b64decode(json.loads(run.envelopes[0])["payload"])

    def statement(name: str, desc: str, raw: bytes, expect: JsonObject) -> None:
        add(name, desc, "statement-payload", {"payload_b64": b64(raw)}, expect, None)

    statement(
        "good-statement-payload", "an in-toto statement the embassy signed", good_payload, ok()
    )
    statement(
        "bad-statement-payload-negative-seq",
        "header log seq -1",
        good_payload.replace(b'"seq":2', b'"seq":-1'),
        error("malformed", "negative"),
    )
    statement(
        "bad-statement-payload-unknown-predicate",
        "a predicate type the verifier does not know",
        good_payload.replace(b"lifecycle:v1", b"lifecycle:v2"),
        error("malformed", "unknown 'urn:embassy:predicate:lifecycle:v2'"),
    )
    statement(
        "bad-statement-payload-wrong-type",
        "in-toto Statement v0.1",
        good_payload.replace(b"Statement/v1", b"Statement/v0.1"),
        error("malformed", "statement._type"),
    )
    statement(
        "bad-statement-payload-nan",
        "NaN in the predicate body",
        good_payload.replace(b'"n":0', b'"n":NaN'),
        error("malformed", "NaN"),
    )
    statement(
        "bad-statement-payload-unknown-field",
        "an unknown top-level field",
        cj({**json.loads(good_payload), "extra": True}),
        error("malformed", "unknown field"),
    )
    statement(
        "bad-statement-payload-unknown-header-field",
        "an unknown field in the signed header",
        good_payload.replace(b'"tpm_mode":', b'"x":1,"tpm_mode":'),
        error("malformed", "unknown field"),
    )
    good_obj = json.loads(good_payload)
    statement(
        "bad-statement-payload-empty-subject",
        "no subject (in-toto Statement v1 requires at least one)",
        cj({**good_obj, "subject": []}),
        error("malformed", "statement.subject: empty"),
    )
    statement(
        "bad-statement-payload-subject-no-digest",
        "a subject with a name and no digest",
        cj({**good_obj, "subject": [{"name": good_obj["subject"][0]["name"]}]}),
        error("malformed", "statement.subject[0]: missing field 'digest'"),
    )
    statement(
        "bad-statement-payload-subject-short-digest",
        "a subject whose sha256 is 31 bytes",
        cj({**good_obj, "subject": [{**good_obj["subject"][0], "digest": {"sha256": "ab" * 31}}]}),
        error("malformed", "statement.subject[0].digest.sha256: expected 32 bytes, got 31"),
    )
    statement(
        "bad-statement-payload-subject-other-algorithm",
        "a subject digest with a second algorithm besides sha256",
        cj(
            {
                **good_obj,
                "subject": [
                    {
                        **good_obj["subject"][0],
                        "digest": {**good_obj["subject"][0]["digest"], "sha512": "00" * 64},
                    }
                ],
            }
        ),
        error("malformed", "statement.subject[0].digest: unknown field(s) 'sha512'"),
    )
    statement(
        "bad-statement-payload-noncanonical-whitespace",
        "the same statement with a space after each separator",
        json.dumps(good_obj, sort_keys=True, separators=(", ", ": ")).encode(),
        error("malformed", "statement: not canonical JSON"),
    )
    statement(
        "bad-statement-payload-noncanonical-key-order",
        "the same statement with its top-level keys in reverse order",
        json.dumps(dict(reversed(good_obj.items())), separators=(",", ":")).encode(),
        error("malformed", "first difference at byte 2"),
    )
    assert good_payload.count(b'"event":"test"') == 1
    statement(
        "bad-statement-payload-noncanonical-escape",
        "the same statement with one letter written as a JSON escape (\\u0074 for t)",
        good_payload.replace(b'"event":"test"', b'"event":"\\u0074est"'),
        error("malformed", "statement: not canonical JSON"),
    )
    statement(
        "bad-statement-payload-not-object",
        "a JSON array instead of an object",
        b"[" + good_payload + b"]",
        error("malformed", "expected a JSON object"),
    )
    return out


# -- results and completeness (an embassy with a workload) ---------------------------------


def build_result_vectors() -> Vectors:
    """Results checked against the identity that launched their workload, and a log shown
    complete (or not) by fresh evidence (tests/unit/verify/result_vectors.py makes them)."""
    with tempfile.TemporaryDirectory(prefix="embassy-vectors-") as tmp:
        run = result_vectors.result_run(
            Path(tmp),
            FakeTpm(SEED),
            lambda data, tpm, workload: start_embassy(data, tpm, workload=workload),
        )
    rv = result_vectors
    out: Vectors = {}

    def result(name: str, desc: str, bundle: bytes, expect: JsonObject, **more: Any) -> None:
        inputs = {"identity_b64": b64(run.identity), "result_b64": b64(bundle), **more}
        out[f"{name}.json"] = vector(desc, "result", inputs, expect, policy())

    honest = run.results["honest"]
    result(
        "good-result",
        "a result of the identity's workload, for the user's payload",
        honest,
        ok(),
        payload_id=rv.PAYLOAD.hex(),
    )
    window = {
        "before_b64": b64(run.evidence["before"]),
        "before_nonce": rv.NONCE_BEFORE.hex(),
        "after_b64": b64(run.evidence["after"]),
        "after_nonce": rv.NONCE_AFTER.hex(),
    }
    result(
        "good-result-window",
        "a result bounded by the user's evidence taken before sending and after receiving",
        honest,
        ok(),
        **window,
    )
    result(
        "bad-result-window-swapped",
        "the user's before- and after-evidence swapped: the 'before' quote came after the seal",
        honest,
        error("outside-time-window", "sealed before you asked for that quote"),
        **{**window, "before_b64": window["after_b64"], "before_nonce": window["after_nonce"]},
    )
    result(
        "bad-result-other-workload",
        "a session of another workload (another image digest), signed by the same embassy key "
        "and in its log, checked against the identity that launched the first",
        run.results["other-workload"],
        error("workload-mismatch", "the result is from another workload"),
    )
    result(
        "bad-result-restart-between-seal-and-unseal",
        "sealed, then the embassy restarted (same measurement, same workload) and the session "
        "was closed by the new run",
        run.results["restart-between"],
        error("embassy-restarted", "between the seal and the unseal"),
    )
    result(
        "bad-result-past-deadline",
        "the embassy's wall clock stood still while the TPM clock ran 70 s of a 60 s session",
        run.results["past-deadline"],
        error("deadline-passed", "the session unsealed past its deadline"),
    )

    def log(name: str, desc: str, evidence: bytes, expect: JsonObject) -> None:
        inputs = {
            "identity_b64": b64(run.identity),
            "segments_b64": [b64(run.segments["earlier"])],
            "evidence_b64": b64(evidence),
        }
        out[f"{name}.json"] = vector(desc, "log", inputs, expect, policy(nonce=rv.NONCE_COMPLETE))

    log(
        "good-log-complete",
        "a segment shown complete: fresh evidence over the verifier's nonce, its head the "
        "segment's last entry",
        run.evidence["complete-at-earlier"],
        ok(),
    )
    log(
        "bad-log-truncated-presented-as-complete",
        "a genuine segment closed by an earlier checkpoint, shown as complete; fresh evidence "
        "shows three entries after it",
        run.evidence["complete-later"],
        error("log-incomplete", "the log has entries after seq"),
    )
    return out


# -- activation files ----------------------------------------------------------------------


def _load_activation_vectors() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "activation_vectors", ROOT / "scripts" / "activation_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _activation_fields(data: bytes) -> JsonObject:
    """A good file's header fields, decoded with the SDK's struct alone (not the parser)."""
    (_, _, dtype_code, ndim, name_len, _, _, _, session, seq, *slots, _) = HEADER.unpack_from(data)
    return {
        "session": session.hex(),
        "seq": seq,
        "tensor": data[FIXED_HEADER_LEN : FIXED_HEADER_LEN + name_len].decode("ascii"),
        "dtype": DTYPES[dtype_code],
        "shape": list(slots[:ndim]),
    }


def build_activation_vectors() -> Vectors:
    """``activations/<name>.act`` for every activation vector, and ``expected.json``."""
    out: Vectors = {}
    expected: JsonObject = {}
    for name, (data, code) in sorted(_load_activation_vectors().activation_vectors().items()):
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), name
        out[f"{ACTIVATION_DIR}/{name}.act"] = data
        verdict: JsonObject = {"sha256": hashlib.sha256(data).hexdigest(), "expect": code or "ok"}
        if code is None:
            verdict.update(_activation_fields(data))
        expected[name] = verdict
    out[ACTIVATION_EXPECTED] = cj(expected) + b"\n"
    return out


# -- PE images and UKIs --------------------------------------------------------------------


def _image_verdict(kind: str, data: bytes) -> JsonObject:
    verdict: JsonObject = {"kind": kind}
    try:
        if kind == "pe":
            sections = [[s.name, s.virtual_size, s.raw_size] for s in pe_sections(data)]
            verdict.update(authenticode_sha256=authenticode_digest(data).hex(), sections=sections)
        else:
            prediction = predict_boot_pcrs(data)
            verdict.update(
                authenticode_sha256=authenticode_digest(data).hex(),
                stub_version=prediction.stub_version,
                pcrs={str(pcr): value.hex() for pcr, value in prediction.pcrs.items()},
                events=[f"{e.pcr} {e.event_type} {e.digest.hex()}" for e in prediction.events],
            )
    except ImageFormatError as exc:
        verdict.update(expect=exc.code, message=exc.message)
    else:
        verdict["expect"] = "ok"
    return verdict


def build_image_vectors() -> Vectors:
    """``image/<name>.efi`` for every PE and UKI vector, ``expected.json``, and one
    ``expected.json`` document."""
    out: Vectors = {}
    expected: JsonObject = {}
    for kind, vectors in (("pe", pe_vectors()), ("uki", uki_vectors())):
        for name, data in sorted(vectors.items()):
            assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), name
            assert name not in expected, name
            verdict = _image_verdict(kind, data)
            assert (verdict["expect"] == "ok") != name.startswith("bad-"), (name, verdict)
            out[f"{IMAGE_DIR}/{name}.efi"] = data
            expected[name] = verdict
    out[IMAGE_EXPECTED] = cj(expected) + b"\n"
    uki = uki_vectors()["uki-252"]
    out[IMAGE_EXPECTED_DOCUMENT] = expected_image(uki, MEASUREMENT).encode()
    return out


def build_payload_vectors() -> Vectors:
    """Payload envelopes bound to a measurement and a workload, opened by the vectors'
    embassy (tests/unit/payload/payload_vectors.py makes them, deterministically)."""
    out: Vectors = {}
    for name, case in payload_cases(MASTER, MEASUREMENT.digest, PAYLOAD_LAUNCH_DIGEST).items():
        inputs = {"envelope_b64": b64(case.envelope), "input_key_b64": b64(case.input_key)}
        out[f"{name}.json"] = vector(case.description, "payload", inputs, case.expect, case.embassy)
    return out


def build_all() -> Vectors:
    """Every file of the vector directory, by path relative to it."""
    return {
        **build_vectors(),
        **build_payload_vectors(),
        **build_result_vectors(),
        **build_activation_vectors(),
        **build_image_vectors(),
        **weights_vectors(),
        **decision_log_vectors(),
        **job_result_vectors(),
        **metering_vectors(),
    }


# -- writing and checking ----------------------------------------------------------------


def _present(directory: Path) -> set[str]:
    """Every file under ``directory``, subdirectories included, as a relative POSIX path.

    A symlink counts as a file (and is never followed)."""
    found: set[str] = set()
    if not directory.is_dir():
        return found
    for root, dirs, files in os.walk(directory):
        base = Path(root).relative_to(directory)
        links = [d for d in dirs if (Path(root) / d).is_symlink()]
        found.update((base / name).as_posix() for name in (*files, *links))
    return found


def check(directory: Path = VECTOR_DIR) -> list[str]:
    """What differs between ``directory`` and a fresh generation (empty: up to date)."""
    wanted = build_all()
    present = _present(directory)
    problems = []
    for name in sorted(wanted):
        if name not in present:
            problems.append(f"missing: {name}")
        elif (directory / name).read_bytes() != wanted[name]:
            problems.append(f"differs: {name}")
    problems += [f"extra: {name}" for name in sorted(present - set(wanted))]
    return problems


def write(directory: Path = VECTOR_DIR) -> None:
    wanted = build_all()
    directory.mkdir(parents=True, exist_ok=True)
    for name in _present(directory) - set(wanted):
        (directory / name).unlink()
    for root, dirs, files in os.walk(directory, topdown=False):
        if Path(root) != directory and not dirs and not files:
            Path(root).rmdir()  # emptied above: nothing in it is a vector
    for name, data in sorted(wanted.items()):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    parser.add_argument("--dir", type=Path, default=VECTOR_DIR)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.dir)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print("test vectors are stale: run python scripts/gen_vectors.py", file=sys.stderr)
            return 1
        return 0
    write(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
