"""What an answer from compressed caches is: routed targets, each cache's answer, the composed result."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .generate import Answer
    from .store import CacheRef


_REFUSAL = re.compile(
    r"\b(i (do not|don't|cannot|can't|could not|couldn't) (know|find|answer|say|determine|tell)"
    r"|not (mentioned|stated|specified|provided|given|available|included|found|clear)"
    r"|no (information|mention|answer)"
    r"|(context|text|passage|document|article) (does not|doesn't|did not|didn't)"
    r"|unable to (answer|determine|find|say)|cannot be (determined|answered)|unanswerable|insufficient information)\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """True for an empty answer or one saying the context does not tell (ranked last by best-of-k)."""
    return not text.strip() or bool(_REFUSAL.search(text))


@dataclass(frozen=True)
class Citation:
    """A span of a stored segment's text that an answer rests on.

    ``start``/``end`` are character offsets into the segment's stored text (``Target.text``), and ``text`` is
    exactly ``segment_text[start:end]``: every producer checks this against the stored document before returning
    it. ``weight`` is the share of the answer's evidence that points at the span (attention mass, or 1.0 for a
    verbatim quote)."""

    doc_id: str
    segment_index: int
    start: int
    end: int
    text: str
    weight: float

    @property
    def node_id(self) -> str:
        return f"{self.doc_id}:{self.segment_index}"

    def as_dict(self) -> dict:
        return {"doc_id": self.doc_id, "segment_index": self.segment_index, "node_id": self.node_id,
                "start": self.start, "end": self.end, "text": self.text, "weight": self.weight}


@dataclass(frozen=True)
class Target:
    """One routed segment: where its cache is, its retrieval score and text: the one name for a routed segment
    inside the core (adapters turn it into nodes and Documents)."""

    doc_id: str
    segment_index: int
    score: float | None = None
    text: str = field(default="", repr=False, compare=False)
    metadata: dict = field(default_factory=dict, repr=False, compare=False)  # the document's own metadata
    routing: str = "search"  # "search" (full-text match) or "fallback" (nothing matched: the first segments)
    # the stored cache routing chose for it (loading checks it is still there: sources and cache from one snapshot)
    cache: CacheRef | None = field(default=None, repr=False, compare=False)

    @property
    def node_id(self) -> str:
        return f"{self.doc_id}:{self.segment_index}"

    def as_metadata(self, cache: Any = None, *, ratio: float | None = None, level: str | None = None,
                    model: str | None = None) -> dict:
        """What every interface attaches to this segment (a LlamaIndex node's, a LangChain Document's metadata), so
        the two never describe a segment differently: the document's own metadata, the segment's id, routing and
        score, and the stored cache record it answers from (``cache``, or None) at the ``ratio``/``level`` it is
        loaded at (None: as stored); ``model`` names the model when no cache record does."""
        return {
            **self.metadata,
            "doc_id": self.doc_id,
            "segment_index": self.segment_index,
            "cache_id": cache.id if cache else None,
            "ratio": ratio if ratio is not None else (cache.ratio if cache else None),
            "level": level or (cache.level if cache else None),
            "bytes": cache.kv_nbytes if cache else None,
            "full_bytes": cache.full_nbytes if cache else None,
            "kv_bits": cache.kv_bits if cache else None,
            "model": cache.model_name if cache else model,
            "score": float(self.score or 0.0),
            "routing": self.routing,
        }


@dataclass
class CacheAnswer:
    """The answer one cache gave, and what it cost."""

    target: Target
    answer: Answer
    pieces: list[str] = field(repr=False)
    refusal: bool
    cache_load_s: float
    bytes_loaded: int  # read from disk (0 when served from the store's in-memory LRU)
    cache_nbytes: int
    full_nbytes: int
    kept_ratio: float
    target_tokens: int = 0  # the document tokens this cache holds (served from it, not re-read)
    ratio: float | None = None  # the ratio and level the cache was loaded at
    level: str | None = None
    also: tuple[Target, ...] = ()  # further segments whose caches were composed into this one (compose= strategies)
    dropped: tuple[Target, ...] = ()  # routed segments left out of the composition: the window was full

    doc_id = property(lambda self: self.target.doc_id)
    segment_index = property(lambda self: self.target.segment_index)
    node_id = property(lambda self: self.target.node_id)
    score = property(lambda self: self.target.score)
    text = property(lambda self: self.answer.text)
    mean_logprob = property(lambda self: self.answer.mean_logprob)

    def as_dict(self) -> dict:
        return {
            "node_id": self.node_id, "doc_id": self.doc_id, "segment_index": self.segment_index,
            "score": self.score, "answer": self.text, "mean_logprob": self.mean_logprob, "refusal": self.refusal,
            "cache_load_s": self.cache_load_s, "bytes_loaded": self.bytes_loaded, "cache_bytes": self.cache_nbytes,
            "full_bytes": self.full_nbytes, "kept_ratio": self.kept_ratio,
            "ttft_s": self.answer.time_to_first_token_s, "decode_s": self.answer.decode_s,
            "answer_tokens": len(self.answer.token_ids), "prompt_tokens": self.answer.prompt_tokens,
            "finish_reason": self.answer.finish_reason,
        }


@dataclass
class QAResult:
    """The answer to one question from one or more caches, with every candidate and what it cost."""

    question: str
    answers: list[CacheAnswer]
    chosen: int  # index into ``answers``
    strategy: str
    ratio: float | None
    level: str | None
    generate_s: float
    retrieve_s: float | None = None
    compose: str | None = None  # the name of the composition strategy that answered (set by the service)
    citations: list[Citation] = field(default_factory=list)  # the evidence the answer rests on, best first
    abstained: bool = False  # the evidence was too weak: ``text`` is the abstention, the candidate in metadata
    abstain_text: str = ""  # what ``text`` says when abstained
    evidence_score: float | None = None  # calibrated probability that the answer rests on the documents
    evidence_features: dict = field(default_factory=dict)  # what the score was computed from (kvzip_rag.abstain)
    no_evidence: tuple[Target, ...] = ()  # composed documents the answer paid (almost) no attention to
    # numbers the generated answer writes that none of its documents holds (kvzip_rag.abstain.unsupported_numbers)
    unsupported_numbers: tuple[str, ...] = ()
    # quote mode: the generated answer snapped to a span of the stored text (kvzip_rag.quote), shown instead of it
    quote: Citation | None = None

    best = property(lambda self: self.answers[self.chosen])
    text = property(lambda self: self.abstain_text if self.abstained else self.candidate)
    # the answer abstained or not: the quote in quote mode, else the generated answer (``best.text``)
    candidate = property(lambda self: self.quote.text if self.quote is not None else self.best.text)
    # "stop", "length" (max_new_tokens) or "window" (the answer was cut by the model's positions)
    finish_reason = property(lambda self: self.best.answer.finish_reason)
    cache_load_s = property(lambda self: sum(a.cache_load_s for a in self.answers))
    bytes_loaded = property(lambda self: sum(a.bytes_loaded for a in self.answers))
    targets = property(lambda self: [t for a in self.answers for t in (a.target, *a.also)])
    # the caches the answer was generated from, less composed documents that contributed no evidence
    used = property(lambda self: [t for t in (self.best.target, *self.best.also) if t not in self.no_evidence])
    dropped = property(lambda self: list(self.best.dropped))  # routed, left out of the composition (window full)
    # one answer from several routed caches joined (some may have been dropped), rather than one answer per cache
    composed = property(lambda self: len(self.answers) == 1 and bool(self.best.also or self.best.dropped))

    def source_metadata(self) -> dict[str, dict]:
        """What each routed segment did for this answer, by node id: every interface attaches it to its sources.

        Composed: ``composed`` is True for the segments joined into the cache that answered, False for those the
        model's window could not take. Otherwise (best-of-k, one cache): each segment's own ``answer``,
        ``mean_logprob``, ``refusal``, and ``chosen`` for the one whose answer was kept."""
        if self.composed:
            return {**{t.node_id: {"composed": True} for t in self.used},
                    **{t.node_id: {"composed": True, "evidence": False} for t in self.no_evidence},
                    **{t.node_id: {"composed": False} for t in self.dropped}}
        return {a.node_id: {"answer": a.text, "mean_logprob": a.mean_logprob, "refusal": a.refusal,
                            "chosen": n == self.chosen} for n, a in enumerate(self.answers)}

    def metadata(self, retrieve_s: float | None = None) -> dict:
        """Totals over every cache answered (``cache_load_s``, ``bytes_loaded``), the chosen answer's figures, the
        strategy, the segments composed and dropped, and ``answers`` with every candidate."""
        best = self.best
        return {
            "retrieve_s": self.retrieve_s if retrieve_s is None else retrieve_s,
            "cache_load_s": self.cache_load_s, "ttft_s": best.answer.time_to_first_token_s,
            "decode_s": best.answer.decode_s, "generate_s": self.generate_s, "bytes_loaded": self.bytes_loaded,
            "cache_bytes": best.cache_nbytes, "full_bytes": best.full_nbytes,
            "ratio": self.ratio if self.ratio is not None else best.kept_ratio, "level": self.level,
            "kept_ratio": best.kept_ratio, "answer_tokens": len(best.answer.token_ids),
            "prompt_tokens": best.answer.prompt_tokens, "finish_reason": best.answer.finish_reason,
            "chosen_node_id": best.node_id, "compose": self.compose,
            "strategy": self.strategy if self.composed or len(self.answers) > 1 else "single",
            "composed_node_ids": [t.node_id for t in (best.target, *best.also)],
            "dropped_node_ids": [t.node_id for t in self.dropped],
            "no_evidence_node_ids": [t.node_id for t in self.no_evidence],
            **grounding_metadata(self), "evidence_features": dict(self.evidence_features),
            "answers": [a.as_dict() for a in self.answers],
        }


def grounding_metadata(grounded: Any) -> dict:
    """What an answer rests on, as every interface's metadata shows it: ``citations`` (dicts, best first),
    ``abstained``, ``evidence_score``, ``unsupported_numbers`` (the answer's numbers that none of its documents
    holds) and, abstained, ``candidate_answer`` and ``abstain_text``. ``grounded``: a :class:`QAResult` or a
    conversation's ``Turn`` (both have these attributes)."""
    out = {"citations": [c.as_dict() for c in grounded.citations], "abstained": grounded.abstained,
           "evidence_score": grounded.evidence_score, "unsupported_numbers": list(grounded.unsupported_numbers)}
    if grounded.abstained:
        out.update(candidate_answer=grounded.candidate, abstain_text=grounded.abstain_text)
    return out


def choose_best(answers: Sequence[CacheAnswer]) -> int:
    """Non-refusals first, then the highest mean log-probability, then the better retrieval rank."""
    def key(item):
        position, a = item
        logprob = a.mean_logprob if a.mean_logprob is not None else float("-inf")
        return (not a.refusal, logprob, -position)

    return max(enumerate(answers), key=key)[0]
