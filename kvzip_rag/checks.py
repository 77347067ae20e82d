"""Argument checks the engine and the store share (one rule each): text a tokenizer or a database can take, and
integers a database stores. Each raises a one-line ``InvalidArgumentError``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .errors import InvalidArgumentError

INT64 = 1 << 63  # a signed 64-bit integer's bound: what SQL databases store


def check_unicode(value: str, what: str) -> None:
    """``value`` has no lone surrogate (a tokenizer, JSON and SQLite refuse them with their own exceptions)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgumentError(
            f"{what} contains a lone surrogate ({value[error.start:error.end]!r} at position {error.start}): it is "
            "not valid Unicode text; decode the source with errors='replace' or fix it"
        ) from None


def check_index(value, name: str, low: int = 0) -> int:
    """An integer (not a bool) from ``low`` to 2**63 - 1, what a SQL database stores; else a one-line
    ``InvalidArgumentError`` instead of a driver's overflow or a silent misuse."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < INT64:
        raise InvalidArgumentError(f"{name} must be an integer from {low} to {INT64 - 1}, got {value!r}")
    return value


def as_list(value, what: str) -> list:
    """``value``, any iterable but a string, bytes or a mapping (whose iteration is never what a caller meant), as a
    list; else a one-line ``InvalidArgumentError`` starting with ``what`` ("doc_ids is a list of ...")."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise InvalidArgumentError(f"{what}, got {type(value).__name__}")
    return list(value)
