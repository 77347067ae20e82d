"""Scorers: one small class per way of ranking a document's KV pairs."""

from .base import Scorer
from .baselines import H2OScorer, KeyNormScorer, RandomScorer, SnapKVScorer
from .fast import KVzipFastScorer
from .head import HeadScorer
from .kvzip import KVzipScorer
from .structure import StructureAwareScorer
from .value import ValueWeightedScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls
    for cls in (KVzipScorer, HeadScorer, KVzipFastScorer, StructureAwareScorer, ValueWeightedScorer, SnapKVScorer,
                H2OScorer, KeyNormScorer, RandomScorer)
}



def check_scorer(name: str) -> str:
    """``name`` when it names a scorer, else a one-line ``InvalidArgumentError`` listing them (caught at the
    interfaces that build stores, before any document is compressed)."""
    from ..errors import InvalidArgumentError

    if not isinstance(name, str) or name not in SCORERS:
        raise InvalidArgumentError(f"unknown scorer {name!r}; choose one of {', '.join(SCORERS)}")
    return name


__all__ = ["SCORERS", "check_scorer", "H2OScorer", "HeadScorer", "KVzipScorer", "KeyNormScorer", "RandomScorer", "Scorer",
           "SnapKVScorer", "KVzipFastScorer", "StructureAwareScorer", "ValueWeightedScorer"]
