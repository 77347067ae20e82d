"""Batched forward passes over different packed caches: one pass appends its own tokens to each of B caches.

Each cache keeps its own variable-length heads and tail (:class:`~kvzip_rag.cache.BatchedPackedCache` is a view of
them side by side). The B sequences' tokens go through the model as one row, one after another with no padding:
a question being prefilled (its prompt) beside answers taking their next token (one each). The dense work
(projections, MLP, output head) runs once for all of them, which is what a CPU step costs (reading the weights).
With several sequences each layer's caches share one padded arena (:class:`~kvzip_rag.cache.LayerArena`): one
indexed copy writes every sequence's new keys and values, and one attention call reads every sequence over its
own cache (CPU: the sequences' last queries in one batched GEMM, a question's earlier prompt tokens over its own
cache; CUDA: one flash-attn varlen call over all (sequence, head) segments). The continuous-batching scheduler
(:mod:`kvzip_rag.scheduler`) runs one such pass per step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import BatchedPackedCache, PackedCache
from .errors import InvalidArgumentError
from .models import KVzipModel


def batched_forward(model: KVzipModel, caches: Sequence[PackedCache], tokens: Sequence[Sequence[int]]) -> torch.Tensor:
    """Append ``tokens[b]`` (a question's prompt, or one answer token) to ``caches[b]`` for every ``b`` in one
    forward pass; the logits after each sequence's last token, ``(B, vocab)`` (row ``b`` equals what ``caches[b]``
    alone gives, within float summation order)."""
    if len(caches) != len(tokens) or not caches:
        raise InvalidArgumentError(f"give one token list per cache, got {len(tokens)} for {len(caches)} caches")
    lengths = [len(ids) for ids in tokens]
    if min(lengths) < 1:
        raise InvalidArgumentError("every cache in a batch needs at least one token to append")
    batch = BatchedPackedCache(list(caches), lengths, model.config.num_attention_heads)
    ids = torch.tensor([[int(t) for seq in tokens for t in seq]], device=model.device)
    positions = torch.tensor([[p + i for p, n in zip(batch.positions, lengths) for i in range(n)]],
                             device=model.device)
    last = torch.tensor(lengths, device=model.device).cumsum(0) - 1
    out = model.model(ids, position_ids=positions, use_cache=True, logits_to_keep=last,
                      **{model.cache_argument: batch})
    return out.logits[0]
