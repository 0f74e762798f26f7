"""An independent checker of the in-toto attestation framework's v1 rules, for tests.

Written from the specification (in-toto/attestation ``spec/v1``: Envelope, Statement,
ResourceDescriptor, DigestSet), not from ``embassy.wire``: it reads the envelope and the
statement with the plain ``json`` module, so it does not share the embassy parser's
mistakes. It returns the rules a document breaks, each naming its field (empty: valid).

What it checks:

- Envelope layer: a DSSE envelope whose ``payloadType`` is ``application/vnd.in-toto+json``.
- Statement: ``_type`` is ``https://in-toto.io/Statement/v1``; ``subject`` is a non-empty
  list; ``predicateType`` is a URI; ``predicate``, if present, is an object.
- Each subject is a ResourceDescriptor with a ``digest`` (a Statement's subjects MUST have
  one); ``name``, ``uri``, ``mediaType``, ``downloadLocation`` are strings; ``annotations``
  an object; ``name`` SHOULD be unique within ``subject`` (checked: the embassy keeps it).
- DigestSet: a non-empty object of strings; the spec's named algorithms are lower-case hex
  of their length (``shake128``/``shake256``: any even length; the git ones 40 or 64).
"""

from __future__ import annotations

import base64
import json
import re
from typing import Any

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"

# Hex digits per algorithm, as the DigestSet specification names them.
HEX_DIGITS: dict[str, tuple[int, ...]] = {
    "sha256": (64,),
    "sha224": (56,),
    "sha384": (96,),
    "sha512": (128,),
    "sha512_224": (56,),
    "sha512_256": (64,),
    "sha3_224": (56,),
    "sha3_256": (64,),
    "sha3_384": (96,),
    "sha3_512": (128,),
    "blake2b": (128,),
    "blake2s": (64,),
    "ripemd160": (40,),
    "sm3": (64,),
    "gost": (64,),
    "sha1": (40,),
    "md5": (32,),
    "dirHash": (64,),
    "gitCommit": (40, 64),
    "gitTree": (40, 64),
    "gitBlob": (40, 64),
    "gitTag": (40, 64),
}
ANY_LENGTH_HEX = {"shake128", "shake256"}
_HEX = re.compile(r"[0-9a-f]*")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:\S+")
_STRING_FIELDS = ("name", "uri", "mediaType", "downloadLocation")


def digest_set_violations(digest: object, what: str) -> list[str]:
    if not isinstance(digest, dict):
        return [f"{what}: a DigestSet is an object"]
    if not digest:
        return [f"{what}: a DigestSet has at least one digest"]
    out = []
    for alg, value in digest.items():
        if not isinstance(value, str):
            out.append(f"{what}.{alg}: a digest is a string")
            continue
        if alg in HEX_DIGITS or alg in ANY_LENGTH_HEX:
            if not _HEX.fullmatch(value):
                out.append(f"{what}.{alg}: not lower-case hex")
            elif alg in ANY_LENGTH_HEX:
                if not value or len(value) % 2:
                    out.append(f"{what}.{alg}: hex of odd or zero length")
            elif len(value) not in HEX_DIGITS[alg]:
                out.append(f"{what}.{alg}: {len(value)} hex digits, not {HEX_DIGITS[alg]}")
    return out


def subject_violations(subject: object, what: str) -> list[str]:
    if not isinstance(subject, dict):
        return [f"{what}: a ResourceDescriptor is an object"]
    out = []
    if "digest" not in subject:
        out.append(f"{what}.digest: a Statement's subject MUST have a digest")
    else:
        out += digest_set_violations(subject["digest"], f"{what}.digest")
    for key in _STRING_FIELDS:
        if key in subject and not isinstance(subject[key], str):
            out.append(f"{what}.{key}: expected a string")
    if "annotations" in subject and not isinstance(subject["annotations"], dict):
        out.append(f"{what}.annotations: expected an object")
    return out


def statement_violations(payload: bytes) -> list[str]:
    """The in-toto Statement v1 rules ``payload`` breaks (empty: none)."""
    try:
        obj: Any = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        return [f"statement: not JSON ({exc})"]
    if not isinstance(obj, dict):
        return ["statement: not a JSON object"]
    out = []
    if obj.get("_type") != STATEMENT_TYPE:
        out.append(f"_type: {obj.get('_type')!r}, not {STATEMENT_TYPE!r}")
    subjects = obj.get("subject")
    if not isinstance(subjects, list) or not subjects:
        out.append("subject: a non-empty list of ResourceDescriptors is required")
    else:
        names: dict[str, int] = {}
        for i, subject in enumerate(subjects):
            out += subject_violations(subject, f"subject[{i}]")
            name = subject.get("name") if isinstance(subject, dict) else None
            if isinstance(name, str):
                if name in names:
                    out.append(f"subject[{i}].name: {name!r} repeats subject[{names[name]}]")
                names.setdefault(name, i)
    predicate_type = obj.get("predicateType")
    if not isinstance(predicate_type, str) or not _URI.fullmatch(predicate_type):
        out.append(f"predicateType: {predicate_type!r} is not a URI")
    if "predicate" in obj and not isinstance(obj["predicate"], dict):
        out.append("predicate: expected an object")
    return out


def envelope_violations(envelope: bytes) -> list[str]:
    """The rules an in-toto DSSE envelope (and the statement it carries) breaks."""
    try:
        obj: Any = json.loads(envelope)
        payload = base64.b64decode(obj["payload"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        return [f"envelope: unreadable ({exc!r})"]
    out = []
    if obj.get("payloadType") != PAYLOAD_TYPE:
        out.append(f"payloadType: {obj.get('payloadType')!r}, not {PAYLOAD_TYPE!r}")
    signatures = obj.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        out.append("signatures: at least one is required")
    return out + statement_violations(payload)
