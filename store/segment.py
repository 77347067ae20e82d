"""Split a long document into pieces that fit the model window: paragraphs, then sentences, then tokens.

Segments are exact slices of the original text (``text[char_start:char_end]``), packed greedily with whole
paragraphs where they fit, whole sentences where a paragraph does not, and token-boundary pieces only for a single
sentence longer than the limit. Every segment's token count (as the model encodes it) is at most the limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvzip_rag.errors import EmptyDocumentError, InvalidArgumentError
from kvzip_rag.language import paragraphs, sentences, trimmed

MAX_SEGMENT_TOKENS = 4096
MAX_SEGMENTS = 1024  # per document: ~4M tokens at the default segment size



@dataclass(frozen=True)
class TextSegment:
    text: str
    token_count: int
    char_start: int
    char_end: int


Encode = Callable[[str], list[int]]


def default_max_tokens(model) -> int:
    """min(model.context_limit - prefix tokens, 4096): what one compressed cache can hold."""
    prefix = len(model.encode(model.template.prefix))
    return max(1, min(model.context_limit - prefix, MAX_SEGMENT_TOKENS))


def _token_pieces(text: str, start: int, end: int, max_tokens: int, encode: Encode, tokenizer) -> list[tuple[int, int]]:
    """Cut one over-long sentence at token boundaries (offsets from a fast tokenizer, else a binary search)."""
    piece = text[start:end]
    offsets = None
    if tokenizer is not None and getattr(tokenizer, "is_fast", False):
        try:
            offsets = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        except Exception:
            offsets = None
    spans = []
    if offsets:
        for i in range(0, len(offsets), max_tokens):
            group = offsets[i : i + max_tokens]
            spans.append((start + group[0][0], start + group[-1][1]))
        # contiguous cover: each piece runs up to where the next one starts
        spans = [(a, spans[j + 1][0] if j + 1 < len(spans) else end) for j, (a, _) in enumerate(spans)]
    else:
        cursor = start
        while cursor < end:
            lo, hi = cursor + 1, end
            while lo < hi:  # longest prefix that encodes to at most max_tokens
                mid = (lo + hi + 1) // 2
                if len(encode(text[cursor:mid])) <= max_tokens:
                    lo = mid
                else:
                    hi = mid - 1
            spans.append((cursor, lo))
            cursor = lo
    return [s for s in (trimmed(text, a, b) for a, b in spans) if s]


def split_text(text: str, encode: Encode, max_tokens: int, tokenizer=None) -> list[TextSegment]:
    """Segments of ``text`` of at most ``max_tokens`` tokens each (see the module docstring)."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyDocumentError("the document is empty or whitespace only; there is nothing to compress")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidArgumentError(f"max_segment_tokens must be a positive integer, got {max_tokens!r}")

    def count(a: int, b: int) -> int:
        return len(encode(text[a:b]))

    units: list[tuple[int, int, int]] = []  # (start, end, tokens), each within the limit

    def add_unit(a: int, b: int, limit: int) -> None:
        n = count(a, b)
        if n <= max_tokens:
            units.append((a, b, n))
            return
        for pa, pb in _token_pieces(text, a, b, limit, encode, tokenizer):
            n = count(pa, pb)
            if n <= max_tokens:
                units.append((pa, pb, n))
            elif limit > 1:  # re-encoding a piece alone gave more tokens than in context: cut finer
                add_unit(pa, pb, max(1, limit // 2))
            else:
                raise InvalidArgumentError(f"cannot split the text into pieces of at most {max_tokens} tokens")

    for pa, pb in paragraphs(text):
        n = count(pa, pb)
        if n <= max_tokens:
            units.append((pa, pb, n))
            continue
        for sa, sb in sentences(text, pa, pb):
            add_unit(sa, sb, max_tokens)

    segments: list[TextSegment] = []
    i = 0
    while i < len(units):
        j, estimate = i + 1, units[i][2]
        while j < len(units) and estimate + units[j][2] + 1 <= max_tokens:
            estimate += units[j][2] + 1  # + 1: the separator between units, usually one token or merged
            j += 1
        while True:  # the estimate can be off by a few tokens: check the real count, give units back if needed
            a, b = units[i][0], units[j - 1][1]
            real = count(a, b) if j - i > 1 else units[i][2]
            if real <= max_tokens or j - i == 1:
                break
            j -= 1
        segments.append(TextSegment(text[a:b], real, a, b))
        i = j
    return segments


def segment_document(model, text: str, max_segment_tokens: int | None = None) -> list[TextSegment]:
    """Split ``text`` for ``model`` (a KVzipModel): default limit :func:`default_max_tokens`."""
    limit = default_max_tokens(model) if max_segment_tokens is None else max_segment_tokens
    return split_text(text, model.encode, limit, getattr(model, "tokenizer", None))
