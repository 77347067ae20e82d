"""Checks on what users hand the store (ids, text, metadata, filters, questions): our errors, never a traceback
from deep inside JSON, SQLite or a tokenizer."""

from __future__ import annotations

import json
import re

from kvzip_rag.checks import INT64, as_list, check_index, check_unicode
from kvzip_rag.errors import EmptyDocumentError, InvalidArgumentError

MAX_METADATA_DEPTH = 32
MAX_UNBROKEN_CHARS = 20_000  # longest run without whitespace or sentence end that segmentation accepts
_UNBROKEN = re.compile(r"[^\s.!?\u3002\uff01\uff1f]{%d,}" % (MAX_UNBROKEN_CHARS + 1))


def check_doc_id(doc_id) -> str:
    if not isinstance(doc_id, str) or not doc_id or len(doc_id) > 255 or "\x00" in doc_id:
        raise InvalidArgumentError(f"a document id is a non-empty string of at most 255 characters, got {doc_id!r}")
    check_unicode(doc_id, "the document id")
    return doc_id


def doc_id_list(doc_ids) -> list[str]:
    """``doc_ids`` (one document id, or an iterable of them) as a list of strings of valid Unicode; any other
    value is a one-line ``InvalidArgumentError`` (a lookup for an id that was never stored just finds nothing)."""
    ids = [doc_ids] if isinstance(doc_ids, str) else as_list(doc_ids, "doc_ids is a document id or a list of them")
    for doc_id in ids:
        if not isinstance(doc_id, str):
            raise InvalidArgumentError(f"a document id is a string, got {doc_id!r}")
        check_unicode(doc_id, "the document id")
    return ids


def check_page(limit, offset) -> None:
    """A listing's page: ``limit`` None or >= 1, ``offset`` >= 0 (see :func:`check_index`)."""
    if limit is not None:
        check_index(limit, "limit", 1)
    check_index(offset, "offset")


def check_text(text) -> str:
    """A document text: not empty, valid Unicode, and segmentable (no absurdly long unbroken run)."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyDocumentError("the document is empty or whitespace only; there is nothing to compress")
    check_unicode(text, "the document text")
    run = _UNBROKEN.search(text)
    if run is not None:
        raise InvalidArgumentError(
            f"the document has {len(run.group()):,} characters without a space or sentence end (from character "
            f"{run.start():,}): it "
            f"cannot be segmented into sensible pieces (limit {MAX_UNBROKEN_CHARS:,}); is it binary, base64 or "
            "minified data? Convert it to text first"
        )
    return text


def check_query(query) -> str:
    """A search query: a string of valid Unicode (search reduces it to words, so any other character is harmless)."""
    if not isinstance(query, str):
        raise InvalidArgumentError(f"a search query is a string, got {type(query).__name__}")
    check_unicode(query, "the question")
    return query


MAX_K = 10_000  # most segments one question routes to (a bound SQL and the window can take; far past any use)


def check_k(k, name: str = "k") -> int:
    """A count of segments or documents: an int in 1..MAX_K."""
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidArgumentError(f"{name} must be an integer from 1 to {MAX_K:,}, got {k!r}")
    return k


def _walk(value, depth: int, where: str) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise InvalidArgumentError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels (at {where})")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not -INT64 <= value < INT64:
            raise InvalidArgumentError(f"metadata integer at {where} does not fit 64 bits; store it as a string")
    elif isinstance(value, str):
        check_unicode(value, f"metadata at {where}")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidArgumentError(f"metadata keys must be strings, got {key!r} at {where}")
            check_unicode(key, f"a metadata key at {where}")
            _walk(item, depth + 1, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, depth + 1, f"{where}[{index}]")
    elif not isinstance(value, float):
        raise InvalidArgumentError(f"metadata must be JSON-serialisable: {type(value).__name__} at {where}")


def check_metadata(metadata) -> dict:
    """A JSON-safe copy of ``metadata`` (a dict with string keys), or ``InvalidArgumentError`` saying why not."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidArgumentError("metadata must be a dict with string keys")
    _walk(metadata, 0, "metadata")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as error:
        raise InvalidArgumentError(f"metadata must be JSON-serialisable: {error}") from None
