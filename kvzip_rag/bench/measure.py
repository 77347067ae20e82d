"""Timed primitives the benchmark is built from: dense (plain transformers) prefill, answers (dense or from a packed
cache, both decoded by :class:`~kvzip_rag.generate.AnswerStream`, the package's one decode loop) and teacher-forced
likelihoods, per-token decode latency (forced length: a timing loop, not an answer), memory."""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import kvzip_rag
from kvzip_rag.cache import PackedCache
from kvzip_rag.generate import AnswerStream, SamplingOptions, packed_forward
from kvzip_rag.models import KVzipModel


@dataclass
class Generation:
    text: str
    tokens: int
    ttft_s: float  # prompt processing (and, for dense, the document prefill) up to the first token
    decode_s: float  # after the first token
    nll: float | None = None

    @property
    def s_per_token(self) -> float | None:
        return self.decode_s / (self.tokens - 1) if self.tokens > 1 else None


def question_ids(model: KVzipModel, question: str) -> list[int]:
    return model.encode(model.template.question_text(question, first_turn=True))


def document_ids(model: KVzipModel, text: str) -> list[int]:
    return model.encode(model.template.prefix) + model.encode(text)


def gold_ids(model: KVzipModel, gold: str) -> list[int]:
    return model.encode(gold.strip())


# ---------------------------------------------------------------- dense: plain transformers with DynamicCache

def dense_prefill(model: KVzipModel, ids: list[int], chunk: int = 2048) -> tuple[DynamicCache, torch.Tensor]:
    """Chunked prefill into transformers' DynamicCache (the same chunking compress uses); last-position logits."""
    cache = DynamicCache(config=model.model.config)
    logits = None
    with torch.inference_mode():
        for start in range(0, len(ids), chunk):
            logits = model.forward(ids[start : start + chunk], cache, logits_to_keep=1).logits[0, -1]
    return cache, logits


def _crop_to(cache: DynamicCache, length: int) -> None:
    """Drop everything after the first ``length`` tokens (transformers 5 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _dense_step(model: KVzipModel, cache: DynamicCache, ids: list[int], keep_all: bool = False) -> torch.Tensor:
    out = model.forward(ids, cache, logits_to_keep=0 if keep_all else 1)
    return out.logits[0] if keep_all else out.logits[0, -1]


def dense_answer(model: KVzipModel, ids: list[int], max_new_tokens: int, gold: str | None = None) -> Generation:
    """Greedy answer from scratch: prefill the whole prompt (document + question, chunked as compress does), then
    the one decode loop (:class:`~kvzip_rag.generate.AnswerStream`, here over transformers' DynamicCache) with the
    options packed answers take, timed per phase. With ``gold``, also the teacher-forced NLL of the gold answer,
    from the same prefill."""
    start = time.perf_counter()
    cache, _ = dense_prefill(model, ids[:-1])  # the last prompt token is the decode loop's, for its first logits
    prefill_s = time.perf_counter() - start
    stream = AnswerStream(model, cache, ids[-1:], SamplingOptions(max_new_tokens=max_new_tokens), keep=True)
    for _ in stream:
        pass
    answer = stream.result
    result = Generation(answer.text, len(answer.token_ids), prefill_s + answer.time_to_first_token_s,
                        answer.decode_s)
    target = gold_ids(model, gold) if gold is not None else []
    if target:
        _crop_to(cache, len(ids) - 1)
        with torch.inference_mode():
            logits = _dense_step(model, cache, ids[-1:] + target[:-1], keep_all=True).float()
        result.nll = float(F.cross_entropy(logits, torch.tensor(target, device=logits.device)))
    return result


def chunk_answer(model: KVzipModel, context: Callable[[str], str], question: str, max_new_tokens: int,
                 gold: str | None = None) -> tuple[Generation, float, int]:
    """The chunk-retrieval baseline: ``context(question)`` (the retrieved chunks) as the document, then
    :func:`dense_answer`, its time to first token counting the retrieval. Returns (answer, retrieval seconds, prompt
    tokens)."""
    start = time.perf_counter()
    text = context(question)
    retrieval_s = time.perf_counter() - start
    ids = document_ids(model, text) + question_ids(model, question)
    gen = dense_answer(model, ids, max_new_tokens, gold=gold)
    gen.ttft_s += retrieval_s
    return gen, retrieval_s, len(ids)


def median_decode_time(step: Callable[[list[int]], torch.Tensor], prompt: list[int], steps: int) -> float:
    """Median seconds of one greedy decode step after feeding ``prompt`` (``step`` runs ids, returns logits)."""
    times = []
    with torch.inference_mode():
        logits = step(prompt)
        for _ in range(steps):
            token = int(logits.argmax())
            t0 = time.perf_counter()
            logits = step([token])
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dense_decode_latency(model: KVzipModel, cache: DynamicCache, prompt: list[int], steps: int) -> float:
    """Median seconds per decoded token on a DynamicCache holding the document; the cache is cropped back."""
    base = cache.get_seq_length()
    try:
        return median_decode_time(lambda ids: _dense_step(model, cache, ids), prompt, steps)
    finally:
        _crop_to(cache, base)


# ---------------------------------------------------------------- packed: the kvzip-rag engine

def packed_nll(model: KVzipModel, cache: PackedCache, question: str, gold: str) -> float | None:
    """Teacher-forced mean -log p of the gold answer's tokens after the question, read through the packed cache."""
    cache.reset()
    prompt, target = question_ids(model, question), gold_ids(model, gold)
    if not target:
        return None
    try:
        with torch.inference_mode():
            logits = packed_forward(model, cache, prompt + target, all_logits=True)
        logits = logits[len(prompt) - 1 : len(prompt) + len(target) - 1].float()
        return float(F.cross_entropy(logits, torch.tensor(target, device=logits.device)))
    finally:
        cache.reset()


def packed_answer(model: KVzipModel, cache: PackedCache, question: str, max_new_tokens: int,
                  gold: str | None = None) -> Generation:
    answer = kvzip_rag.answer(model, cache, question, max_new_tokens=max_new_tokens)
    result = Generation(answer.text, len(answer.token_ids), answer.time_to_first_token_s, answer.decode_s)
    if gold is not None:
        result.nll = packed_nll(model, cache, question, gold)
    return result


def packed_decode_latency(model: KVzipModel, cache: PackedCache, prompt: list[int], steps: int) -> float:
    """Median seconds per decoded token on the packed cache (forced length, end-of-turn ignored); reset after."""
    cache.reset()
    try:
        return median_decode_time(lambda ids: packed_forward(model, cache, ids), prompt, steps)
    finally:
        cache.reset()


def first_token(model: KVzipModel, cache: PackedCache, question: str) -> int:
    """Process the question on the cache and pick the first answer token (greedy); reset after."""
    cache.reset()
    try:
        with torch.inference_mode():
            return int(packed_forward(model, cache, question_ids(model, question)).argmax())
    finally:
        cache.reset()


# ---------------------------------------------------------------- memory

def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float | None:
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss / 2**20
