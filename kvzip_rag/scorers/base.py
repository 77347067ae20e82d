"""What every scorer sees and returns: the prefilled document (:mod:`kvzip_rag.prefill`) and one score per
(layer, kv head, token)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..attention import AttentionObserver
from ..errors import InvalidArgumentError
from ..prefill import PrefilledDocument


class Scorer(ABC):
    """Scores every context KV pair; higher means keep. One small class per method (kvpress style)."""

    name: str = "scorer"
    levels: tuple[str, ...] = ("pair", "uniform")  # eviction levels these scores make sense for

    def for_level(self, level: str) -> "Scorer":
        """The scorer that ranks at ``level``: this one, or an error naming the levels it supports."""
        if level not in self.levels:
            raise InvalidArgumentError(
                f"scorer {self.name!r} ranks at level {' or '.join(map(repr, self.levels))}, not {level!r}"
            )
        return self

    def prefill_observer(
        self, document_length: int, prefix_length: int, layers: list[int]
    ) -> AttentionObserver | None:
        """An observer to run during prefill (for scorers that need the context's own attention), or None."""
        return None

    @abstractmethod
    def score(self, document: PrefilledDocument) -> torch.Tensor:
        """Float32 scores of shape (len(compressed_layers), kv_heads, context_length)."""


def grouped_queries(module: torch.nn.Module, query: torch.Tensor) -> torch.Tensor:
    """(1, H, L, d) queries as (kv_heads, group, L, d): the query heads that share each kv head."""
    _, heads, length, dim = query.shape
    num_kv = heads // module.num_key_value_groups
    return query[0].reshape(num_kv, module.num_key_value_groups, length, dim)


def causal_softmax(logits: torch.Tensor, query_positions: torch.Tensor, key_positions: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with keys after a query's position masked out."""
    visible = key_positions[None, :] <= query_positions[:, None]
    return torch.softmax(logits.float().masked_fill(~visible, float("-inf")), dim=-1)
