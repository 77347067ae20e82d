""""Not in the documents": a calibrated probability that an answer rests on the documents, and the abstention.

The evidence score of an answer is a logistic model over what answering already produced (no extra pass):

- ``document_share``: the share of the answer's attention that fell on document pairs rather than on the template
  prefix or the question and answer tokens (:class:`~kvzip_rag.evidence.Evidence`);
- ``top_weight``: the best-attended citation's share of that document mass (evidence concentrated in one sentence);
- ``mean_logprob``: the answer tokens' mean log-probability;
- ``question_coverage``: the share of the question's search terms (:func:`~kvzip_rag.language.query_terms`) that
  occur in the text of the segments that answered (:func:`question_coverage`). It replaces the routing's BM25
  score, which depends on the store (its term weights come from the other documents: in a store of three
  documents every score is low), so the same question and document now get the same score in any store;
- ``refusal``: 1 when the candidate itself says the context does not tell (:func:`~kvzip_rag.answers.is_refusal`).

Its coefficients and the default threshold are fitted on shared SQuAD data (answerable: a question asked of a store
holding its article; unanswerable: the same question asked of the store without it) with the default model at ratio
0.3, and stored in ``abstain_calibration.json`` beside this module; ``python -m kvzip_rag.bench.abstention``
recomputes it.
Below the threshold the answer text becomes the abstention text and the candidate is kept in
``metadata()["candidate_answer"]``; ``abstain_threshold=None`` turns abstention off.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from .answers import Citation, QAResult, Target, is_refusal
from .errors import InvalidArgumentError
from .language import digit_numbers, query_terms, words, worded_numbers

if TYPE_CHECKING:  # the evidence module imports torch: only when an answer is grounded
    from .evidence import Evidence
    from .generate import Answer
    from .qa import QAService

CALIBRATION_FILE = Path(__file__).with_name("abstain_calibration.json")
DEFAULT_ABSTAIN_TEXT = "The documents do not say."
FEATURES = ("document_share", "top_weight", "mean_logprob", "question_coverage", "refusal")
NO_EVIDENCE_SHARE = 0.1  # a composed document with less of the documents' attention than this gave no evidence


@dataclass(frozen=True)
class Calibration:
    """A logistic model over :data:`FEATURES` (standardised by ``mean``/``scale``) and its default threshold."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    threshold: float
    fitted_on: dict

    def probability(self, features: Sequence[float]) -> float:
        z = self.bias + sum(w * (x - m) / s for w, x, m, s in zip(self.weights, features, self.mean, self.scale))
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def as_dict(self) -> dict:
        return {"features": list(FEATURES), "weights": list(self.weights), "bias": self.bias, "mean": list(self.mean),
                "scale": list(self.scale), "threshold": self.threshold, "fitted_on": self.fitted_on}


@lru_cache(maxsize=1)
def default_calibration() -> Calibration:
    data = json.loads(CALIBRATION_FILE.read_text())
    if tuple(data["features"]) != FEATURES:
        raise InvalidArgumentError(f"{CALIBRATION_FILE} was fitted on other features; rerun "
                                   "python -m kvzip_rag.bench.abstention")
    return Calibration(tuple(data["weights"]), data["bias"], tuple(data["mean"]), tuple(data["scale"]),
                       data["threshold"], data["fitted_on"])


class _Default:
    """The calibrated default threshold, read from the calibration file when first needed."""

    def __repr__(self) -> str:
        return "DEFAULT_THRESHOLD"


DEFAULT_THRESHOLD = _Default()


@dataclass(frozen=True)
class Grounding:
    """What a service adds to an answer: ``evidence`` (citations; abstention rests on it, so ``False`` turns both
    off), ``abstain_threshold`` (a probability in [0, 1], ``None``: never abstain), ``abstain_text``, and the
    ``calibration`` that scores the evidence (``None``: the packaged one)."""

    evidence: bool = True
    abstain_threshold: float | None | _Default = DEFAULT_THRESHOLD
    abstain_text: str = DEFAULT_ABSTAIN_TEXT
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.evidence, bool):
            raise InvalidArgumentError(f"evidence must be True or False, got {self.evidence!r}")
        threshold = self.abstain_threshold
        if not (threshold is None or isinstance(threshold, _Default) or (
                isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0 <= threshold <= 1)):
            raise InvalidArgumentError(f"abstain_threshold must be a probability in [0, 1] or None, got {threshold!r}")
        if not isinstance(self.abstain_text, str) or not self.abstain_text.strip():
            raise InvalidArgumentError("abstain_text must be a non-empty string")

    @property
    def threshold(self) -> float | None:
        if isinstance(self.abstain_threshold, _Default):
            return default_calibration().threshold
        return self.abstain_threshold


GROUNDING_OPTIONS = ("evidence", "abstain_threshold", "abstain_text")  # the fields of Grounding given by name


def split_grounding(options: dict, base: Grounding | None = None) -> tuple[dict, Grounding]:
    """Answer options given by name as (sampling options, :class:`Grounding`): the grounding names override
    ``base`` (default: the default grounding), for interfaces that take both in one set of keywords (chats)."""
    from dataclasses import replace

    named = {k: options[k] for k in GROUNDING_OPTIONS if k in options}
    rest = {k: v for k, v in options.items() if k not in GROUNDING_OPTIONS}
    return rest, replace(base or Grounding(), **named)


def question_coverage(question: str, texts: Sequence[str]) -> float:
    """The share of ``question``'s search terms found among the words of ``texts`` (the answering segments): how
    well the documents match the question, by nothing but the question and those documents."""
    terms = query_terms(question)
    found = {w for text in texts for w in words(text)}
    return sum(term in found for term in terms) / len(terms) if terms else 0.0


def features(evidence: Evidence, top_weight: float, mean_logprob: float | None, coverage: float,
             refusal: bool) -> list[float]:
    """The values of :data:`FEATURES` for one answer (a missing log-probability, i.e. an empty answer, is -10)."""
    return [evidence.document_share, top_weight, mean_logprob if mean_logprob is not None else -10.0, coverage,
            float(refusal)]


@dataclass(frozen=True)
class Assessment:
    """One answer's evidence read out: its citations, the composed documents that gave none, the score and its
    features, and whether it abstains."""

    citations: list[Citation]
    no_evidence: tuple[Target, ...]
    features: dict[str, float]
    score: float
    abstained: bool
    unsupported_numbers: tuple[str, ...] = ()  # :func:`unsupported_numbers`


def assess(service: QAService, question: str, answer: Answer, used: Sequence[Target],
           grounding: Grounding) -> Assessment | None:
    """Read ``answer``'s (to ``question``) recorded evidence (None if it recorded none): ``used`` are the documents
    of the cache that answered in its order (target, then ``also``). Any answer of a service can be assessed this
    way, a chat turn's too."""
    from .evidence import citations, verified

    evidence = answer.evidence
    if not grounding.evidence or evidence is None:
        return None
    texts = {t: service.stored_text(t) for t in used}
    documents = [(t, t.text or texts[t] or "") for t in used]
    cited = [c for c in citations(evidence, documents, service.model.tokenizer, answer.text)
             if verified(c, next(texts[t] for t in used if t.node_id == c.node_id))]
    no_evidence: tuple[Target, ...] = ()
    if len(used) > 1:  # the best-attended document always stays
        shares = evidence.shares()
        no_evidence = tuple(t for t, share in zip(used, shares) if share < min(NO_EVIDENCE_SHARE, max(shares)))
    values = features(evidence, max((c.weight for c in cited), default=0.0), answer.mean_logprob,
                      question_coverage(question, [text for _, text in documents]), is_refusal(answer.text))
    score = (grounding.calibration or default_calibration()).probability(values)
    threshold = grounding.threshold
    invented = unsupported_numbers(answer.text, answer.finish_reason != "stop", question,
                                   [text for _, text in documents])
    return Assessment(cited, no_evidence, dict(zip(FEATURES, values)), score,
                      threshold is not None and score < threshold, invented)


def _canonical(number: str) -> str:
    """One spelling per value: "40", "40.0" and "040" alike."""
    return format(Decimal(number).normalize(), "f")


def unsupported_numbers(answer: str, cut: bool, question: str, documents: Sequence[str]) -> tuple[str, ...]:
    """The numbers the answer writes in digits that appear in none of the ``documents`` it was answered from (in
    digits or in words) nor in the question: figures the model did not take from the documents, which every
    interface shows beside the answer (a flag, not an abstention). On SQuAD at ratio 0.3 (BENCHMARKS.md, "Numbers
    not in the documents") 12 of 18 answers flagged were wrong, the other 6 right but with an invented figure (a
    birth year, a day of the month). ``cut``: the answer stopped at its token limit, so a number at its very end
    may be part of one (the "1" of "1972") and is not checked."""
    numbers = digit_numbers(answer)
    if cut and numbers and answer.rstrip()[-1:].isdigit():
        numbers = numbers[:-1]
    known = {_canonical(n) for n in digit_numbers(question)} | worded_numbers(question)
    for text in documents:
        known |= {_canonical(n) for n in digit_numbers(text)} | worded_numbers(text)
    return tuple(dict.fromkeys(n for n in numbers if _canonical(n) not in known))


def ground(service: QAService, result: QAResult, grounding: Grounding) -> QAResult:
    """Fill ``result``'s citations, evidence score and abstention from the chosen answer's recorded evidence."""
    best = result.best
    found = assess(service, result.question, best.answer, [best.target, *best.also], grounding)
    if found is not None:
        result.citations, result.no_evidence = found.citations, found.no_evidence
        result.evidence_features, result.evidence_score = found.features, found.score
        result.abstained = found.abstained
        result.abstain_text = grounding.abstain_text if found.abstained else ""
        result.unsupported_numbers = found.unsupported_numbers
    return result
