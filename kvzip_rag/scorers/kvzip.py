"""KVzip: score each context KV pair by the attention it gets while the model repeats the context."""

from __future__ import annotations

import torch

from ..attention import AttentionObserver, expand_kv, flash_cpu
from ..prefill import PrefilledDocument
from .base import Scorer, grouped_queries

FIRST_REPEAT = "\n\nRepeat the previous context exactly."
NEXT_REPEAT = "\n\nRepeat the part of the previous context exactly, starting with "


class KVzipScorer(Scorer):
    """Context reconstruction scoring (KVzip, Kim et al. 2025), as in ``shared/KVZIP.md``.

    For each ~2K-token chunk of the context, the repeat prompt plus the chunk is run through the model on top of
    the full cache (at positions after the context; its own KV is discarded afterwards). In every layer the score
    uses a softmax restricted to the prefix keys, the current chunk's keys and the repeat tokens' own keys
    (causal), reduced by max over the GQA group and over all repeat queries.
    """

    name = "kvzip"

    def __init__(self, chunk_size: int = 2048, tail_tokens: int = 8, progress=None):
        self.chunk_size = chunk_size
        self.tail_tokens = tail_tokens
        self.progress = progress

    def for_level(self, level: str) -> Scorer:
        """At ``"head"`` level KVzip ranks whole heads by calibrated, context-independent scores."""
        if level == "head":
            from .head import HeadScorer  # head level is built on this scorer

            return HeadScorer()
        return super().for_level(level)

    def repeat_ids(self, document: PrefilledDocument, start: int, end: int) -> list[int]:
        model, ctx = document.model, document.context_ids
        if start == 0:
            lead = model.encode(FIRST_REPEAT)
        else:
            lead = model.encode(NEXT_REPEAT) + ctx[max(0, start - self.tail_tokens) : start]
        return lead + model.encode(model.template.suffix) + ctx[start:end]

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        n = document.context_length
        scores = torch.zeros(len(document.compressed_layers), document.num_kv_heads, n)
        chunks = list(range(0, n, self.chunk_size))
        for done, start in enumerate(chunks):
            end = min(start + self.chunk_size, n)
            observer = _RepeatObserver(document, start, end, scores)
            run_without_caching(document, self.repeat_ids(document, start, end), observer)
            if self.progress:
                self.progress(done + 1, len(chunks))
        return scores


class ReweightedKVzipScorer(KVzipScorer):
    """KVzip's reconstruction scores times a weight per context pair (the frontier variants: kvzip-structure,
    kvzip-value). Pair and uniform levels only: head level ranks whole heads, with no per-pair scores to weight."""

    levels = ("pair", "uniform")

    def for_level(self, level: str) -> Scorer:
        return Scorer.for_level(self, level)

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        return super().score(document) * self.weights(document)

    def weights(self, document: PrefilledDocument) -> torch.Tensor:
        """Weights broadcastable to the scores' shape (len(compressed_layers), kv_heads, context_length)."""
        raise NotImplementedError


class _RepeatObserver(AttentionObserver):
    """Computes the restricted-softmax scores of one repeat chunk, layer by layer, as the forward pass runs."""

    def __init__(self, document: PrefilledDocument, start: int, end: int, out: torch.Tensor):
        self.prefix = document.prefix_length
        self.chunk = slice(self.prefix + start, self.prefix + end)
        self.base = document.base_length
        self.rows = {layer: row for row, layer in enumerate(document.compressed_layers)}
        self.out, self.start, self.end = out, start, end
        # Key ranges whose softmax normalisers make up the restricted set (the forward pass reports them).
        self.key_cuts = (self.prefix, self.chunk.start, self.chunk.stop)

    def restricted_lse(self, query: torch.Tensor, key: torch.Tensor, lse_parts, scaling: float) -> torch.Tensor:
        """log sum exp of each repeat query's logits over {prefix, current chunk, repeat tokens (causal)}."""
        wanted = [(0, self.prefix), (self.chunk.start, self.chunk.stop), (self.base, key.shape[2])]
        if lse_parts is not None and all(span in lse_parts for span in wanted if span[1] > span[0]):
            return torch.stack([lse_parts[span] for span in wanted if span[1] > span[0]]).logsumexp(0)
        heads = query.shape[1]
        seen = torch.cat([key[:, :, : self.prefix], key[:, :, self.chunk]], dim=2)  # visible to every query
        return torch.logaddexp(
            flash_lse(query, expand_kv(seen, heads), False, scaling),
            flash_lse(query, expand_kv(key[:, :, self.base :], heads), True, scaling),
        )

    def observe(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, lse_parts=None) -> None:
        row = self.rows.get(module.layer_idx)
        if row is None:
            return
        chunk_keys = key[:, :, self.chunk]
        lse = self.restricted_lse(query, key, lse_parts, module.scaling)
        queries = grouped_queries(module, query)  # (kv_heads, group, L, d)
        lse = lse[0].reshape(queries.shape[:3])
        for head in range(queries.shape[0]):
            # scaling * q.k - lse = log of the restricted attention weight, in one GEMM (group heads stacked)
            log_weights = torch.addmm(
                -lse[head].reshape(-1, 1), queries[head].reshape(-1, queries.shape[-1]), chunk_keys[0, head].T,
                alpha=module.scaling,
            )
            self.out[row, head, self.start : self.end] = log_weights.amax(dim=0).float().exp().cpu()


def flash_lse(query: torch.Tensor, key: torch.Tensor, causal: bool, scaling: float) -> torch.Tensor:
    """Log-sum-exp of the attention logits of each query over ``key`` (causal: query i sees keys 0..i)."""
    if query.device.type == "cpu":
        return flash_cpu(query, key, key, causal, scaling)[1]
    logits = (query @ key.transpose(-1, -2)).float() * scaling
    if causal:
        logits = logits.masked_fill(torch.ones_like(logits, dtype=torch.bool).triu(1), float("-inf"))
    return logits.logsumexp(-1)


def run_without_caching(document: PrefilledDocument, input_ids: list[int], observer) -> None:
    """Run extra tokens on top of the full cache, then restore the cache exactly as it was."""
    cache = document.cache
    saved = [(layer.keys, layer.values, getattr(layer, "cumulative_length", None)) for layer in cache.layers]
    model = document.model
    try:
        with torch.inference_mode():
            model.forward(input_ids, cache, logits_to_keep=1, kvzip_observer=observer, kvzip_prefill=True)
    finally:
        for layer, (keys, values, cumulative) in zip(cache.layers, saved):
            layer.keys, layer.values = keys, values
            if cumulative is not None:
                layer.cumulative_length = cumulative
