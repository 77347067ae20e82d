"""Query-agnostic baselines the benchmark compares KVzip against, on the same packed cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..attention import AttentionObserver
from ..prefill import PrefilledDocument
from .base import Scorer, causal_softmax, grouped_queries


class _PrefillAttentionScorer(Scorer):
    """Shared machinery: accumulate attention the context's own queries give to context keys during prefill."""

    def prefill_observer(self, document_length: int, prefix_length: int, layers: list[int]) -> AttentionObserver:
        self._sums = {layer: torch.zeros(0) for layer in layers}
        self._prefix, self._length = prefix_length, document_length
        return _AttentionSums(self)

    def select_queries(self, positions: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(positions, dtype=torch.bool)

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        rows = [self._sums[layer][:, self._prefix :] for layer in document.compressed_layers]
        return self.postprocess(torch.stack(rows))

    def postprocess(self, scores: torch.Tensor) -> torch.Tensor:
        return scores


class _AttentionSums(AttentionObserver):
    """Adds each prefill chunk's attention (from the scorer's selected queries) into the scorer's per-layer sums."""

    def __init__(self, scorer: _PrefillAttentionScorer):
        self.scorer = scorer

    def observe(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, lse_parts=None) -> None:
        sums = self.scorer._sums
        if module.layer_idx not in sums:
            return
        key_len, q_len = key.shape[2], query.shape[2]
        query_pos = torch.arange(key_len - q_len, key_len, device=query.device)
        selected = self.scorer.select_queries(query_pos)
        if not selected.any():
            return
        queries = grouped_queries(module, query)[:, :, selected]
        key_pos = torch.arange(key_len, device=query.device)
        weights = causal_softmax((queries @ key[0].unsqueeze(1).transpose(-1, -2)) * module.scaling,
                                 query_pos[selected], key_pos)
        total = weights.sum(dim=(1, 2)).cpu()  # (kv_heads, key_len)
        acc = sums[module.layer_idx]
        if acc.numel() == 0:
            acc = torch.zeros(total.shape[0], self.scorer._length)
        acc[:, :key_len] += total
        sums[module.layer_idx] = acc


class H2OScorer(_PrefillAttentionScorer):
    """H2O-style heavy hitters: attention accumulated over every query of the prefill."""

    name = "h2o"


class SnapKVScorer(_PrefillAttentionScorer):
    """SnapKV-style: attention from the context's last ``window`` tokens (no question: query-agnostic), pooled."""

    name = "snapkv"

    def __init__(self, window: int = 32, kernel: int = 7):
        self.window, self.kernel = window, kernel

    def select_queries(self, positions: torch.Tensor) -> torch.Tensor:
        return positions >= self._length - self.window

    def postprocess(self, scores: torch.Tensor) -> torch.Tensor:
        layers, heads, n = scores.shape
        pooled = F.max_pool1d(scores.reshape(layers * heads, 1, n), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.reshape(layers, heads, n)


class KeyNormScorer(Scorer):
    """Keep keys with a small L2 norm (Devoto et al. 2024: low-norm keys draw attention)."""

    name = "keynorm"

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        return torch.stack([-document.context_keys(i).float().norm(dim=-1).cpu() for i in document.compressed_layers])


class RandomScorer(Scorer):
    """Uniformly random scores: the floor every method must beat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (len(document.compressed_layers), document.num_kv_heads, document.context_length)
        return torch.rand(shape, generator=generator)
