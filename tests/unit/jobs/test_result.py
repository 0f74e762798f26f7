"""A job's result only the user can read (docs/protocol.md §14), from the attacker's side:
the host relays the bundle and may swap, cut or rewrite any of it."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from embassy.errors import (
    ConfigError,
    ResultOpenError,
    ResultTamperedError,
    ResultTruncatedError,
    ResultUnwrapError,
    ResultWrongJobError,
    ResultWrongReplyKeyError,
    UnsupportedSuiteError,
    WireFormatError,
)
from embassy.jobs.result import (
    RESULT_INFO_PREFIX,
    JobResultBundle,
    ReplyPrivateKey,
    WrappedResultKey,
    make_result_bundle,
    open_result,
    open_result_key,
    open_result_to,
    result_info,
    wrap_result_key,
)
from embassy.wire.codec import canonical_json
from workload_sdk.results import encrypt_result, result_stream_id
from workload_sdk.stream import MIN_CHUNK_SIZE

ROOT = Path(__file__).resolve().parents[3]
SUITE_NAMES = ["x25519", "mlkem768-x25519"]
USERS = {s: ReplyPrivateKey.generate(s) for s in SUITE_NAMES}
ALICE, BOB = USERS["x25519"], ReplyPrivateKey.generate("x25519")
BINDING = {
    "job": "11" * 16,
    "payload_id": "22" * 16,
    "embassy_keyid": "33" * 32,
    "image_digest": "sha256:" + "44" * 32,
}
OUTPUT = os.urandom(3 * MIN_CHUNK_SIZE + 17)


def _encrypt(key: bytes, data: bytes = OUTPUT, chunk_size: int = MIN_CHUNK_SIZE) -> bytes:
    out = io.BytesIO()
    made = encrypt_result(key, io.BytesIO(data), out, chunk_size=chunk_size)
    ciphertext = out.getvalue()
    assert made.size == len(ciphertext)
    assert made.sha256 == hashlib.sha256(ciphertext).hexdigest()
    return ciphertext


def _job(
    user: ReplyPrivateKey = ALICE,
    binding: dict[str, Any] = BINDING,
    data: bytes = OUTPUT,
    *,
    inline: bool = True,
) -> tuple[JobResultBundle, bytes]:
    """What the embassy and the job make for one job: (bundle, ciphertext)."""
    key, wrapped = wrap_result_key(user.public.to_json(), binding)
    ciphertext = _encrypt(key, data)
    bundle = make_result_bundle(
        job=binding["job"],
        wrapped_key=wrapped,
        ciphertext_sha256=hashlib.sha256(ciphertext).digest(),
        statements=[b'{"payloadType":"x"}', b"second"],
        log={"v": 1, "entries": []},
        ciphertext=ciphertext if inline else None,
    )
    return bundle, ciphertext


def _edit(bundle: JobResultBundle, **fields: Any) -> bytes:
    """The bundle's JSON with fields replaced, as a relaying host could send it."""
    return canonical_json({**bundle.to_json(), **fields})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- round trips --------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_a_result_round_trips_for_both_suites(suite: str) -> None:
    user = USERS[suite]
    bundle, _ = _job(user)
    data = bundle.to_bytes()
    assert JobResultBundle.parse(data) == bundle
    assert open_result(data, user, BINDING) == OUTPUT
    assert bundle.wrapped_key.suite == suite
    assert bundle.wrapped_key.binding == BINDING


@pytest.mark.parametrize("size", [0, 1, MIN_CHUNK_SIZE, 5 * MIN_CHUNK_SIZE])
def test_outputs_of_any_size_round_trip(size: int) -> None:
    data = os.urandom(size)
    bundle, _ = _job(data=data)
    assert open_result(bundle, ALICE, BINDING) == data


def test_a_ciphertext_delivered_beside_the_bundle_streams_to_a_file(tmp_path: Path) -> None:
    bundle, ciphertext = _job(inline=False)
    assert "ciphertext" not in bundle.to_json()
    (tmp_path / "ct").write_bytes(ciphertext)
    with (tmp_path / "ct").open("rb") as src, (tmp_path / "out").open("wb") as dst:
        assert open_result_to(bundle, ALICE, BINDING, dst, ciphertext=src) == len(OUTPUT)
    assert (tmp_path / "out").read_bytes() == OUTPUT
    assert open_result(bundle, ALICE, BINDING, ciphertext=ciphertext) == OUTPUT


def test_a_bundle_without_its_ciphertext_says_so() -> None:
    bundle, _ = _job(inline=False)
    with pytest.raises(ResultOpenError, match="carries no ciphertext"):
        open_result(bundle, ALICE, BINDING)


def test_each_result_key_is_fresh_and_its_stream_id_is_its_own() -> None:
    k1, w1 = wrap_result_key(ALICE.public, BINDING)
    k2, w2 = wrap_result_key(ALICE.public, BINDING)
    assert k1 != k2
    assert w1["wrapped"] != w2["wrapped"]
    assert result_stream_id(k1) != result_stream_id(k2)
    assert open_result_key(w1, BINDING, ALICE) == k1


def test_the_info_is_the_prefix_and_the_canonical_binding() -> None:
    assert result_info(BINDING) == b"embassy-job-result-v1\0" + canonical_json(BINDING)
    assert RESULT_INFO_PREFIX == b"embassy-job-result-v1\0"


# -- another user -------------------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_a_result_for_one_user_does_not_open_with_anothers_key(suite: str) -> None:
    bundle, _ = _job(USERS[suite])
    for other in (BOB, ReplyPrivateKey.generate(suite)):
        with pytest.raises(ResultWrongReplyKeyError, match="another user's reply key"):
            open_result(bundle, other, BINDING)


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_a_wrap_relabelled_with_the_other_users_keyid_still_does_not_unwrap(suite: str) -> None:
    """The keyid is a label: rewriting it to Bob's gets past the first check, not HPKE."""
    alice = USERS[suite]
    bob = ReplyPrivateKey.generate(suite)
    bundle, _ = _job(alice)
    relabelled = {**bundle.wrapped_key.to_json(), "reply_keyid": bob.public.keyid()}
    with pytest.raises(ResultUnwrapError, match="does not unwrap"):
        open_result(_edit(bundle, wrapped_key=relabelled), bob, BINDING)


def test_opening_alone_does_not_prove_who_made_the_result() -> None:
    """A host that wraps a key of its own to the user's reply key gets the same binding
    past open_result (HPKE base mode is not sender-authenticated): the signed statements,
    not decryption, say whose result it is. Pinned so nobody mistakes open for verify."""
    bundle, _ = _job()
    forged, _ = _job()  # same user, same binding, another key and ciphertext
    assert open_result(forged, ALICE, BINDING) == OUTPUT
    assert forged.wrapped_key != bundle.wrapped_key


# -- another job --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BINDING))
def test_a_binding_change_in_any_field_breaks_the_unwrap_and_names_it(name: str) -> None:
    bundle, _ = _job()
    expected = {**BINDING, name: "ff" * 16}
    with pytest.raises(ResultWrongJobError, match=f"binding.{name} is"):
        open_result(bundle, ALICE, expected)


def test_a_binding_with_a_field_more_or_less_is_another_job() -> None:
    bundle, _ = _job()
    with pytest.raises(ResultWrongJobError, match="binding has no 'extra'"):
        open_result(bundle, ALICE, {**BINDING, "extra": 1})
    fewer = {k: v for k, v in BINDING.items() if k != "job"}
    with pytest.raises(ResultWrongJobError, match=r"binding\.job is"):
        open_result(bundle, ALICE, fewer)


def test_a_binding_rewritten_to_the_expected_one_does_not_unwrap() -> None:
    """Another job's wrapped key with its binding label rewritten to this job's: HPKE's
    info was the other job's binding, so it does not unwrap."""
    other_job = {**BINDING, "job": "55" * 16}
    other, _ = _job(binding=other_job)
    mine, _ = _job()
    stolen = {**other.wrapped_key.to_json(), "binding": BINDING}
    with pytest.raises(ResultUnwrapError):
        open_result(_edit(mine, wrapped_key=stolen), ALICE, BINDING)


def test_another_jobs_wrapped_key_swapped_in_is_refused_as_another_job() -> None:
    other, _ = _job(binding={**BINDING, "job": "55" * 16})
    mine, _ = _job()
    swapped = _edit(mine, wrapped_key=other.wrapped_key.to_json())
    with pytest.raises(ResultWrongJobError, match=r"binding\.job is '5555"):
        open_result(swapped, ALICE, BINDING)


def test_another_jobs_ciphertext_swapped_in_is_refused_as_another_job() -> None:
    """The host swaps in the ciphertext of another job of the same user and fixes the
    digest: the stream was made under another result key."""
    mine, _ = _job()
    _, other_ct = _job(binding={**BINDING, "job": "55" * 16})
    swapped = _edit(
        mine, ciphertext=_b64(other_ct), ciphertext_sha256=hashlib.sha256(other_ct).hexdigest()
    )
    with pytest.raises(ResultWrongJobError, match="another result key"):
        open_result(swapped, ALICE, BINDING)


# -- tampering and truncation -------------------------------------------------------------


def _flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01  # always a change
    return bytes(out)


@pytest.mark.parametrize("at", [0, 40, 200, -1])
def test_a_changed_ciphertext_byte_fails_the_digest(at: int) -> None:
    bundle, ct = _job()
    with pytest.raises(ResultTamperedError, match="ciphertext_sha256"):
        open_result(_edit(bundle, ciphertext=_b64(_flip(ct, at))), ALICE, BINDING)


@pytest.mark.parametrize("at", [200, MIN_CHUNK_SIZE + 300, -1])
def test_a_changed_chunk_with_its_digest_fixed_fails_authentication(at: int) -> None:
    bundle, ct = _job()
    bad = _flip(ct, at)
    edited = _edit(bundle, ciphertext=_b64(bad), ciphertext_sha256=hashlib.sha256(bad).hexdigest())
    with pytest.raises(ResultTamperedError, match="does not authenticate"):
        open_result(edited, ALICE, BINDING)


@pytest.mark.parametrize("cut", [1, 16, 33 + 100])
def test_a_stream_cut_inside_a_chunk_with_its_digest_fixed_is_refused(cut: int) -> None:
    """Cut inside a record, the last record left is not whole: the stream cannot tell a cut
    from a change there, and neither gets through."""
    bundle, ct = _job()
    short = ct[:-cut]
    edited = _edit(
        bundle, ciphertext=_b64(short), ciphertext_sha256=hashlib.sha256(short).hexdigest()
    )
    with pytest.raises((ResultTruncatedError, ResultTamperedError)):
        open_result(edited, ALICE, BINDING)


def test_the_last_chunk_dropped_is_truncated() -> None:
    bundle, ct = _job()
    # 3 full chunks and a 17-byte last one: drop the last record (17 + 16 tag bytes).
    short = ct[: -(17 + 16)]
    edited = _edit(
        bundle, ciphertext=_b64(short), ciphertext_sha256=hashlib.sha256(short).hexdigest()
    )
    with pytest.raises(ResultTruncatedError, match="cut short"):
        open_result(edited, ALICE, BINDING)


def test_changed_wrapped_bytes_do_not_unwrap() -> None:
    bundle, _ = _job()
    wrapped = bundle.wrapped_key
    bad = {**wrapped.to_json(), "wrapped": _b64(_flip(wrapped.wrapped, -1))}
    with pytest.raises(ResultUnwrapError):
        open_result(_edit(bundle, wrapped_key=bad), ALICE, BINDING)


def test_a_failed_open_releases_no_plaintext() -> None:
    bundle, ct = _job()
    bad = _flip(ct, -1)  # the last chunk: every chunk before it authenticates
    edited = _edit(bundle, ciphertext=_b64(bad), ciphertext_sha256=hashlib.sha256(bad).hexdigest())
    result: bytes | None = None
    with pytest.raises(ResultTamperedError):
        result = open_result(edited, ALICE, BINDING)
    assert result is None


# -- strict parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "unsupported version 2"),
        ({"type": "embassy-result"}, "type"),
        ({"extra": 1}, "unknown field"),
        ({"ciphertext": None}, "ciphertext: expected a base64 string"),
        ({"ciphertext": "AAA"}, "ciphertext: not valid base64"),
        ({"job": "AB"}, "job: hex must be lower-case"),
        ({"job": ""}, "job: 1 to 64 bytes"),
        ({"ciphertext_sha256": "00"}, "ciphertext_sha256: expected 32 bytes"),
        ({"statements": "x"}, "statements: expected list"),
        ({"statements": ["!"]}, "statements\\[0\\]: not valid base64"),
        ({"statements": ["AA=="] * 65}, "more than 64 items"),
        ({"log": []}, "log: expected dict"),
        ({"wrapped_key": None}, "wrapped_key: expected dict"),
    ],
)
def test_a_malformed_bundle_is_refused_naming_the_field(
    change: dict[str, Any], message: str
) -> None:
    bundle, _ = _job()
    with pytest.raises(WireFormatError, match=message):
        JobResultBundle.parse(_edit(bundle, **change))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"v": 2}, "unsupported version 2"),
        ({"suite": "p256"}, "suite: unsupported HPKE suite 'p256'"),
        ({"reply_keyid": "00"}, "reply_keyid: expected 32 bytes"),
        ({"binding": []}, "binding: expected dict"),
        ({"binding": {"pad": "x" * 5000}}, "binding: .* bytes \\(at most 4096\\)"),
        ({"wrapped": ""}, "wrapped: 0 bytes is out of range"),
        ({"more": 1}, "unknown field"),
    ],
)
def test_a_malformed_wrapped_key_is_refused_naming_the_field(
    change: dict[str, Any], message: str
) -> None:
    bundle, _ = _job()
    with pytest.raises(WireFormatError, match=f"wrapped_key.*{message}"):
        JobResultBundle.parse(_edit(bundle, wrapped_key={**bundle.wrapped_key.to_json(), **change}))


def test_duplicate_keys_in_a_bundle_are_refused() -> None:
    bundle, _ = _job()
    data = bundle.to_bytes().replace(b'{"ciphertext":', b'{"ciphertext":"AA==","ciphertext":', 1)
    with pytest.raises(WireFormatError, match="duplicate JSON key 'ciphertext'"):
        JobResultBundle.parse(data)


def test_make_result_bundle_refuses_a_digest_that_is_not_the_ciphertexts() -> None:
    key, wrapped = wrap_result_key(ALICE.public, BINDING)
    with pytest.raises(ValueError, match="ciphertext_sha256"):
        make_result_bundle(
            job="11",
            wrapped_key=wrapped,
            ciphertext_sha256=b"\0" * 32,
            statements=[],
            log={},
            ciphertext=_encrypt(key),
        )


def test_wrap_refuses_a_binding_that_is_not_json_or_an_unknown_reply_suite() -> None:
    with pytest.raises(WireFormatError, match="binding"):
        wrap_result_key(ALICE.public, {"t": 1.5})
    with pytest.raises(UnsupportedSuiteError):
        wrap_result_key({"suite": "p256", "x25519": _b64(b"\0" * 32)}, BINDING)
    assert WrappedResultKey.parse(canonical_json(wrap_result_key(ALICE.public, BINDING)[1]))


# -- the private key file ----------------------------------------------------------------


@pytest.mark.parametrize("suite", SUITE_NAMES)
def test_the_private_key_file_round_trips_encrypted(suite: str) -> None:
    user = USERS[suite]
    pem = user.to_pem(b"correct horse")
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in pem
    assert b"BEGIN PRIVATE KEY" not in pem
    assert pem.count(b"BEGIN ENCRYPTED") == (1 if suite == "x25519" else 2)
    loaded = ReplyPrivateKey.from_pem(pem, b"correct horse")
    assert loaded.public == user.public
    bundle, _ = _job(user)
    assert open_result(bundle, loaded, BINDING) == OUTPUT


def test_the_private_key_file_needs_its_passphrase() -> None:
    pem = ALICE.to_pem(b"right")
    with pytest.raises(ConfigError, match="wrong passphrase"):
        ReplyPrivateKey.from_pem(pem, b"wrong")
    with pytest.raises(ConfigError, match="give its passphrase"):
        ReplyPrivateKey.from_pem(pem, None)
    with pytest.raises(ValueError, match="only encrypted"):
        ALICE.to_pem(b"")


def test_a_private_key_in_the_clear_is_refused() -> None:
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
    )

    clear = ALICE.x25519.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with pytest.raises(ConfigError, match="in the clear"):
        ReplyPrivateKey.from_pem(clear, b"x")
    with pytest.raises(WireFormatError, match="not an encrypted PKCS#8"):
        ReplyPrivateKey.from_pem(b"hello", b"x")


def test_a_key_file_of_the_wrong_kinds_is_refused() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        Encoding,
        PrivateFormat,
    )

    ed = Ed25519PrivateKey.generate().private_bytes(
        Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"p")
    )
    with pytest.raises(WireFormatError, match="Ed25519PrivateKey"):
        ReplyPrivateKey.from_pem(ed, b"p")
    hybrid = USERS["mlkem768-x25519"].to_pem(b"p")
    x_first = ALICE.to_pem(b"p") + hybrid  # X25519, ML-KEM, X25519: not a reply key
    with pytest.raises(WireFormatError, match="holds"):
        ReplyPrivateKey.from_pem(x_first, b"p")


# -- the SDK side ------------------------------------------------------------------------


def test_the_sdk_encrypts_a_result_without_embassy_or_hpke(tmp_path: Path) -> None:
    """The job's side runs where only cryptography 38 is (no HPKE, no ML-KEM) and embassy
    is not installed: import both away and encrypt; the user's side then opens it."""
    key, wrapped = wrap_result_key(ALICE.public, BINDING)
    plain = os.urandom(70_000)
    (tmp_path / "in").write_bytes(plain)
    (tmp_path / "key").write_bytes(key)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        banned = ('embassy', 'cryptography.hazmat.primitives.hpke',\n"
        "                  'cryptography.hazmat.primitives.asymmetric.mlkem')\n"
        "        if any(name == b or name.startswith(b + '.') for b in banned):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from workload_sdk.results import encrypt_result\n"
        "key = open(sys.argv[1], 'rb').read()\n"
        "with open(sys.argv[2], 'rb') as src, open(sys.argv[3], 'wb') as dst:\n"
        "    made = encrypt_result(key, src, dst)\n"
        "print(made.sha256)\n"
        "bad = sorted(m for m in sys.modules if m == 'embassy' or m.startswith('embassy.'))\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "key"),
            str(tmp_path / "in"),
            str(tmp_path / "ct"),
        ],
        cwd=ROOT,
        check=True,
        timeout=60,
        capture_output=True,
        text=True,
    )
    ciphertext = (tmp_path / "ct").read_bytes()
    assert done.stdout.strip() == hashlib.sha256(ciphertext).hexdigest()
    bundle = make_result_bundle(
        job=BINDING["job"],
        wrapped_key=wrapped,
        ciphertext_sha256=hashlib.sha256(ciphertext).digest(),
        statements=[],
        log={},
        ciphertext=ciphertext,
    )
    assert open_result(bundle, ALICE, BINDING) == plain
    source = (ROOT / "workload_sdk" / "results.py").read_text()
    assert "import embassy" not in source
    assert "from embassy" not in source
    assert "hpke" not in source.split('"""', 2)[2]  # no HPKE outside the docstring
