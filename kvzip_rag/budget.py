"""How many context entries each (layer, kv head) keeps at a ratio, for the three KVzip eviction levels.

Inputs are per-head score lists sorted in descending order, as stored in a packed cache, so the same function
selects at compression time (all entries) and at load time from a cache stored at a higher ratio (a prefix of
each list). Ties are broken by (layer, head, rank) order, which a stable sort preserves on any such prefix: loading
at r' < r keeps exactly the entries compressing at r' would keep.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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


def check_ratio_level(ratio: float, level: str) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise InvalidArgumentError(f"ratio is the fraction of KV pairs kept and must be in (0, 1], got {ratio!r}")
    if level not in LEVELS:
        raise InvalidArgumentError(f"unknown level {level!r}; choose one of {', '.join(LEVELS)}")


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
