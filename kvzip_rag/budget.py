"""How many context entries each (layer, kv head) keeps at a ratio, for the three KVzip eviction levels.

Inputs are per-head score lists sorted in descending order, as stored in a packed cache, so the same function
selects at compression time (all entries) and at load time from a cache stored at a higher ratio (a prefix of
each list). Ties are broken by (layer, head, rank) order, which a stable sort preserves on any such prefix: loading
at r' < r keeps exactly the entries compressing at r' would keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import InvalidArgumentError

if TYPE_CHECKING:  # the ratio rules are used by the store's catalogue (ls, rm, gc), which must not import torch
    import torch

LEVELS = ("pair", "uniform", "head")
RATIO_TOLERANCE = 1e-9  # ratios are stored as floats: two within this are the same ratio


def same_ratio(a: float, b: float) -> bool:
    return abs(a - b) <= RATIO_TOLERANCE


def ratio_covers(stored: float, wanted: float) -> bool:
    """A cache stored at ``stored`` can load at ``wanted`` (any lower ratio is a prefix of each head)."""
    return wanted <= stored + RATIO_TOLERANCE


@dataclass(frozen=True)
class Budget:
    """What a cache is compressed or loaded at: ``ratio`` (the fraction of KV pairs kept) and ``level``, validated
    once here. ``None`` (loading only) means "as stored": any ratio, any level."""

    ratio: float | None
    level: str | None

    def __post_init__(self) -> None:
        ratio = self.ratio
        if ratio is not None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                    or not 0.0 < ratio <= 1.0:
                raise InvalidArgumentError(
                    f"ratio is the fraction of KV pairs kept and must be in (0, 1], got {ratio!r}")
            object.__setattr__(self, "ratio", float(ratio))
        if self.level is not None and self.level not in LEVELS:
            raise InvalidArgumentError(f"unknown level {self.level!r}; choose one of {', '.join(LEVELS)}")

    def served_by(self, stored_ratio: float, stored_level: str) -> bool:
        """A cache stored at (``stored_ratio``, ``stored_level``) serves this budget: a lower or equal ratio of its
        own level (the store's ``check_loadable`` also derives other levels from ratio 1.0)."""
        return ((self.ratio is None or ratio_covers(stored_ratio, self.ratio))
                and (self.level is None or self.level == stored_level
                     or (same_ratio(stored_ratio, 1.0) and "head" not in (self.level, stored_level))))


DEFAULT_BUDGET = Budget(0.3, "pair")  # what documents are compressed at unless told otherwise
AS_STORED = Budget(None, None)  # load every cache as it was stored


def check_ratio_level(ratio: float, level: str) -> None:
    """Refuse a compression budget (both given); the rule is :class:`Budget`'s."""
    if ratio is None or level is None:
        raise InvalidArgumentError("compressing needs a ratio and a level")
    Budget(ratio, level)


@dataclass(frozen=True)
class CacheKind:
    """Which model built a cache, the typed key beside ``CacheInfo``: caches of one kind are interchangeable for
    that model (its fingerprint and prompt template). ``kv_bits`` ``None`` accepts any storage precision."""

    fingerprint: str
    template_digest: str
    kv_bits: int | None = None

    @classmethod
    def of_model(cls, model: Any) -> CacheKind:
        """The kind of caches ``model`` (a KVzipModel) answers from."""
        return cls(model.fingerprint, model.template.digest)

    def holds(self, record: Any) -> bool:
        """``record`` (a ``CacheRecord``, ``CacheInfo``...) is a cache of this kind."""
        return (record.model_fingerprint == self.fingerprint and record.template_digest == self.template_digest
                and (self.kv_bits is None or getattr(record, "kv_bits", 16) == self.kv_bits))


def select_cache(records: Iterable[Any], kind: CacheKind | None, budget: Budget = AS_STORED) -> Any | None:
    """THE rule for which stored cache serves a question (routing, loading, composition, adapters' metadata): among
    the caches of ``kind`` (``None``: any model's) that serve ``budget`` (:meth:`Budget.served_by`), those of the
    budget's own level first; then, for a budget ratio, the smallest stored ratio that covers it (fewest bytes to
    read: a lower ratio loads from any higher one), for "as stored" (``ratio=None``) the largest stored ratio (the
    most kept); then the newest. ``None`` when no cache of that kind serves the budget."""
    usable = [c for c in records if (kind is None or kind.holds(c)) and budget.served_by(c.ratio, c.level)]
    if not usable:
        return None
    size = 1.0 if budget.ratio is not None else -1.0
    return min(usable, key=lambda c: (budget.level is not None and c.level != budget.level, size * c.ratio, -c.id))


def allocate_budgets(
    scores: list[list[torch.Tensor]], context_length: int, ratio: float, level: str
) -> torch.Tensor:
    """Kept counts, shape (layers, heads), for ``scores[layer][head]`` (descending per head).

    - ``pair``: global top-k over all layers and heads (non-uniform head budgets), k = ratio * entries.
    - ``uniform``: the top ratio * context_length entries of every head.
    - ``head``: whole heads, ranked by their (constant) head score, keep the top ratio * heads.
    """
    import torch

    check_ratio_level(ratio, level)
    num_layers, num_heads = len(scores), len(scores[0])
    available = torch.tensor([[len(s) for s in layer] for layer in scores], dtype=torch.int64)
    if level == "uniform":
        return available.clamp(max=round(ratio * context_length))
    if level == "head":
        head_scores = torch.tensor(
            [[float(s[0]) if len(s) else float("-inf") for s in layer] for layer in scores]
        ).flatten()
        keep_heads = max(1, round(ratio * num_layers * num_heads))
        order = torch.sort(head_scores, descending=True, stable=True).indices[:keep_heads]
        budgets = torch.zeros(num_layers * num_heads, dtype=torch.int64)
        budgets[order] = available.flatten()[order]
        return budgets.view(num_layers, num_heads)
    flat = torch.cat([s.float() for layer in scores for s in layer])
    head_ids = torch.repeat_interleave(torch.arange(num_layers * num_heads), available.flatten())
    keep = min(round(ratio * context_length * num_layers * num_heads), flat.numel())
    chosen = torch.sort(flat, descending=True, stable=True).indices[:keep]
    return torch.bincount(head_ids[chosen], minlength=num_layers * num_heads).view(num_layers, num_heads)
