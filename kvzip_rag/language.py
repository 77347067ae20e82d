"""The language rules the store and the answers share: words (as full-text search splits a question) and stop
words; paragraphs and sentences as character spans (what the store segments documents by and citations quote
whole)."""

from __future__ import annotations

import re

STOPWORDS = frozenset(
    """a an and are as at be been but by can could did do does for from had has have how i if in into is it its
    of on or that the their there these they this to was were what when where which who whom whose why will with
    would you your""".split()
)
WORD = re.compile(r"\w+", re.UNICODE)
PARAGRAPH_BREAK = re.compile(r"\n[ \t\r\f\v]*\n\s*")
SENTENCE_END = re.compile(r"[.!?\u3002\uff01\uff1f]+[\"'\u201d\u2019)\]]*(?=\s|$)")
# A period after these words (or after an initial or a dotted abbreviation, "J.", "U.S.") ends no sentence
ABBREVIATIONS = frozenset("""mr mrs ms dr st mt ft jr sr prof gen col lt sgt capt gov sen rep rev no nos vol vs etc
    approx inc ltd co corp dept est fig jan feb mar apr jun jul aug sep sept oct nov dec""".split())


def words(text: str) -> list[str]:
    """Lower-cased words, as full-text search splits a question (one rule for the store, chat routing and
    citations)."""
    return [w.lower() for w in WORD.findall(text or "")]


def query_terms(query: str, max_terms: int = 32) -> list[str]:
    """Lower-cased words of a free-text question, stop words dropped (all kept if nothing else is left): what
    full-text search matches, and what an answer's question coverage counts (:mod:`kvzip_rag.abstain`)."""
    found = words(query)
    kept = [w for w in found if w not in STOPWORDS] or found
    unique = list(dict.fromkeys(kept))
    return unique[:max_terms]


def trimmed(text: str, start: int, end: int) -> tuple[int, int] | None:
    """``text[start:end]`` without its surrounding white space, as a span (None when nothing is left)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if start < end else None


def paragraphs(text: str) -> list[tuple[int, int]]:
    """Spans of the text's paragraphs (split at blank lines)."""
    spans, start = [], 0
    for match in PARAGRAPH_BREAK.finditer(text):
        spans.append((start, match.start()))
        start = match.end()
    spans.append((start, len(text)))
    return [s for s in (trimmed(text, a, b) for a, b in spans) if s]


def ends_sentence(text: str, match: re.Match, end: int) -> bool:
    """A sentence-end match really ends one: not a lone period after an abbreviation or an initial, nor followed by
    a lower-case word (a citation cut there would split "St. | Johns River")."""
    if match.group() != ".":
        return True
    following = text[match.end() : end].lstrip()[:1]
    before = re.search(r"(\w(?:[\w.]*\w)?)$", text[: match.start()])
    word = before.group(1).lower() if before else ""
    return not (following.islower() or word in ABBREVIATIONS or "." in word or (len(word) == 1 and word.isalpha()))


def sentences(text: str, start: int, end: int) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text[start:end]`` (split after . ! ? and their CJK forms, closing quotes kept;
    not after an abbreviation or an initial: :func:`ends_sentence`)."""
    spans, cursor = [], start
    for match in SENTENCE_END.finditer(text, start, end):
        if not ends_sentence(text, match, end):
            continue
        spans.append((cursor, match.end()))
        cursor = match.end()
    spans.append((cursor, end))
    return [s for s in (trimmed(text, a, b) for a, b in spans) if s]
