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


# Numbers: what an answer's figures are checked against (:func:`kvzip_rag.abstain.unsupported_numbers`)
# 40, 1,500, 1.5; not the 2 of "v2" nor the tail of "1.5.2"; a run of more than 15 digits is no figure
NUMBER = re.compile(r"(?<![\w.])\d{1,15}(?!\d)(?:,\d{3})*(?:\.\d{1,15}(?!\d))?")
UNITS = {w: n for n, w in enumerate("""zero one two three four five six seven eight nine ten eleven twelve thirteen
    fourteen fifteen sixteen seventeen eighteen nineteen""".split())}
TENS = {w: 10 * n for n, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
NUMBER_WORD = re.compile(r"[a-z]+|[^\sa-z-]")  # words, and every other sign (a comma ends a number)


def digit_numbers(text: str) -> list[str]:
    """The numbers written with digits, in order, thousands separators dropped ("1,500" -> "1500")."""
    return [match.group().replace(",", "") for match in NUMBER.finditer(text or "")]


def worded_numbers(text: str) -> set[str]:
    """The numbers written in words ("forty", "twenty-one", "three hundred", "two million"), as digits."""
    found: set[str] = set()
    total = current = 0
    seen = False

    def flush() -> None:
        nonlocal total, current, seen
        if seen:
            found.add(str(total + current))
        total = current = 0
        seen = False

    for token in NUMBER_WORD.findall((text or "").lower()) + ["."]:  # the "." ends the last number
        if token in UNITS or token in TENS:
            small = current % 100
            if seen and (small % 10 or 10 <= small < 20 or (token in TENS and small)):  # "one two": two numbers
                flush()
            current += UNITS.get(token, 0) + TENS.get(token, 0)
            seen = True
        elif token in SCALES and seen:
            if token == "hundred":
                current *= 100
            else:
                total, current = total + current * SCALES[token], 0
        elif not (token == "and" and seen):
            flush()
    return found
