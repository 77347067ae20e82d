"""Scorers: one small class per way of ranking a document's KV pairs."""

from .base import Scorer
from .baselines import H2OScorer, KeyNormScorer, RandomScorer, SnapKVScorer
from .fast import KVzipFastScorer
from .head import HeadScorer
from .kvzip import KVzipScorer
from .structure import StructureAwareScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (KVzipScorer, HeadScorer, KVzipFastScorer, StructureAwareScorer, SnapKVScorer, H2OScorer, KeyNormScorer, RandomScorer)
}

__all__ = ["SCORERS", "H2OScorer", "HeadScorer", "KVzipScorer", "KeyNormScorer", "RandomScorer", "Scorer",
           "SnapKVScorer", "KVzipFastScorer", "StructureAwareScorer"]
