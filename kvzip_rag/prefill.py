"""text -> tokens -> the full cache of ``prefix + context``: the prefilled document every scorer ranks and
:func:`~kvzip_rag.compression.pack` packs (scorers and compression both build on this module, not on each other)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import DynamicCache

from .checks import check_index
from .errors import ContextTooLongError, EmptyDocumentError
from .models import KVzipModel

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def compressed_layer_indices(model: KVzipModel) -> list[int]:
    """Layers KVzip compresses: all of them, except sliding-window layers, which keep their window."""
    layer_types = getattr(model.config, "layer_types", None) or ["full_attention"] * model.config.num_hidden_layers
    return [i for i, kind in enumerate(layer_types) if kind != "sliding_attention"]


def tokenize_document(model: KVzipModel, text: str) -> tuple[list[int], list[int]]:
    """Prefix and context token ids, with the checks a user can act on."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyDocumentError("the document is empty or whitespace only; there is nothing to compress")
    prefix_ids = model.encode(model.template.prefix)
    context_ids = model.encode(text)
    limit = model.context_limit - len(prefix_ids)
    if len(context_ids) > limit:
        raise ContextTooLongError(
            f"the context has {len(context_ids)} tokens but model {model.name!r} takes at most {limit} context tokens "
            f"({model.max_positions} positions, minus the {len(prefix_ids)}-token prefix and room for answers); "
            "split the document (KVzipIndex and the CLI segment long documents automatically)"
        )
    return prefix_ids, context_ids


def prefill(
    model: KVzipModel, input_ids: list[int], chunk_size: int = 2048, observer=None, progress: Progress | None = None
) -> DynamicCache:
    """Chunked prefill into transformers' own DynamicCache, so long contexts never need the whole attention matrix.
    ``chunk_size``: a positive integer (checked: a zero or negative one would prefill nothing)."""
    check_index(chunk_size, "the prefill chunk size", 1)
    cache = DynamicCache(config=model.model.config)
    chunks = list(range(0, len(input_ids), chunk_size))
    with torch.inference_mode():
        for done, start in enumerate(chunks):
            model.forward(
                input_ids[start : start + chunk_size], cache, logits_to_keep=1, kvzip_observer=observer,
                kvzip_prefill=True,
            )
            if progress:
                progress("prefill", done + 1, len(chunks))
    return cache


@dataclass
class PrefilledDocument:
    """The full cache of ``prefix + context`` and where things are in it."""

    model: KVzipModel
    cache: DynamicCache
    prefix_ids: list[int]
    context_ids: list[int]
    compressed_layers: list[int]

    @property
    def prefix_length(self) -> int:
        return len(self.prefix_ids)

    @property
    def context_length(self) -> int:
        return len(self.context_ids)

    @property
    def base_length(self) -> int:
        return self.prefix_length + self.context_length

    @property
    def num_kv_heads(self) -> int:
        return self.model.config.num_key_value_heads

    def context_keys(self, layer: int) -> torch.Tensor:
        """Cached (post-RoPE) keys of the context tokens, shape (kv_heads, context, head_dim)."""
        return self.cache.layers[layer].keys[0, :, self.prefix_length : self.base_length]


class PrefillWatcher(Protocol):
    """What a scorer that watches the prefill provides (a :class:`~kvzip_rag.scorers.Scorer`)."""

    def prefill_observer(self, total_length: int, prefix_length: int, layers: list[int]): ...



def prefill_document(
    model: KVzipModel, text: str, chunk_size: int = 2048, scorer: PrefillWatcher | None = None,
    progress: Progress | None = None,
) -> PrefilledDocument:
    prefix_ids, context_ids = tokenize_document(model, text)
    layers = compressed_layer_indices(model)
    observer = None
    if scorer is not None:
        observer = scorer.prefill_observer(len(prefix_ids) + len(context_ids), len(prefix_ids), layers)
    cache = prefill(model, prefix_ids + context_ids, chunk_size, observer, progress)
    return PrefilledDocument(model, cache, prefix_ids, context_ids, layers)
