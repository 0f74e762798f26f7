"""The ``embassy`` command. Thin: parse arguments, call the library, map errors to exits.

Exit codes (the one place they are decided):

====  ===========================================================
0     everything checked / the command did what it says
1     verification failed (the reason is printed)
2     usage or config error, or a launch refused by policy
3     malformed input (a file that is not what it claims)
4     TPM, firewall or Docker error
5     durable state unreadable or tampered
6     the daemon refused the request
7     cannot reach the daemon
====  ===========================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embassy.errors import (
    ActivationError,
    ConfigError,
    EmbassyError,
    PolicyError,
    RequestError,
    SealError,
    StorageError,
    TpmError,
    VerificationError,
    WireFormatError,
    WorkloadError,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

_EXIT: tuple[tuple[type[EmbassyError], int], ...] = (
    (VerificationError, 1),
    (ConfigError, 2),
    (PolicyError, 2),
    (WireFormatError, 3),
    (ActivationError, 3),
    (TpmError, 4),
    (SealError, 4),
    (WorkloadError, 4),
    (StorageError, 5),
    (RequestError, 6),
)
EXIT_CONNECT = 7


def exit_code_for(error: EmbassyError) -> int:
    from embassy.client import ConnectError

    if isinstance(error, ConnectError):
        return EXIT_CONNECT
    for cls, code in _EXIT:
        if isinstance(error, cls):
            return code
    return 1


def _read(path: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _hex(text: str, what: str, size: int | None = None) -> bytes:
    try:
        value = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{what}: not hex: {text!r}") from None
    if size is not None and len(value) != size:
        raise ConfigError(f"{what}: expected {size} bytes, got {len(value)}")
    return value


def _write_out(data: bytes, out: str | None, *, newline: bool = True) -> None:
    if out is None or out == "-":
        sys.stdout.buffer.write(data + b"\n" if newline else data)
    else:
        from embassy.daemon.atomic import write_atomic

        write_atomic(Path(out), data, mode=0o644)


def positive_int(text: str) -> int:
    """argparse type: a count of seconds, so a bad value is a usage error (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


# -- private keys ----------------------------------------------------------------------

PASSPHRASE_ENV = "EMBASSY_KEY_PASSPHRASE"  # noqa: S105 (the variable's name, not a secret)


def _passphrase() -> bytes | None:
    value = os.environ.get(PASSPHRASE_ENV)
    if value is None:
        return None
    if not value:
        raise ConfigError(f"{PASSPHRASE_ENV} is set but empty: unset it or give a passphrase")
    return value.encode("utf-8")


def _load_signing_key(path: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS#8 PEM file, decrypted with the env passphrase."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    data, passphrase = _read(path), _passphrase()
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    if encrypted and passphrase is None:
        raise ConfigError(f"{path}: the key is encrypted: set {PASSPHRASE_ENV}")
    if not encrypted and passphrase is not None:
        sys.stderr.write(f"embassy: WARNING {path} is not encrypted; {PASSPHRASE_ENV} unused\n")
        passphrase = None
    try:
        key = load_pem_private_key(data, passphrase)
    except ValueError:
        if encrypted:
            raise ConfigError(f"{path}: wrong passphrase in {PASSPHRASE_ENV}") from None
        raise ConfigError(f"{path}: not a PEM (PKCS#8) private key") from None
    except TypeError as exc:  # cannot happen after the checks above; never a traceback
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: a {type(key).__name__} key, not an Ed25519 key")
    return key


def _write_new_private(path: Path, data: bytes) -> None:
    """Write a secret once (:func:`embassy.daemon.atomic.create_private`)."""
    from embassy.daemon.atomic import create_private

    try:
        create_private(path, data)
    except FileExistsError:
        raise ConfigError(f"{path}: exists; refusing to overwrite a key") from None
    except StorageError as exc:  # a path given on the command line: the caller's to fix
        raise ConfigError(exc.message) from None


# -- commands --------------------------------------------------------------------------


def _cmd_serve(args: argparse.Namespace) -> int:
    from embassy import logs
    from embassy.config import load_config
    from embassy.daemon.runtime import serve

    config = load_config(Path(args.config) if args.config else None, os.environ)
    logs.configure(config.log_level)
    serve(config)
    return 0


def _cmd_spool(args: argparse.Namespace) -> int:
    from embassy.config import load_config
    from embassy.daemon.spool import ensure_spool

    config = load_config(Path(args.config) if args.config else None, os.environ)
    print(ensure_spool(config.data_dir / "activations", config.metering))
    return 0


def _cmd_measure(args: argparse.Namespace) -> int:
    from embassy.config import load_config
    from embassy.measure import measure

    m = measure(load_config(Path(args.config) if args.config else None, read_metadata=False))
    if args.uki:
        # The whole expectation an auditor pins: the image's boot PCRs and the embassy's
        # measurement, from the UKI and config the image build produced (docs/image.md).
        from embassy.image.expected import expected_image
        from embassy.image.uki import DEFAULT_PHASES

        phases = DEFAULT_PHASES if args.phases is None else [p for p in args.phases.split(",") if p]
        expected = expected_image(_read(args.uki), m, phases, secure_boot=args.secure_boot)
        sys.stdout.write(expected.encode().decode() + "\n")
        return 0
    sys.stdout.write(m.encode().decode() + "\n" if args.json else m.digest.hex() + "\n")
    return 0


def _cmd_identity(args: argparse.Namespace) -> int:
    from embassy.client import call
    from embassy.wire.codec import canonical_json

    socket_path = Path(args.socket)
    doc = call(socket_path, "GET", "/v1/identity")
    if args.no_activate:
        sys.stderr.write(
            "identity: WARNING --no-activate: the AK is not proven to live in the TPM whose "
            "EK certificate the document carries\n"
        )
    else:
        _activate(socket_path, doc)
        sys.stderr.write(
            "identity: credential activation passed: the AK is in the TPM that "
            "holds the certified EK\n"
        )
    _write_out(canonical_json(doc), args.out)
    return 0


def _activate(socket_path: Path, doc: dict[str, Any]) -> bytes:
    """Challenge the daemon to prove its AK and the certified EK share one TPM; return the
    AK's TPM name."""
    from embassy.attest.credential import check_activation, make_credential
    from embassy.attest.marshal import parse_public
    from embassy.client import call
    from embassy.verify.identity import identity_tpm_unverified
    from embassy.wire.codec import b64decode, b64encode

    ak_raw, ek_raw, _ = identity_tpm_unverified(doc)
    ak_name = parse_public(ak_raw).name()
    secret = os.urandom(32)
    blob, encrypted = make_credential(parse_public(ek_raw), ak_name, secret)
    answer = call(
        socket_path,
        "POST",
        "/v1/attestation/activate-credential",
        {"credential_blob": b64encode(blob), "encrypted_secret": b64encode(encrypted)},
    )
    check_activation(secret, b64decode(answer.get("secret"), "secret"))
    return ak_name


def _policy(args: argparse.Namespace) -> Any:
    from embassy.attest.ek import load_pem_bundle
    from embassy.verify.policy import TrustPolicy

    pcrs: dict[int, bytes] = {}
    for item in args.expect_pcr or []:
        index, _, value = item.partition("=")
        if not index.isdigit() or not value:
            raise ConfigError(f"--expect-pcr {item!r}: expected N=HEX")
        pcrs[int(index)] = _hex(value, f"--expect-pcr {index}", 32)
    measurement = (
        _hex(args.expect_measurement, "--expect-measurement", 32)
        if args.expect_measurement
        else None
    )
    if args.expected:
        measurement = _pin_expected(args.expected, pcrs, measurement)

    def bundles(paths: list[str] | None) -> tuple[Any, ...]:
        return tuple(c for path in paths or [] for c in load_pem_bundle(_read(path)))

    activated: frozenset[bytes] = frozenset()
    if args.activate:
        from embassy.client import call

        socket_path = Path(args.activate)
        activated = frozenset({_activate(socket_path, call(socket_path, "GET", "/v1/identity"))})
    return TrustPolicy(
        ek_cas=bundles(args.ek_ca),
        software_ek_cas=bundles(args.swtpm_ca),
        ak_cas=bundles(args.ak_ca),
        vtpm_ak_cas=bundles(args.vtpm_ak_ca),
        insecure_skip_ak_certificate=args.insecure_skip_ak_certificate,
        activated_aks=activated,
        expected_measurement=measurement,
        expected_pcrs=pcrs,
        allow_software_tpm=args.allow_software_tpm,
        insecure_skip_ek_ca=args.insecure_skip_ek_ca,
        insecure_any_measurement=args.insecure_any_measurement,
        insecure_any_boot=args.insecure_any_boot,
        expected_image_digest=_image_digest(args.expect_image_digest),
        expected_launch_digest=(
            _hex(args.expect_launch_digest, "--expect-launch-digest", 32)
            if args.expect_launch_digest
            else None
        ),
    )


def _image_digest(text: str | None) -> str | None:
    """An image ID as Docker writes it: ``sha256:`` and 64 hex digits (the prefix may be
    left out)."""
    if text is None:
        return None
    hexpart = text.removeprefix("sha256:")
    _hex(hexpart, "--expect-image-digest", 32)
    return "sha256:" + hexpart.lower()


def _pin_expected(path: str, pcrs: dict[int, bytes], measurement: bytes | None) -> bytes | None:
    """Add an image's expected.json to the pins; a flag that contradicts it is an error."""
    from embassy.image.expected import parse_expected

    expected = parse_expected(_read(path))
    for index, value in sorted(expected.pcrs.items()):
        if pcrs.setdefault(index, value) != value:
            raise ConfigError(f"--expect-pcr {index} contradicts PCR {index} of {path}")
    if expected.measurement is None:
        return measurement
    if measurement is not None and measurement != expected.measurement.digest:
        raise ConfigError(f"--expect-measurement contradicts the measurement in {path}")
    return expected.measurement.digest


def _cmd_verify(args: argparse.Namespace) -> int:
    from embassy.verify import report

    if args.what == "job" and args.reply_key:
        from embassy.jobs.result import ReplyPrivateKey

        args.reply_private = ReplyPrivateKey.from_pem(
            _read(args.reply_key), _passphrase(), f"--reply-key {args.reply_key}"
        )
    result = report.run(args.what, args, _policy(args), _read)
    if args.json:
        sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    else:
        for check in result["checks"]:
            sys.stdout.write(f"ok    {check}\n")
        for line in result.get("facts", []):
            sys.stdout.write(f"      {line}\n")
        sys.stdout.write("verified\n")
    return 0


# -- parser ----------------------------------------------------------------------------


def _add_policy_args(p: Any) -> None:
    """What an auditor or user trusts: the same flags wherever evidence is checked."""
    p.add_argument(
        "--ek-ca",
        action="append",
        help="PEM bundle of hardware TPM makers' EK CAs (repeatable)",
    )
    p.add_argument(
        "--swtpm-ca",
        action="append",
        help="PEM bundle of software TPMs' EK CAs (swtpm's local CA); their TPMs are software "
        "TPMs, accepted only with --allow-software-tpm (repeatable)",
    )
    p.add_argument(
        "--ak-ca",
        action="append",
        help="PEM bundle of registrars' CAs whose AK certificates you trust (repeatable)",
    )
    p.add_argument(
        "--vtpm-ak-ca",
        action="append",
        help="PEM bundle of cloud vTPM AK CAs that vouch for an AK directly (repeatable)",
    )
    p.add_argument(
        "--activate",
        metavar="SOCKET",
        help="prove the AK live by credential activation with the daemon at SOCKET, instead "
        "of an AK certificate",
    )
    p.add_argument("--expect-measurement", help="the embassy measurement you rebuilt (hex)")
    p.add_argument(
        "--expect-image-digest",
        metavar="sha256:HEX",
        help="pin the workload's image: its image ID (docker image inspect -f {{.Id}})",
    )
    p.add_argument(
        "--expect-launch-digest",
        metavar="HEX",
        help="pin the workload's launch configuration digest (its launch events)",
    )
    p.add_argument("--expect-pcr", action="append", help="pin a boot PCR: N=HEX")
    p.add_argument(
        "--expected",
        metavar="EXPECTED_JSON",
        help="pin the boot PCRs and the measurement an image build gave (expected.json)",
    )
    p.add_argument(
        "--allow-software-tpm",
        action="store_true",
        help="INSECURE: accept evidence from a software TPM (testing only)",
    )
    p.add_argument(
        "--insecure-skip-ek-ca",
        action="store_true",
        help="INSECURE: do not check the EK certificate's issuer",
    )
    p.add_argument(
        "--insecure-skip-ak-certificate",
        action="store_true",
        help="INSECURE: accept an AK that nothing ties to the EK certificate's TPM",
    )
    p.add_argument(
        "--insecure-any-measurement",
        action="store_true",
        help="INSECURE: accept any embassy measurement",
    )
    p.add_argument(
        "--insecure-any-boot",
        action="store_true",
        help="INSECURE: accept hardware-TPM evidence without pinned boot PCRs",
    )


def _cmd_payload_seal(args: argparse.Namespace) -> int:
    from embassy.metering.actions import MAX_INSTRUCTIONS, seal_actions
    from embassy.payload.envelope import make_payload
    from embassy.verify.identity import verify_identity_document
    from embassy.wire.codec import canonical_json
    from workload_sdk.stream import encrypt_stream

    paths: list[str] = args.instruction or []
    if paths and not args.actions:
        raise ConfigError(
            "payload seal: --instruction needs --actions (where the sealed actions go)"
        )
    if args.actions and not paths:
        raise ConfigError("payload seal: --actions needs at least one --instruction")
    if args.unmetered_ok and not paths:
        raise ConfigError("payload seal: --unmetered-ok applies only with --instruction")
    if len(paths) > MAX_INSTRUCTIONS:
        raise ConfigError(f"payload seal: at most {MAX_INSTRUCTIONS} --instruction per payload")
    # Never wrap a key to an embassy whose identity does not verify under your policy.
    identity = verify_identity_document(_read(args.identity), _policy(args))
    reply_key = _reply_public(args.reply_key) if args.reply_key else None
    if args.job:
        # A job's payload binds the jobs' launch digest (the identity's jobs-ready statement).
        from embassy.verify.job import jobs_launch

        if reply_key is None:
            raise ConfigError("payload seal --job: a job's result needs --reply-key")
        launch_digest = jobs_launch(identity).launch_digest
    elif identity.workload is None:
        raise ConfigError(
            "payload seal: the identity shows no workload launched beside the embassy, and a "
            "payload is bound to the workload that opens it (for a job: --job)"
        )
    else:
        launch_digest = identity.workload.launch_digest
    instructions = _instructions_for(paths, identity.keys, args.ttl)
    # Bound to what the verified identity proves: only an embassy of this measurement,
    # running this workload, opens the payload.
    envelope, input_key, action_key = make_payload(
        identity.keys,
        measurement=identity.measurement.digest,
        launch_digest=launch_digest,
        suite=args.suite,
        ttl_seconds=args.ttl,
        action_key=bool(paths),
        reply_key=reply_key,
    )
    try:
        with open(args.input, "rb") as src, open(args.out, "wb") as dst:
            encrypt_stream(input_key, envelope.payload_id, src, dst)
    except OSError as exc:
        raise ConfigError(f"payload: {exc.filename}: {exc.strerror}") from None
    _write_out(canonical_json(envelope.to_json()), args.envelope)
    if action_key is not None:
        blob = seal_actions(
            action_key, envelope.payload_id, instructions, unmetered_ok=args.unmetered_ok
        )
        _write_out(blob, args.actions, newline=False)
    sys.stderr.write(
        f"payload {envelope.payload_id.hex()} sealed to embassy {envelope.embassy_keyid[:16]}… "
        f"({envelope.suite}), measurement {envelope.measurement.hex()[:16]}…, workload "
        f"{'jobs' if identity.workload is None or args.job else identity.workload.name} "
        f"(launch digest {envelope.launch_digest.hex()[:16]}…); "
        f"expires at {envelope.expires_unix}"
        + (
            f"; {len(instructions)} instruction(s) sealed in its actions"
            + (" (unmetered if refused)" if args.unmetered_ok else "")
            if instructions
            else ""
        )
        + ("" if reply_key is None else f"; results to reply key {reply_key.keyid()[:16]}…")
        + "\n"
    )
    return 0


def _reply_public(path: str) -> Any:
    """A reply key's public JSON (what ``keygen --reply`` printed)."""
    from embassy.payload.envelope import ReplyKey

    return ReplyKey.parse(_read(path).strip(), f"{path}: reply key")


def _instructions_for(paths: Sequence[str], identity_keys: Any, ttl: int) -> list[bytes]:
    """Read signed instructions and refuse any the embassy would refuse for the asking."""
    from embassy.metering.instruction import (
        INSTRUCTION_PAYLOAD_TYPE,
        parse_instruction_payload,
    )
    from embassy.payload.envelope import embassy_keyid
    from embassy.wire.dsse import parse_envelope

    own, now = embassy_keyid(identity_keys), int(time.time())
    out = []
    for path in paths:
        data = _read(path).strip()  # JSON: trailing whitespace (a newline) means nothing
        envelope = parse_envelope(data)
        if envelope.payload_type != INSTRUCTION_PAYLOAD_TYPE:
            raise WireFormatError(f"{path}: not an instruction ({envelope.payload_type!r})")
        instruction = parse_instruction_payload(envelope.payload)
        if instruction.embassy_keyid != own:
            raise ConfigError(
                f"{path}: the instruction is for embassy {instruction.embassy_keyid[:16]}…, "
                f"not this one ({own[:16]}…)"
            )
        if instruction.expires_unix <= now:
            raise ConfigError(f"{path}: the instruction expired at {instruction.expires_unix}")
        if instruction.expires_unix < now + ttl:
            sys.stderr.write(
                f"embassy: WARNING {path}: the instruction expires at "
                f"{instruction.expires_unix}, before the payload does; a session opened later "
                "is refused\n"
            )
        out.append(data)
    return out


# -- metering: authorities' side -------------------------------------------------------


def _cmd_reply_keygen(args: argparse.Namespace) -> int:
    """A reply key pair: the private key encrypted (never in the clear), the public printed."""
    from embassy.jobs.result import ReplyPrivateKey
    from embassy.payload.envelope import SUITE_MLKEM768_X25519
    from embassy.wire.codec import canonical_json

    if args.name:
        raise ConfigError("keygen --reply: --name is for an authority's key")
    passphrase = _passphrase()
    if passphrase is None:
        raise ConfigError(
            f"keygen --reply: a reply key is never written in the clear: set {PASSPHRASE_ENV}"
        )
    key = ReplyPrivateKey.generate(args.suite or SUITE_MLKEM768_X25519)
    _write_new_private(Path(args.out), key.to_pem(passphrase))
    sys.stderr.write(
        f"keygen: wrote reply key {args.out} ({key.suite}, encrypted with {PASSPHRASE_ENV}); "
        "give the public key below to `embassy payload seal --reply-key`\n"
    )
    public = canonical_json(key.public.to_json())
    if args.public_out:
        _write_out(public, args.public_out)
    sys.stdout.write(public.decode() + "\n")
    return 0


def _cmd_keygen(args: argparse.Namespace) -> int:
    if args.reply:
        return _cmd_reply_keygen(args)
    if args.suite or args.public_out:
        raise ConfigError("keygen: --suite and --public-out are for a reply key (--reply)")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        BestAvailableEncryption,
        Encoding,
        KeySerializationEncryption,
        NoEncryption,
        PrivateFormat,
    )

    from embassy.wire.codec import b64encode
    from embassy.wire.dsse import keyid, raw_public_key

    passphrase = _passphrase()
    encryption: KeySerializationEncryption = (
        NoEncryption() if passphrase is None else BestAvailableEncryption(passphrase)
    )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, encryption)
    _write_new_private(Path(args.out), pem)
    if passphrase is None:
        sys.stderr.write(
            f"keygen: WARNING {args.out} is NOT encrypted: anyone who reads it can sign as "
            f"this key. Set {PASSPHRASE_ENV} to encrypt it.\n"
        )
    else:
        sys.stderr.write(f"keygen: wrote {args.out} (encrypted with {PASSPHRASE_ENV})\n")
    public = key.public_key()
    entry = {
        "name": args.name,
        "ed25519": b64encode(raw_public_key(public)),
        "keyid": keyid(public),
    }
    sys.stdout.write(json.dumps(entry, sort_keys=True) + "\n")
    return 0


def _cmd_meters_instruct(args: argparse.Namespace) -> int:
    from embassy.metering.instruction import Op, Polarity, make_instruction
    from embassy.metering.reading import reply_public_bytes
    from embassy.payload.envelope import embassy_keyid
    from embassy.verify.identity import verify_identity_document

    key = _load_signing_key(args.key)
    op = Op(args.op)
    # Never instruct an embassy whose identity does not verify under your policy.
    identity = verify_identity_document(_read(args.identity), _policy(args))
    target = embassy_keyid(identity.keys)
    expires = int(time.time()) + args.ttl
    try:
        data = make_instruction(
            key,
            op=op,
            authority=args.authority,
            capabilities=args.capability or [],
            embassy_keyid=target,
            expires_unix=expires,
            polarity=None if args.polarity is None else Polarity(args.polarity),
            reply_key=reply_public_bytes(key) if op is Op.READ else None,
        )
    except WireFormatError as exc:  # the shape the user asked for, not a malformed file
        raise ConfigError(f"meters instruct: {exc.message}") from None
    _write_out(data, args.out)
    sys.stderr.write(
        f"instruction {op.value} {sorted(args.capability or [])} by {args.authority!r} "
        f"for embassy {target[:16]}…; expires at {expires}\n"
    )
    return 0


def _reading_bytes(path: str) -> bytes:
    """A meter-reading statement: its DSSE JSON, or that in base64 as the daemon returns it."""
    from embassy.wire.codec import b64decode

    data = _read(path).strip()
    if data.startswith(b"{"):
        return data
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise WireFormatError(f"{path}: neither a DSSE envelope nor its base64") from None
    return b64decode(text, f"{path}: meter reading")


def _cmd_meters_read(args: argparse.Namespace) -> int:
    from embassy.metering.instruction import (
        INSTRUCTION_PAYLOAD_TYPE,
        Op,
        parse_instruction_payload,
    )
    from embassy.metering.reading import open_reading
    from embassy.verify.identity import verify_identity_document
    from embassy.wire.dsse import keyid, parse_envelope

    key = _load_signing_key(args.key)
    digest = None
    if args.instruction:
        envelope = parse_envelope(_read(args.instruction).strip())
        if envelope.payload_type != INSTRUCTION_PAYLOAD_TYPE:
            raise WireFormatError(f"{args.instruction}: not an instruction")
        instruction = parse_instruction_payload(envelope.payload)
        if instruction.op is not Op.READ or instruction.authority != args.authority:
            raise ConfigError(
                f"{args.instruction}: a {instruction.op.value} instruction of "
                f"{instruction.authority!r}, not a read of {args.authority!r}"
            )
        digest = instruction.digest
    reading_data = _reading_bytes(args.reading)
    identity = verify_identity_document(_read(args.identity), _policy(args))
    reading = open_reading(
        reading_data,
        embassy_key=identity.signing_key,
        embassy_keyid=keyid(identity.signing_key),
        signing_key=key,
        authority=args.authority,
        instruction_sha256=digest,
    )
    assert reading.header is not None  # open_reading sets it from the verified statement
    result = {
        "authority": reading.authority,
        "instruction_sha256": reading.instruction_sha256.hex(),
        "formula": reading.formula,
        "as_of_seq": reading.as_of_seq,
        "statement_seq": reading.header.seq,
        "meters": [m.to_json() for m in reading.meters],
    }
    sys.stdout.write(json.dumps(result, sort_keys=True) + "\n")
    sys.stderr.write(
        f"meters read: signed by embassy {keyid(identity.signing_key)[:16]}… and decrypted"
        + ("" if digest is None else ", answering your instruction")
        + f"; check its log position (seq {reading.header.seq}) with `embassy verify statement`\n"
    )
    return 0


def _payload_parser(sub: Any) -> None:
    payload = sub.add_parser("payload", help="make sealed payloads (user side)")
    kinds = payload.add_subparsers(dest="what", required=True)
    seal = kinds.add_parser(
        "seal", help="encrypt an input to a verified embassy: a stream and its envelope"
    )
    seal.add_argument("--identity", required=True, help="the embassy's identity document")
    seal.add_argument("--in", dest="input", required=True, help="the plaintext input file")
    seal.add_argument("--out", required=True, help="where to write the encrypted stream")
    seal.add_argument("--envelope", required=True, help="where to write the envelope (JSON)")
    seal.add_argument(
        "--suite", choices=["mlkem768-x25519", "x25519"], default="mlkem768-x25519",
        help="HPKE suite (default: the post-quantum hybrid)",
    )  # fmt: skip
    seal.add_argument(
        "--ttl", type=positive_int, default=3600, help="seconds until the payload expires"
    )
    seal.add_argument(
        "--instruction",
        action="append",
        metavar="FILE",
        help="an authority's signed instruction to seal into the payload's actions (repeatable)",
    )
    seal.add_argument(
        "--actions", metavar="OUT", help="where to write the sealed actions (with --instruction)"
    )
    seal.add_argument(
        "--job",
        action="store_true",
        help="for a job (POST /v1/jobs): bind the identity's jobs launch digest, not its "
        "workload's (needs --reply-key)",
    )
    seal.add_argument(
        "--reply-key",
        metavar="FILE",
        help="your reply key's public JSON (keygen --reply printed it): a job's result is "
        "encrypted to it",
    )
    seal.add_argument(
        "--unmetered-ok",
        action="store_true",
        help="if the embassy refuses an instruction, run the session unmetered (default: abort)",
    )
    _add_policy_args(seal)
    seal.set_defaults(func=_cmd_payload_seal)


def _cmd_result_open(args: argparse.Namespace) -> int:
    """Decrypt a job's result with the user's reply key. Plaintext reaches ``--out`` only
    once all of it authenticated (a temporary file renamed into place, removed on error)."""
    import tempfile

    from embassy.jobs.result import JobResultBundle, ReplyPrivateKey, open_result, open_result_to

    key = ReplyPrivateKey.from_pem(_read(args.key), _passphrase(), f"--key {args.key}")
    bundle = JobResultBundle.parse(_read(args.bundle).strip())
    # Opened under the binding the bundle names: decryption proves no more than that the
    # result was wrapped to this reply key. `embassy verify job` checks the embassy signed it.
    binding = bundle.wrapped_key.binding
    if args.out == "-":
        ciphertext = None if args.ciphertext is None else _read(args.ciphertext)
        sys.stdout.buffer.write(open_result(bundle, key, binding, ciphertext=ciphertext))
        size = None
    else:
        out = Path(args.out)
        fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as dst:
                if args.ciphertext is None:
                    size = open_result_to(bundle, key, binding, dst)
                else:
                    with open(args.ciphertext, "rb") as src:
                        size = open_result_to(bundle, key, binding, dst, ciphertext=src)
                dst.flush()
                os.fsync(dst.fileno())
            tmp.replace(out)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"result open: {exc.filename or args.out}: {exc.strerror}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    sys.stderr.write(
        f"result of job {bundle.job} decrypted"
        + ("" if size is None else f" ({size} bytes to {args.out})")
        + f"; bound to {json.dumps(binding, sort_keys=True)}. Decryption does not show who "
        "made it: check the job with `embassy verify job`\n"
    )
    return 0


def _result_parser(sub: Any) -> None:
    result = sub.add_parser("result", help="open a job's encrypted result (user side)")
    kinds = result.add_subparsers(dest="what", required=True)
    open_ = kinds.add_parser("open", help="decrypt a job result bundle with your reply key")
    open_.add_argument(
        "--key",
        required=True,
        metavar="FILE",
        help="your reply private key (keygen --reply; $EMBASSY_KEY_PASSPHRASE)",
    )
    open_.add_argument("--bundle", required=True, metavar="FILE", help="the job result bundle")
    open_.add_argument(
        "--ciphertext",
        metavar="FILE",
        help="the result's ciphertext, when the bundle does not carry it",
    )
    open_.add_argument(
        "--out", required=True, metavar="FILE", help="where the plaintext goes ('-': stdout)"
    )
    open_.set_defaults(func=_cmd_result_open)


def _keygen_parser(sub: Any) -> None:
    keygen = sub.add_parser(
        "keygen",
        help="make an Ed25519 key for an authority (encrypted with $EMBASSY_KEY_PASSPHRASE)",
    )
    keygen.add_argument(
        "--out", required=True, metavar="FILE", help="the new private key file (PKCS#8 PEM)"
    )
    keygen.add_argument(
        "--name", metavar="NAME", help="the authority's name, for the printed config entry"
    )
    keygen.add_argument(
        "--reply",
        action="store_true",
        help="make a user's reply key instead (HPKE, for job results): needs "
        "$EMBASSY_KEY_PASSPHRASE; prints the public key JSON",
    )
    keygen.add_argument(
        "--suite", choices=["mlkem768-x25519", "x25519"],
        help="with --reply: the HPKE suite (default: the post-quantum hybrid)",
    )  # fmt: skip
    keygen.add_argument(
        "--public-out", metavar="FILE", help="with --reply: write the public key JSON here too"
    )
    keygen.set_defaults(func=_cmd_keygen)


def _meters_parser(sub: Any) -> None:
    meters = sub.add_parser("meters", help="instruct an embassy and read its meters (authority)")
    kinds = meters.add_subparsers(dest="what", required=True)
    instruct = kinds.add_parser("instruct", help="sign an instruction for a verified embassy")
    read = kinds.add_parser("read", help="verify and decrypt a meter-reading statement")
    for p in (instruct, read):
        p.add_argument(
            "--key", required=True, metavar="FILE", help="the authority's private key (PEM)"
        )
        p.add_argument(
            "--authority", required=True, metavar="NAME", help="the authority's name in the policy"
        )
        p.add_argument(
            "--identity", required=True, metavar="FILE", help="the embassy's identity document"
        )
    instruct.add_argument("--op", required=True, choices=["write", "update", "read"])
    instruct.add_argument(
        "--capability",
        action="append",
        metavar="C",
        help="a capability (repeatable; write names one)",
    )
    instruct.add_argument(
        "--polarity", choices=["positive", "negative"], help="write only: the samples' kind"
    )
    instruct.add_argument(
        "--ttl",
        type=positive_int,
        default=3600,
        metavar="SECONDS",
        help="seconds until the instruction expires (default 3600)",
    )
    instruct.add_argument(
        "--out", metavar="FILE", help="write the instruction here (default stdout)"
    )
    instruct.set_defaults(func=_cmd_meters_instruct)
    read.add_argument("--instruction", metavar="FILE", help="the read instruction it must answer")
    read.add_argument(
        "reading", metavar="READING", help="the meter-reading statement (JSON or base64; '-' stdin)"
    )
    read.set_defaults(func=_cmd_meters_read)
    for p in (instruct, read):
        _add_policy_args(p)


def _verify_parser(sub: Any) -> None:
    verify = sub.add_parser("verify", help="check evidence offline (no TPM, root or Docker)")
    verify.set_defaults(func=_cmd_verify)
    kinds = verify.add_subparsers(dest="what", required=True)
    specs = {
        "identity": "an identity document",
        "log": "log segments (GET /v1/log), against an identity document",
        "statement": "one statement envelope, found in a verified log segment",
        "evidence": "fresh evidence (GET /v1/evidence) over your nonce",
        "result": "a result bundle: output, seal and unseal statements, and their log",
        "job": "a job's result bundle: sealed from birth, key once, committed, destroyed",
    }
    for name, help_text in specs.items():
        p = kinds.add_parser(name, help=f"verify {help_text}")
        p.add_argument(
            "file", nargs="+" if name == "log" else None, help="the file to verify ('-' for stdin)"
        )
        if name != "identity":
            p.add_argument("--identity", required=True, help="the identity document")
        if name == "statement":
            p.add_argument("--log", required=True, help="a log segment containing it")
        if name == "evidence":
            p.add_argument("--nonce", required=True, help="the nonce you sent (hex)")
        if name == "job":
            p.add_argument("--payload-id", help="your payload's id (hex): the job opened it")
            p.add_argument(
                "--reply-key",
                metavar="FILE",
                help="your private reply key (keygen --reply; its passphrase in the "
                "environment): the result must open with it",
            )
        if name == "result":
            p.add_argument("--payload-id", help="your payload's id (hex): the session opened it")
            for when, what in (("before", "before sending"), ("after", "after receiving")):
                p.add_argument(f"--{when}", metavar="EVIDENCE", help=f"evidence you fetched {what}")
                p.add_argument(f"--{when}-nonce", metavar="HEX", help=f"the --{when} nonce")
        if name == "log":
            p.add_argument(
                "--complete",
                action="store_true",
                help="show that no entry follows the last segment (needs --evidence, --nonce)",
            )
            p.add_argument("--evidence", help="fresh evidence fetched after the log")
            p.add_argument("--nonce", help="the nonce of --evidence (hex)")
        _add_policy_args(p)
        p.add_argument("--json", action="store_true", help="machine-readable result")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embassy", description=__doc__.splitlines()[0] if __doc__ else None
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the daemon")
    serve.add_argument("--config", help="YAML config file (default: built-in defaults)")
    serve.set_defaults(func=_cmd_serve)
    spool = sub.add_parser(
        "spool",
        help="mount the activation spool (or check the one mounted): for a host where the "
        "daemon runs sandboxed in a mount namespace of its own and cannot mount it itself",
    )
    spool.add_argument("--config", help="YAML config file (default: built-in defaults)")
    spool.set_defaults(func=_cmd_spool)
    identity = sub.add_parser("identity", help="fetch the identity document from a daemon")
    identity.add_argument("--socket", default="/run/embassy/embassy.sock")
    identity.add_argument("--out", help="write the document here (default stdout)")
    identity.add_argument(
        "--no-activate",
        action="store_true",
        help="skip the live credential-activation check of AK and EK",
    )
    identity.set_defaults(func=_cmd_identity)
    measure = sub.add_parser("measure", help="print the reproducible measurement")
    measure.add_argument("--config", help="the config file the daemon runs with")
    measure.add_argument("--json", action="store_true", help="print all components")
    measure.add_argument(
        "--uki",
        metavar="FILE",
        help="the image's unified kernel image: print expected.json (boot PCRs + measurement)",
    )
    measure.add_argument(
        "--phases",
        metavar="P1,P2",
        help="systemd-pcrphase words in PCR 11 when quoted (default: up to 'ready')",
    )
    measure.add_argument(
        "--secure-boot",
        action="store_true",
        help="predict for a boot with UEFI Secure Boot on (changes PCR 4 for some stubs)",
    )
    measure.set_defaults(func=_cmd_measure)
    _verify_parser(sub)
    _payload_parser(sub)
    _keygen_parser(sub)
    _result_parser(sub)
    _meters_parser(sub)
    from embassy.registrar.cli import add_parser as add_registrar_parser

    add_registrar_parser(sub)
    from embassy.broker.cli import add_parser as add_broker_parser

    add_broker_parser(sub)
    from embassy.weights.cli import add_parser as add_weights_parser

    add_weights_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    try:
        return int(args.func(args))
    except EmbassyError as exc:
        code = exit_code_for(exc)
        if getattr(args, "json", False) and args.command == "verify":
            sys.stdout.write(
                json.dumps({"ok": False, "error": {"code": exc.code, "message": exc.message}})
                + "\n"
            )
        sys.stderr.write(f"embassy: {exc.code}: {exc.message}\n")
        return code
