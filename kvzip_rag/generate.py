"""Answers from a packed cache: single questions, token streams, and multi-turn conversations."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from .cache import PackedCache
from .clean import answer_end
from .errors import ContextTooLongError, InvalidArgumentError
from .evidence import Evidence, EvidenceRecorder, is_recording
from .models import KVzipModel
from .quote import DEFAULT_ANSWER_STYLE, check_answer_style

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
CHARS_PER_TOKEN_BOUND = 8  # a question longer than window * this many characters is refused before tokenizing


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class SamplingOptions:
    """Greedy by default (``temperature=0``); set a temperature for sampling, optionally with top-k / top-p.

    Every value is checked here, once (a one-line ``InvalidArgumentError``); ``max_new_tokens`` may be any positive
    integer: an answer is clamped to the model's window when it is generated (``finish_reason="window"``)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    clean: bool = True  # the answer ends at its first line break or where it repeats itself (kvzip_rag.clean)
    # "quote": the answer snapped to a verbatim span of the routed documents once generated (kvzip_rag.quote)
    answer_style: str = DEFAULT_ANSWER_STYLE

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise InvalidArgumentError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_number(self.temperature) or self.temperature < 0:
            raise InvalidArgumentError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidArgumentError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidArgumentError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise InvalidArgumentError(f"seed must be an integer in 0..2**64-1, got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidArgumentError(f"stop must be a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        check_answer_style(self.answer_style)

    @staticmethod
    def canonical(name: str) -> str:
        """An option's own name (``max_tokens``, the OpenAI spelling, is ``max_new_tokens``)."""
        return "max_new_tokens" if name == "max_tokens" else name

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SamplingOptions:
        """THE normaliser of answer options given by name (``max_tokens`` is accepted for ``max_new_tokens``; a
        ``None`` stop is no stop): unknown names and bad values fail here, before any model work."""
        named = {cls.canonical(name): value for name, value in options.items()}
        if len(named) < len(options):
            raise InvalidArgumentError("give max_new_tokens or max_tokens, not both")
        options = named
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise InvalidArgumentError(f"unknown answer option(s) {', '.join(unknown)}; use {', '.join(known)}")
        if "stop" in options and options["stop"] is None:
            options["stop"] = ()
        return cls(**options)


@dataclass
class Answer:
    """A generated answer and what it cost."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    time_to_first_token_s: float
    decode_s: float
    finish_reason: str  # "stop" (end of turn or stop string), "length" (max_new_tokens) or "window" (model's positions)
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


class Decoding:
    """One answer's per-token rule, the only one: sampling, stop ids and strings, clean ends and the text pieces.
    Drivers feed it each next-token distribution and forward ``feed`` until ``done``: :class:`AnswerStream` one
    answer at a time, :mod:`kvzip_rag.scheduler` several answers in one forward pass."""

    def __init__(self, model: KVzipModel, options: SamplingOptions, limit: str = "length") -> None:
        self.tokenizer, self.stop_ids = model.tokenizer, model.stop_token_ids
        self.options = options
        self.generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
        self.generated: list[int] = []
        self.logprob_sum = 0.0
        self.emitted, self.finish = "", limit  # the finish reason when max_new_tokens runs out
        self.steps = 0
        self.start = time.perf_counter()
        self.first_token_at: float | None = None
        self.feed: int | None = None  # the token the next forward appends (None: nothing to append)
        self.done = False

    def step(self, logits: torch.Tensor) -> str:
        """Take the next-token ``logits``; returns the new text ('' for none) and sets ``feed`` and ``done``."""
        options = self.options
        self.steps += 1
        last = self.steps >= options.max_new_tokens
        token = _pick(logits, options, self.generator)
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self.finish, self.feed, self.done = "stop", None, True
            return ""
        self.generated.append(token)
        self.logprob_sum += float(torch.log_softmax(logits.float(), dim=-1)[token])
        text = self.tokenizer.decode(self.generated, skip_special_tokens=True).lstrip()  # answers start at a word
        cut = min((text.find(s) for s in options.stop if s and s in text), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        elif options.clean and (end := answer_end(text, self.generated, self.tokenizer)) is not None:
            text, self.finish = end, "stop"
        piece = ""
        if not text.endswith("\ufffd") and len(text) > len(self.emitted):
            piece, self.emitted = text[len(self.emitted) :], text
        stopped = self.finish == "stop"
        self.feed, self.done = (None if stopped else token), stopped or last
        return piece

    def result(self, prompt_tokens: int, end: float, evidence: Evidence | None = None) -> Answer:
        """The finished ``Answer`` (``end``: when decoding stopped)."""
        first_token_at = self.first_token_at or end
        return Answer(
            text=self.emitted.strip(),
            token_ids=self.generated,
            prompt_tokens=prompt_tokens,
            time_to_first_token_s=first_token_at - self.start,
            decode_s=end - first_token_at,
            finish_reason=self.finish,
            mean_logprob=self.logprob_sum / len(self.generated) if self.generated else None,
            evidence=evidence,
        )


#: Answer tokens an answer's cache makes room for before its first pass (:meth:`AnswerStream.reserve_room`): most
#: answers are shorter, and every decoding step's attention reads the reserved rows too (masked), so reserving
#: ``max_new_tokens`` (128 by default) would slow the short answers down.
ANSWER_ROOM = 32


class AnswerStream:
    """Iterate to receive text pieces as they are generated; ``result`` holds the full ``Answer`` afterwards."""

    def __init__(self, model: KVzipModel, cache: PackedCache, prompt_ids: list[int], options: SamplingOptions,
                 keep: bool, on_done: Callable[[Answer], None] | None = None, limit: str = "length",
                 evidence: bool = False):
        self.model, self.cache, self.prompt_ids, self.options, self.keep = model, cache, prompt_ids, options, keep
        self.on_done, self.evidence = on_done, evidence
        self.limit = limit  # the finish reason when max_new_tokens runs out: "window" when it was clamped to it
        self.result: Answer | None = None
        # a kept turn that ends midway is cut back to here (a DynamicCache, the benchmarks' dense reference, is
        # thrown away after its one answer)
        self.start_tail = cache.tail_length if isinstance(cache, PackedCache) else None

    def decoding(self) -> Decoding:
        """A fresh per-token state for this answer (its clock starts now)."""
        return Decoding(self.model, self.options, self.limit)

    def reserve_room(self) -> None:
        """Before its first pass: room in the cache for the prompt and up to ``ANSWER_ROOM`` answer tokens (a longer
        answer regrows geometrically as before), so a short answer never regrows the cache midway."""
        if isinstance(self.cache, PackedCache):
            self.cache.reserve(len(self.prompt_ids) + min(self.options.max_new_tokens, ANSWER_ROOM) + 1)

    def recorder(self) -> EvidenceRecorder | None:
        """Where the answer attends, recorded from its prompt's forward pass on (``evidence=True``), else None."""
        return EvidenceRecorder(self.cache) if self.evidence else None

    def goes_on(self, decoding: Decoding) -> bool:
        """Whether ``decoding.feed`` still goes into the cache after a step: while the answer goes on, and in a
        kept conversation also its last token (the cache then holds the whole turn)."""
        return decoding.feed is not None and (not decoding.done or self.keep)

    def finish(self, decoding: Decoding, recorder: EvidenceRecorder | None, done: bool) -> None:
        """The end of the answer, whoever drove it (this iterator or :mod:`kvzip_rag.scheduler`): the evidence
        detached, the cache back to the document unless the conversation keeps the turn (a kept turn closed or
        failed midway is cut out of the cache too, so the cache and ``Conversation.turns`` stay the same
        conversation), and when ``done`` ``result`` and ``on_done``."""
        evidence = recorder.finish() if recorder is not None else None
        end = time.perf_counter()
        if not self.keep:
            self.cache.reset()
        elif not done and self.start_tail is not None:
            self.cache.rewind(self.start_tail)
        if done:
            self.result = decoding.result(len(self.prompt_ids), end, evidence)
            if self.on_done:
                self.on_done(self.result)

    def __iter__(self) -> Iterator[str]:
        decoding, recorder, done = self.decoding(), self.recorder(), False
        try:
            self.reserve_room()
            with torch.inference_mode():
                logits = packed_forward(self.model, self.cache, self.prompt_ids)
                while True:
                    piece = decoding.step(logits)
                    if piece:
                        yield piece
                    if not self.goes_on(decoding):
                        break
                    logits = packed_forward(self.model, self.cache, [decoding.feed])
                    if decoding.done:
                        break
            done = True
        finally:
            self.finish(decoding, recorder, done)


def window_room(model: KVzipModel, cache: PackedCache, prompt_tokens: int, pending: int = 0) -> int:
    """The answer tokens that still fit the model's positions after ``cache`` (documents and earlier turns),
    ``pending`` tokens still to be replayed into it, and the question's ``prompt_tokens``: the one window rule."""
    return model.max_positions - (cache.get_seq_length() + pending + prompt_tokens)


def prompt_ids(model: KVzipModel, question: str, first_turn: bool) -> list[int]:
    """The question's prompt tokens (whatever the answer style); ``ContextTooLongError`` for one
    that alone exceeds the model's window (a question over window * 8 characters is refused on its length, before
    tokenizing it)."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError("the question is empty")
    window = model.max_positions
    if len(question) > window * CHARS_PER_TOKEN_BOUND:
        raise ContextTooLongError(f"the question has {len(question):,} characters: more than model {model.name!r}'s "
                                  f"window of {window} tokens can hold; shorten it")
    ids = model.encode(model.template.question_text(question, first_turn=first_turn))
    if len(ids) >= window:
        raise ContextTooLongError(f"the question takes {len(ids)} tokens but model {model.name!r} takes at most "
                                  f"{window} positions, documents and answer included; shorten it")
    return ids


def turn_ids(model: KVzipModel, question: str, answer_text: str, first_turn: bool) -> list[int]:
    """The tokens one answered turn takes in a conversation's cache (the question's prompt, then the answer)."""
    return prompt_ids(model, question, first_turn) + model.encode(answer_text)


def check_cache_for(model: KVzipModel, cache: PackedCache) -> None:
    """The one check before answering: ``model`` a ``KVzipModel``, ``cache`` a ``PackedCache`` it built (one-line
    errors, not an ``AttributeError`` from inside)."""
    if not isinstance(model, KVzipModel):
        raise InvalidArgumentError(f"model is a KVzipModel (kvzip_rag.load_model), got {type(model).__name__}")
    if not isinstance(cache, PackedCache):
        raise InvalidArgumentError("cache is a PackedCache (kvzip_rag.compress, or a store's load_cache), got "
                                   f"{type(cache).__name__}")
    cache.info.check_model(model)


def stream_answer(model: KVzipModel, cache: PackedCache, question: str, sampling: SamplingOptions | None = None,
                  evidence: bool = False, **options: Any) -> AnswerStream:
    """Stream the answer to one independent question; the cache is back to the document afterwards.
    ``evidence=True`` records where the answer attended (``Answer.evidence``, :mod:`kvzip_rag.evidence`).

    ``sampling`` or the options by name (:meth:`SamplingOptions.from_options`). The answer is clamped to the
    window left after the cache and the question (``finish_reason="window"`` when that cut it);
    ``ContextTooLongError`` when no answer token fits. Checked before any model work."""
    if sampling is None:
        sampling = SamplingOptions.from_options(options)
    elif not isinstance(sampling, SamplingOptions):
        raise InvalidArgumentError(f"sampling is a SamplingOptions (or give the options by name), got {sampling!r:.80}")
    elif options:
        raise InvalidArgumentError("give sampling= or answer options by name, not both")
    check_cache_for(model, cache)
    cache.reset()
    ids = prompt_ids(model, question, True)
    room = window_room(model, cache, len(ids))
    if room < 1:
        raise ContextTooLongError(
            f"the document(s) ({cache.get_seq_length()} positions) and the question ({len(ids)} tokens) fill model "
            f"{model.name!r}'s window of {model.max_positions}: no room for an answer; shorten the question or "
            "answer from fewer documents")
    limit = "length" if sampling.max_new_tokens <= room else "window"
    return AnswerStream(model, cache, ids, replace(sampling, max_new_tokens=min(sampling.max_new_tokens, room)),
                        keep=False, limit=limit, evidence=evidence)


def answer(model: KVzipModel, cache: PackedCache, question: str, sampling: SamplingOptions | None = None,
           **options: Any) -> Answer:
    """Answer one question from the compressed document (independent of any earlier question)."""
    stream = stream_answer(model, cache, question, sampling, **options)
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
        check_cache_for(self.model, self.cache)
        self.cache.reset()

    def stream(self, question: str, evidence: bool | None = None, **options) -> AnswerStream:
        """``evidence``: record where the answer attended (``None``: when inside ``kvzip_rag.evidence.recording``)."""
        ids = prompt_ids(self.model, question, not self.turns)
        return AnswerStream(
            self.model, self.cache, ids, SamplingOptions.from_options(options), keep=True,
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
