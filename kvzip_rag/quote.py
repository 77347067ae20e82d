"""Quote mode (``answer_style="quote"``): the model answers freely, then the answer is snapped to a verbatim span
of a routed document, cited exactly.

Why snapping and not constrained decoding: a decoder forced to quote starts at the first token that *can* start a
span and so often quotes the wrong words ("Theatres", "has") even when its free answer was right (BENCHMARKS.md,
Grounding). Snapping keeps the free answer's choice of words and only moves it onto the document's own characters;
its generation is free mode's exactly (same prompt, same tokens), so it costs what free mode costs.

The rule (:func:`snap`), on words as full-text search splits them (:func:`~kvzip_rag.language.words`, with their
character offsets in the stored text):

1. Find the runs of consecutive words the answer and a routed segment share (a run never crosses a line break of
   the segment).
2. Score a run by its count of *novel* words (neither a word of the question nor one of :data:`FUNCTION_WORDS`) plus
   :data:`QUESTION_WEIGHT` x the count of question words in the segment sentence that holds the run's start (the
   sentence the question is about). The best run wins (ties: the shorter, then the earlier in the answer, then in
   the segment), trimmed to its first..last novel word: the quote is the stored text's exact characters there.
3. No run with a novel word: the answer's best evidence citation (a whole sentence; :mod:`kvzip_rag.evidence`),
   or without evidence the sentence sharing most words with the question.

:func:`quote_answer` applies it to a service's answer (``QAResult.quote``), :func:`quote_citation` builds and
verifies the citation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .answers import Citation, Target
from .errors import InvalidArgumentError
from .language import STOPWORDS, WORD, words

ANSWER_STYLES = ("free", "quote")
DEFAULT_ANSWER_STYLE = "free"
# words that say nothing of their own: a quote never starts or ends at one (the store's stop words and a few that
# restate a question or the prompt; fitted with the rule on dev rows only), and the clitics a word split leaves
# ("Earth's" is "earth" + "s": a held-out answer was quoted as "s"; no dev row's F1 changes)
FUNCTION_WORDS = STOPWORDS | frozenset("also answer called context he her his known she those s t d ll re ve".split())
# per question word in the run's sentence: 0 measured 0.172 F1 vs 0.202 (the prototype, dev rows, n = 206)
QUESTION_WEIGHT = 1.0


def check_answer_style(style: object) -> str:
    if style not in ANSWER_STYLES:
        raise InvalidArgumentError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {style!r}")
    return str(style)


@dataclass(frozen=True)
class Span:
    """A candidate quote: ``text[start:end]`` of routed segment ``index``, and its score (higher is better)."""

    index: int
    start: int
    end: int
    score: tuple[float, int]


def _sentence_of(spans: Sequence[tuple[int, int]], position: int) -> tuple[int, int] | None:
    return next(((a, b) for a, b in spans if a <= position < b), None)


def best_run(answer: str, question: str, text: str, index: int = 0) -> Span | None:
    """The best run of words shared by ``answer`` and ``text`` (steps 1-2 of the module's rule), trimmed to its
    novel words; ``None`` when no shared run holds a novel word."""
    from .evidence import sentence_spans

    asked = set(words(question))
    said = words(answer)
    novel = [w not in asked and w not in FUNCTION_WORDS for w in said]
    found = list(WORD.finditer(text))
    where: dict[str, list[int]] = {}
    for j, match in enumerate(found):
        where.setdefault(match.group().lower(), []).append(j)
    sentences = sentence_spans(text)
    overlap: dict[tuple[int, int] | None, int] = {}
    best: Span | None = None
    for i, word in enumerate(said):
        for j in where.get(word, ()):
            k = 1
            while (i + k < len(said) and j + k < len(found) and said[i + k] == found[j + k].group().lower()
                   and "\n" not in text[found[j + k - 1].end() : found[j + k].start()]):
                k += 1
            kept = [x for x in range(k) if novel[i + x]]
            if not kept:
                continue
            sentence = _sentence_of(sentences, found[j].start())
            if sentence not in overlap:
                overlap[sentence] = len(asked & set(words(text[slice(*sentence)]))) if sentence else 0
            score = (len(kept) + QUESTION_WEIGHT * overlap[sentence], -k)
            if best is None or score > best.score:
                best = Span(index, found[j + kept[0]].start(), found[j + kept[-1]].end(), score)
    return best


def closest_sentence(question: str, texts: Sequence[str]) -> tuple[int, int, int] | None:
    """``(segment index, start, end)`` of the sentence sharing most words with ``question`` (the first of equals),
    ``None`` when the segments hold no sentence: the fallback without evidence."""
    from .evidence import sentence_spans

    asked = set(words(question))
    spans = [(-len(asked & set(words(text[a:b]))), n, a, b) for n, text in enumerate(texts)
             for a, b in sentence_spans(text)]
    return min(spans)[1:] if spans else None


def snap(answer: str, question: str, texts: Sequence[str], evidence: Citation | None = None,
         targets: Sequence[Target] = ()) -> tuple[int, int, int] | None:
    """``(segment index, start, end)`` of the quote for ``answer`` in ``texts`` (the routed segments' stored text):
    the module's rule. ``evidence``: the answer's best evidence citation, the fallback when no run matches (found
    among ``targets``, the segments of ``texts``)."""
    runs = [run for n, text in enumerate(texts) if (run := best_run(answer, question, text, n)) is not None]
    if runs:
        best = max(runs, key=lambda run: (run.score, -run.index))
        return best.index, best.start, best.end
    if evidence is not None:
        for n, target in enumerate(targets):
            if target.node_id == evidence.node_id:
                return n, evidence.start, evidence.end
    return closest_sentence(question, texts)


def quote_citation(target: Target, text: str, start: int, end: int) -> Citation | None:
    """The exact citation of ``text[start:end]`` (``text``: the segment as the store holds it), checked character
    for character; ``None`` for an empty span."""
    from .evidence import verified

    cited = Citation(target.doc_id, target.segment_index, start, end, text[start:end], 1.0)
    return cited if verified(cited, text) else None


def quote_answer(answer: str, question: str, targets: Sequence[Target], texts: Sequence[str | None],
                 evidence: Sequence[Citation] = ()) -> Citation | None:
    """The quote (as its exact citation) of a free ``answer`` to ``question``: snapped (:func:`snap`) onto the
    stored ``texts`` of ``targets`` (``None`` for a segment gone from the store), falling back on the first of
    ``evidence`` (the answer's citations, best first); ``None`` when the segments hold no text at all."""
    stored = [text or "" for text in texts]
    found = snap(answer, question, stored, evidence[0] if evidence else None, targets)
    if found is None:
        return None
    n, start, end = found
    return quote_citation(targets[n], stored[n], start, end)
