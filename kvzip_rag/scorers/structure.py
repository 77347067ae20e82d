"""kvzip-structure: KVzip with the scores of structure tokens (punctuation, whitespace, special/template tokens)
demoted before the top-k, so the budget goes to content (issue #25: reconstruction scoring spends about half of a
small budget on such tokens)."""

from __future__ import annotations

import unicodedata

import torch

from ..errors import InvalidArgumentError
from ..prefill import PrefilledDocument
from .kvzip import ReweightedKVzipScorer

DEFAULT_FACTOR = 0.5  # what structure tokens' scores are multiplied by (1.0: plain KVzip)


def is_structure(text: str) -> bool:
    """True for a token that decodes to nothing but whitespace, punctuation and symbols (or to nothing at all)."""
    return all(ch.isspace() or unicodedata.category(ch)[0] in "PSZC" for ch in text)


def structure_mask(tokenizer, ids: list[int]) -> torch.Tensor:
    """Bool per id: a structure token (decided once per distinct id from its decoded string; special tokens,
    such as chat-template markers repeated inside a document, count as structure)."""
    special = set(getattr(tokenizer, "all_special_ids", ()) or ())
    verdict = {i: i in special or is_structure(tokenizer.decode([i])) for i in set(ids)}
    return torch.tensor([verdict[i] for i in ids], dtype=torch.bool)


class StructureAwareScorer(ReweightedKVzipScorer):
    """KVzip's reconstruction scores, with structure tokens' scores multiplied by ``factor`` (in [0, 1])."""

    name = "kvzip-structure"

    def __init__(self, factor: float = DEFAULT_FACTOR, **kvzip_options):
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor <= 1.0:
            raise InvalidArgumentError(f"the structure factor must be a number in [0, 1], got {factor!r}")
        super().__init__(**kvzip_options)
        self.factor = float(factor)

    def weights(self, document: PrefilledDocument) -> torch.Tensor:
        return torch.where(structure_mask(document.model.tokenizer, document.context_ids), self.factor, 1.0)
