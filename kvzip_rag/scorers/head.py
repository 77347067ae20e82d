"""Head-level KVzip: whole kv heads ranked by a context-independent importance (no per-document scoring pass)."""

from __future__ import annotations

import torch

from ..prefill import PrefilledDocument
from .base import Scorer
from .head_calibration import head_scores


class HeadScorer(Scorer):
    """Every context entry of a (layer, kv head) gets that head's calibrated score (see ``calibration``), so the
    ``"head"`` level keeps or drops whole heads; the paper recommends ratio ~0.6 for it."""

    name = "kvzip-head"
    levels = ("head",)

    def score(self, document: PrefilledDocument) -> torch.Tensor:
        per_head = head_scores(document.model)
        return per_head[:, :, None].expand(-1, -1, document.context_length).contiguous()
