"""Canonical JSON out, strict JSON in, and base64 helpers.

The embassy signs and hashes exact bytes. Bytes it *produces* are canonical (sorted keys,
no whitespace, UTF-8, integers only), so the same value always has one encoding and test
vectors are stable. Bytes it *receives* are parsed strictly, so that two parsers cannot read
one document two ways: duplicate keys, NaN/Infinity, non-UTF-8 and non-object documents are
refused. Nothing received is ever re-encoded before it is hashed or verified.

Integers read are capped at 20 digits and at unsigned 64-bit magnitude (|n| <= 2**64 - 1):
every integer of our formats is a TPM counter, a sequence number, a size or a time, all
within u64; other parsers silently lose precision beyond it; and Python's own limit
(ValueError past 4,300 digits) would surface as an internal error, not a format error.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from json.encoder import encode_basestring as _encode_string
from typing import Any

from embassy.errors import WireFormatError

JsonObject = dict[str, Any]

MAX_INT_DIGITS = 20
MAX_INT_MAGNITUDE = (1 << 64) - 1


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """Encode ``value`` canonically. Floats are refused: they have no canonical form."""
    _reject_floats(value)
    return _dumps(value)


# What json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
# allow_nan=False) builds on every call; made once (it holds only its settings, and each
# encode makes its own state, so threads share it safely).
_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _dumps(value: Mapping[str, Any]) -> bytes:
    return _ENCODER.encode(value).encode("utf-8")


def _reject_floats(value: object) -> None:
    # Exact types first (what the embassy's own objects hold): the ``isinstance`` checks
    # against the Mapping ABC cost more than the encoding itself. Anything else (a float
    # subclass, another Mapping, a list subclass) takes the general checks, as before.
    kind = type(value)
    items: Any
    if kind is dict:
        items = value.values()  # type: ignore[attr-defined]
    elif kind is list or kind is tuple:
        items = value
    elif kind is str or kind is int or kind is bool or value is None:
        return
    elif isinstance(value, float):
        raise TypeError("floats have no canonical encoding; use integers or strings")
    elif isinstance(value, Mapping):
        items = value.values()
    elif isinstance(value, list | tuple):
        items = value
    else:
        return
    for item in items:
        kind = type(item)
        if kind is str or kind is int or kind is bool or item is None:
            continue  # the common leaves, without a call
        _reject_floats(item)


def reject_floats(value: object) -> None:
    """Raise ``TypeError`` if ``value`` holds a float anywhere (what :func:`canonical_json`
    checks before it encodes); for builders that encode the rest of a document themselves."""
    _reject_floats(value)


def dumps_text(value: object) -> str:
    """The canonical text of ``value``, which the caller has checked holds no float
    (:func:`reject_floats`); :func:`canonical_json` is this, checked and UTF-8 encoded."""
    return _ENCODER.encode(value)


def json_string(text: str) -> str:
    """A JSON string literal exactly as the canonical encoder writes it (UTF-8 unescaped,
    only ``"``, ``\\`` and control characters escaped)."""
    return _encode_string(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> JsonObject:
    obj: JsonObject = {}
    for key, item in pairs:
        if key in obj:
            raise WireFormatError(f"duplicate JSON key {key!r}")
        obj[key] = item
    return obj


def _no_constants(name: str) -> Any:
    raise WireFormatError(f"JSON constant {name} is not allowed")


def _no_floats(text: str) -> Any:
    raise WireFormatError(
        f"JSON number {text[:24]!r}: only integers (floats have no canonical form)"
    )


def _bounded_int(text: str) -> int:
    # The scanner hands over the literal as matched: ASCII digits with an optional '-'.
    # Its length is checked before int() runs, so no huge literal is ever converted.
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise WireFormatError(f"JSON integer of {digits} digits (at most {MAX_INT_DIGITS})")
    value = int(text)
    if abs(value) > MAX_INT_MAGNITUDE:
        raise WireFormatError("JSON integer beyond the 64-bit range")
    return value


def parse_json_object(data: bytes, what: str, *, integers_only: bool = False) -> JsonObject:
    """Strictly parse ``data`` as one JSON object; ``what`` names it in errors.

    ``integers_only`` refuses any number with a fraction or exponent: for documents that
    must be canonical (:func:`require_canonical`), where a float can never be.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireFormatError(f"{what}: not UTF-8 at byte {exc.start}") from None
    try:
        value = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
            parse_int=_bounded_int,
            parse_float=_no_floats if integers_only else None,
        )
    except json.JSONDecodeError as exc:
        raise WireFormatError(f"{what}: invalid JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise WireFormatError(f"{what}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise WireFormatError(f"{what}: expected a JSON object, got {type(value).__name__}")
    return value


def require_canonical(
    data: bytes, value: JsonObject, what: str, *, parsed_integers_only: bool = False
) -> None:
    """Refuse ``data`` unless it is exactly ``canonical_json(value)``, ``value`` being what
    :func:`parse_json_object` read from it. With ``parsed_integers_only`` (the caller parsed
    with ``integers_only=True``, so ``value`` holds no float) the walk that looks for floats
    is skipped: it costs as much as the encoding itself.

    A signer must sign the canonical bytes: a document with two encodings is two documents
    to anyone who hashes it (a digest that differs from the one the embassy would make), and
    one signed encoding must not stand for another. Run this after the signature check and
    the field checks, so a forgery fails on its signature and a malformed document on the
    field that is wrong; this names the first byte that differs and what the canonical
    encoding has there.
    """
    try:
        canonical = _dumps(value) if parsed_integers_only else canonical_json(value)
    except TypeError:
        raise WireFormatError(f"{what}: not canonical JSON: a float (use integers)") from None
    except UnicodeEncodeError:
        raise WireFormatError(f"{what}: not canonical JSON: a lone surrogate escape") from None
    if canonical == data:
        return
    at = next(
        (i for i, (a, b) in enumerate(zip(data, canonical, strict=False)) if a != b),
        min(len(data), len(canonical)),
    )
    raise WireFormatError(
        f"{what}: not canonical JSON (sorted keys, no whitespace, UTF-8 unescaped): first "
        f"difference at byte {at}, where the canonical encoding has "
        f"{canonical[at : at + 12]!r}, not {data[at : at + 12]!r}"
    )


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, what: str) -> bytes:
    """Decode standard base64, refusing anything but canonical, padded input."""
    if not isinstance(text, str):
        raise WireFormatError(f"{what}: expected a base64 string")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise WireFormatError(f"{what}: not valid base64") from None
    if base64.b64encode(data).decode("ascii") != text:
        raise WireFormatError(f"{what}: base64 is not in canonical form")
    return data


def hex_decode(text: object, what: str, *, size: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise WireFormatError(f"{what}: expected a hex string")
    try:
        data = bytes.fromhex(text)
    except ValueError:
        raise WireFormatError(f"{what}: not valid hex") from None
    if data.hex() != text:
        raise WireFormatError(f"{what}: hex must be lower-case with no separators")
    if size is not None and len(data) != size:
        raise WireFormatError(f"{what}: expected {size} bytes, got {len(data)}")
    return data


def field(obj: JsonObject, key: str, kind: type, what: str) -> Any:
    """Return ``obj[key]`` if present and of ``kind``; else a precise WireFormatError."""
    if key not in obj:
        raise WireFormatError(f"{what}: missing field {key!r}")
    value = obj[key]
    # bool is an int in Python; a wire integer field must not accept true/false.
    if kind is int and isinstance(value, bool):
        raise WireFormatError(f"{what}.{key}: expected int, got bool")
    if not isinstance(value, kind):
        raise WireFormatError(f"{what}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def only_fields(obj: JsonObject, allowed: set[str], what: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise WireFormatError(f"{what}: unknown field(s) {', '.join(map(repr, unknown))}")


def parse_typed_object(
    data: bytes, kind: str, fields: set[str], what: str, *, version: int = 1
) -> JsonObject:
    """Strictly parse a ``{"v": version, "type": kind, ...fields}`` document."""
    obj = parse_json_object(data, what)
    only_fields(obj, {"v", "type", *fields}, what)
    if obj.get("v") != version or obj.get("type") != kind:
        raise WireFormatError(f"{what}: expected v {version} and type {kind!r}")
    return obj


def b64_list(value: object, what: str, *, most: int) -> list[bytes]:
    """A JSON list of 0 to ``most`` canonical base64 strings, decoded."""
    if not isinstance(value, list):
        raise WireFormatError(f"{what}: expected a list")
    if len(value) > most:
        raise WireFormatError(f"{what}: more than {most} items")
    return [b64decode(item, f"{what}[{i}]") for i, item in enumerate(value)]
