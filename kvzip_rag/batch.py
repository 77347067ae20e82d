"""Batched decoding over different packed caches: one forward pass appends one token to each of B caches.

Each cache keeps its own variable-length heads and tail (:class:`~kvzip_rag.cache.BatchedPackedCache` is a view of
them side by side); the dense work (projections, MLP, output head) runs once for the B tokens, which is what a
CPU decoding step costs (reading the weights), and attention reads each cache in place by the packed paths, CPU or
flash-attn. Prefill stays per sequence (one question's tokens over its own cache, :func:`~kvzip_rag.generate.
packed_forward`); decoding is what is batched (:mod:`kvzip_rag.scheduler`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .cache import BatchedPackedCache, PackedCache
from .errors import InvalidArgumentError
from .models import KVzipModel


def batched_forward(model: KVzipModel, caches: Sequence[PackedCache], tokens: Sequence[int]) -> torch.Tensor:
    """Append ``tokens[b]`` to ``caches[b]`` for every ``b`` in one forward pass; the next-token logits ``(B, vocab)``
    (row ``b`` equals what ``caches[b]`` alone gives, within float summation order)."""
    if len(caches) != len(tokens) or not caches:
        raise InvalidArgumentError(f"give one token per cache, got {len(tokens)} tokens for {len(caches)} caches")
    batch = BatchedPackedCache(list(caches))
    ids = torch.tensor([[int(t)] for t in tokens], device=model.device)
    positions = torch.tensor([[p] for p in batch.positions], device=model.device)
    out = model.model(ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                      **{model.cache_argument: batch})
    return out.logits[:, -1]
