"""Answers from a packed cache: single questions, token streams, and multi-turn conversations."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import PackedCache
from .errors import InvalidArgumentError
from .evidence import Evidence, EvidenceRecorder, is_recording
from .models import KVzipModel


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy by default (``temperature=0``); set a temperature for sampling, optionally with top-k / top-p."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgumentError("max_new_tokens must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise InvalidArgumentError("need temperature >= 0, 0 < top_p <= 1 and top_k >= 0")


@dataclass
class Answer:
    """A generated answer and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    time_to_first_token_s: float
    decode_s: float
    finish_reason: str  # "stop" (end of turn or stop string) or "length"
    mean_logprob: float | None = None  # mean log-probability of the answer tokens: a confidence to rank answers
    evidence: Evidence | None = field(default=None, repr=False)  # where its attention went (when recorded)

    @property
    def seconds_per_token(self) -> float:
        return self.decode_s / max(len(self.token_ids) - 1, 1)


def packed_forward(model: KVzipModel, cache: PackedCache, ids: list[int], all_logits: bool = False) -> torch.Tensor:
    """Append ``ids`` to the cache's tail; the next-token logits of the last id (of every id with ``all_logits``)."""
    out = model.forward(ids, cache, logits_to_keep=0 if all_logits else 1)
    return out.logits[0] if all_logits else out.logits[0, -1]


def _pick(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> int:
    if options.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / options.temperature
    if options.top_k:
        threshold = torch.topk(logits, min(options.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if options.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, -1) > options.top_p
        logits[order[drop]] = float("-inf")
    probs = torch.softmax(logits, -1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


class AnswerStream:
    """Iterate to receive text pieces as they are generated; ``result`` holds the full ``Answer`` afterwards."""

    def __init__(self, model: KVzipModel, cache: PackedCache, prompt_ids: list[int], options: SamplingOptions,
                 keep: bool, on_done: Callable[[Answer], None] | None = None, evidence: bool = False):
        self.model, self.cache, self.prompt_ids, self.options, self.keep = model, cache, prompt_ids, options, keep
        self.on_done = on_done
        self.evidence = evidence
        self.result: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        options, tokenizer = self.options, self.model.tokenizer
        stop_ids = self.model.stop_token_ids
        generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        generated: list[int] = []
        logprob_sum = 0.0
        emitted, finish = "", "length"
        start = time.perf_counter()
        first_token_at = None
        recorder = EvidenceRecorder(self.cache) if self.evidence else None
        try:
            with torch.inference_mode():
                logits = packed_forward(self.model, self.cache, self.prompt_ids)
                for step in range(options.max_new_tokens):
                    token = _pick(logits, options, generator)
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                    if token in stop_ids:
                        finish = "stop"
                        break
                    generated.append(token)
                    logprob_sum += float(torch.log_softmax(logits.float(), dim=-1)[token])
                    text = tokenizer.decode(generated, skip_special_tokens=True).lstrip()  # answers start at a word
                    cut = min((text.find(s) for s in options.stop if s and s in text), default=-1)
                    if cut >= 0:
                        text, finish = text[:cut], "stop"
                    if not text.endswith("\ufffd") and len(text) > len(emitted):
                        yield text[len(emitted) :]
                        emitted = text
                    if finish == "stop":
                        break
                    if step + 1 < options.max_new_tokens or self.keep:
                        logits = packed_forward(self.model, self.cache, [token])
        finally:
            evidence = recorder.finish() if recorder is not None else None
            end = time.perf_counter()
            if not self.keep:
                self.cache.reset()
        first_token_at = first_token_at or end
        self.result = Answer(
            text=emitted.strip(),
            token_ids=generated,
            prompt_tokens=len(self.prompt_ids),
            time_to_first_token_s=first_token_at - start,
            decode_s=end - first_token_at,
            finish_reason=finish,
            mean_logprob=logprob_sum / len(generated) if generated else None,
            evidence=evidence,
        )
        if self.on_done:
            self.on_done(self.result)


def _prompt_ids(model: KVzipModel, question: str, first_turn: bool) -> list[int]:
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError("the question is empty")
    return model.encode(model.template.question_text(question, first_turn=first_turn))


def turn_ids(model: KVzipModel, question: str, answer_text: str, first_turn: bool) -> list[int]:
    """The tokens one answered turn takes in a conversation's cache (the question's prompt, then the answer)."""
    return _prompt_ids(model, question, first_turn) + model.encode(answer_text)


def stream_answer(model: KVzipModel, cache: PackedCache, question: str, evidence: bool = False,
                  **options) -> AnswerStream:
    """Stream the answer to one independent question; the cache is back to the document afterwards.
    ``evidence=True`` records where the answer attended (``Answer.evidence``, :mod:`kvzip_rag.evidence`)."""
    cache.info.check_model(model)
    cache.reset()
    return AnswerStream(model, cache, _prompt_ids(model, question, True), SamplingOptions(**options), keep=False,
                        evidence=evidence)


def answer(model: KVzipModel, cache: PackedCache, question: str, **options) -> Answer:
    """Answer one question from the compressed document (independent of any earlier question)."""
    stream = stream_answer(model, cache, question, **options)
    for _ in stream:
        pass
    return stream.result


@dataclass
class Conversation:
    """Follow-up questions about one document: every turn stays in the cache's tail until ``reset()``."""

    model: KVzipModel
    cache: PackedCache
    turns: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cache.info.check_model(self.model)
        self.cache.reset()

    def stream(self, question: str, evidence: bool | None = None, **options) -> AnswerStream:
        """``evidence``: record where the answer attended (``None``: when inside ``kvzip_rag.evidence.recording``)."""
        ids = _prompt_ids(self.model, question, first_turn=not self.turns)
        return AnswerStream(
            self.model, self.cache, ids, SamplingOptions(**options), keep=True,
            on_done=lambda result: self.turns.append((question, result.text)),
            evidence=is_recording() if evidence is None else evidence,
        )

    def add_turn(self, question: str, answer_text: str) -> int:
        """Put an earlier (question, answer) exchange into the cache without generating; returns its token count.

        Lets integrations resume a conversation whose history they received (chat engines, LangChain messages).
        """
        ids = turn_ids(self.model, question, answer_text, first_turn=not self.turns)
        with torch.inference_mode():
            packed_forward(self.model, self.cache, ids)
        self.turns.append((question, answer_text))
        return len(ids)

    def ask(self, question: str, **options) -> Answer:
        stream = self.stream(question, **options)
        for _ in stream:
            pass
        return stream.result

    def reset(self) -> None:
        """Forget the conversation: back to the compressed document."""
        self.turns.clear()
        self.cache.reset()
