"""Validators for hostile configuration values, shared by the daemon's config and the
workload spec: each returns the value or raises a :class:`~embassy.errors.ConfigError` that
names where it was found, never a traceback.

Every value is bounded before it is used: the config and the metadata file are fuzzed, and a
parse error must name the key, never be a traceback (an ``int()`` of a Unicode digit, a
5,000-digit integer, a lone surrogate). Pure: no I/O.
"""

from __future__ import annotations

import re
import reprlib
from typing import Any

from embassy.errors import ConfigError

MAX_TEXT = 4096  # a name, path, image, user, ...
MAX_INT = 2**63 - 1  # what Docker's API carries, and more than any config value needs
MAX_LIST = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class _BoundedRepr(reprlib.Repr):
    def __init__(self) -> None:
        super().__init__()
        self.maxstring = self.maxother = 80
        self.maxlist = self.maxtuple = self.maxdict = self.maxset = 6
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        # repr() of an integer of more than 4,300 digits raises ValueError.
        if abs(x).bit_length() > 128:
            return f"<an integer of {abs(x).bit_length()} bits>"
        return repr(x)


_REPR = _BoundedRepr()


def show_value(value: Any) -> str:
    """A short, safe rendering of a bad value for an error message (never raises)."""
    try:
        return _REPR.repr(value)
    except Exception:  # a repr that fails is still no reason for a traceback
        return f"<a {type(value).__name__}>"


def show_key(key: Any) -> str:
    """A mapping key for a dotted path: as it is if short and printable, else shown."""
    if isinstance(key, str) and len(key) <= 128 and key.isprintable():
        return key
    return show_value(key)


def fail(where: str, message: str) -> ConfigError:
    """The error for a bad value at ``where`` (``config: http.workers``, ``env NAME``)."""
    return ConfigError(f"{where}: {message}")


def as_str(
    where: str,
    value: Any,
    *,
    allow_empty: bool = False,
    limit: int = MAX_TEXT,
    controls: bool = False,
    pattern: re.Pattern[str] | None = None,
) -> str:
    """A string that encodes to UTF-8, has no NUL, at most ``limit`` characters, (unless
    ``controls``) no control characters and (if given) matches ``pattern``."""
    if not isinstance(value, str) or (not value and not allow_empty):
        raise fail(where, f"expected a non-empty string, got {show_value(value)}")
    if len(value) > limit:
        raise fail(where, f"longer than {limit} characters ({len(value)})")
    if "\x00" in value:
        raise fail(where, "NUL characters are not allowed")
    if not controls and _CONTROL.search(value):
        raise fail(where, "control characters are not allowed")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (YAML "\ud800", a non-UTF-8 environment)
        raise fail(where, "not valid UTF-8 (a lone surrogate)") from None
    if pattern is not None and not pattern.fullmatch(value):
        raise fail(where, f"expected {pattern.pattern}, got {show_value(value)}")
    return value


def as_int(where: str, value: Any, lo: int = -MAX_INT, hi: int = MAX_INT) -> int:
    """An integer (not a bool) in ``lo..hi``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(where, f"expected an integer, got {show_value(value)}")
    if not lo <= value <= hi:
        raise fail(where, f"{show_value(value)} is out of range ({lo}..{hi})")
    return value


def as_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise fail(where, f"expected true or false, got {show_value(value)}")
    return value


def as_list(where: str, value: Any, limit: int, what: str) -> list[Any]:
    """A list of at most ``limit`` items (``what`` names the list in the error)."""
    if not isinstance(value, list):
        raise fail(where, f"expected a {what}, got {show_value(value)}")
    if len(value) > limit:
        raise fail(where, f"more than {limit} items ({len(value)})")
    return value


def as_str_list(where: str, value: Any, limit: int = MAX_LIST) -> tuple[str, ...]:
    """A non-empty list of at most ``limit`` strings, each as :func:`as_str` takes it."""
    if not isinstance(value, list) or not value or len(value) > limit:
        raise fail(where, f"expected a non-empty list of strings, got {show_value(value)}")
    return tuple(as_str(f"{where}[{i}]", v) for i, v in enumerate(value))
