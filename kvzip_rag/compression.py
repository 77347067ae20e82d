"""text -> tokens -> full cache (:mod:`.prefill`) -> scores -> packed cache."""

from __future__ import annotations

import torch

from .budget import DEFAULT_BUDGET, allocate_budgets, check_ratio_level
from .cache import CacheInfo, PackedCache, PackedLayer
from .models import KVzipModel
from .prefill import PrefilledDocument, Progress, prefill_document
from .quant import check_bits, quantize
from .scorers import SCORERS, KVzipScorer, Scorer, check_scorer


def resolve_scorer(scorer: str | Scorer, level: str | None = None) -> Scorer:
    """The scorer named (or given), as it scores at ``level`` (KVzip at ``"head"`` level: ``HeadScorer``)."""
    if not isinstance(scorer, Scorer):
        scorer = SCORERS[check_scorer(scorer)]()
    return scorer if level is None else scorer.for_level(level)


def compress(
    model: KVzipModel,
    text: str,
    ratio: float = DEFAULT_BUDGET.ratio,
    level: str = DEFAULT_BUDGET.level,
    scorer: str | Scorer = "kvzip",
    prefill_chunk: int = 2048,
    progress: Progress | None = None,
    kv_bits: int = 16,
) -> PackedCache:
    """Prefill ``text`` once, score its KV pairs, keep the top ``ratio`` of them and pack what is kept.

    ``level``: ``"pair"`` (global top-k, non-uniform head budgets), ``"uniform"`` (top-k per head) or ``"head"``
    (whole heads by a context-independent score, ``HeadScorer``: no per-document scoring pass).
    ``kv_bits``: 16 keeps the cache dtype; 8 or 4 quantize the kept entries, 3 stores 4-bit keys with 2-bit values,
    2 both at 2 bits (``kvzip_rag.quant``): the returned
    cache holds them dequantized, exactly as a store will load them, and its ``quantized`` is what gets stored.
    """
    check_ratio_level(ratio, level)
    check_bits(kv_bits)
    scorer = resolve_scorer(scorer, level)
    document = prefill_document(model, text, prefill_chunk, scorer, progress)
    if isinstance(scorer, KVzipScorer) and progress:
        scorer.progress = lambda done, total: progress("score", done, total)
    scores = scorer.score(document)
    cache = pack(document, scores, ratio, level, scorer.name)
    return cache if kv_bits == 16 else quantize(cache, kv_bits).dequantize()


def pack(document: PrefilledDocument, scores: torch.Tensor, ratio: float, level: str, scorer: str) -> PackedCache:
    """Keep each head's top entries (plus the whole prefix) in one flat array per layer, best first."""
    prefix, base = document.prefix_length, document.base_length
    order = torch.sort(scores, dim=-1, descending=True, stable=True)
    sorted_scores = order.values
    budgets = allocate_budgets(
        [list(layer) for layer in sorted_scores], document.context_length, ratio, level
    )
    rows = {layer: row for row, layer in enumerate(document.compressed_layers)}
    config = document.model.model.config.get_text_config(decoder=True)
    layer_types = getattr(config, "layer_types", None)
    layers, full_nbytes = [], 0
    for index, cache_layer in enumerate(document.cache.layers):
        keys, values = cache_layer.keys[0], cache_layer.values[0]  # (heads, length, dim)
        full_nbytes += keys.nbytes + values.nbytes
        heads = keys.shape[0]
        if index in rows:
            row = rows[index]
            entries = [
                torch.cat([torch.arange(prefix), prefix + order.indices[row, head, : budgets[row, head]]])
                for head in range(heads)
            ]
            entry_scores = [
                torch.cat([torch.full((prefix,), float("inf")), sorted_scores[row, head, : budgets[row, head]]])
                for head in range(heads)
            ]
            sliding = None
        else:  # sliding-window layer: keeps its window (the tokens transformers kept), never scored
            kept = keys.shape[1]
            entries = [torch.arange(base - kept, base)] * heads
            entry_scores = [torch.full((kept,), float("inf"))] * heads
            sliding = getattr(config, "sliding_window", None) if layer_types else None
        first = base - keys.shape[1]  # sliding layers hold only the last tokens
        device_entries = [(e - first).to(keys.device) for e in entries]
        offsets = torch.zeros(heads + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([len(e) for e in entries]).cumsum(0)
        layers.append(
            PackedLayer(
                keys=torch.cat([keys[h, idx] for h, idx in enumerate(device_entries)]),
                values=torch.cat([values[h, idx] for h, idx in enumerate(device_entries)]),
                offsets=offsets,
                positions=torch.cat(entries).to(torch.int32),
                scores=torch.cat(entry_scores).float(),
                base_length=base,
                compressed=index in rows,
                sliding_window=sliding,
            )
        )
    model = document.model
    info = CacheInfo(
        model_name=model.name,
        model_fingerprint=model.fingerprint,
        template_digest=model.template.digest,
        prefix_length=prefix,
        context_length=document.context_length,
        ratio=float(ratio),
        level=level,
        scorer=scorer,
        full_nbytes=full_nbytes,
        input_ids=tuple(document.prefix_ids + document.context_ids),
    )
    return PackedCache(layers, info)
