"""One cache over several compressed documents: a question attends over all of them at once, nothing re-prefilled.

Every document of the same model was encoded after the same never-evicted prefix, so its packed cache is
``prefix + its kept entries``. ``compose`` keeps the prefix once and then, per layer and kv head, the kept context
entries of every document (best-first by score, like any packed head, so ``PackedCache`` code reads it unchanged).
The result is a plain ``PackedCache`` (a ``ComposedCache``) whose ``base_length`` is the next free position: the
question is placed there and the packed attention needs nothing new.

Layouts (``layout=``):

- ``parallel``: every document keeps the positions it was encoded at (all start right after the prefix); the
  question follows the longest one (APE-style parallel encoding). No key is touched.
- ``sequential``: documents are placed one after another; a document moved by ``d`` positions has its post-RoPE
  keys rotated by ``d`` (RoPE is a rotation, so a key encoded at ``p`` becomes exactly the key at ``p + d``). The
  rotation uses the model's own rotary module and ``apply_rotary_pos_emb``, so per-layer bases (Gemma 3's local and
  global RoPE) and Llama 3 frequency scaling stay exact. Only rope types whose angle is linear in the position and
  whose cos/sin carry no extra factor are accepted: ``default``, ``linear``, ``llama3`` (Llama 3, Qwen2, Mistral,
  Gemma 3). ``dynamic`` and ``longrope`` change with the sequence length, ``yarn`` and ``proportional`` scale the
  cos/sin, partial rotary embeddings rotate part of the head: those are refused with a message naming them.

Sliding-window layers (Gemma 3) hold only the last ``window - 1`` tokens of each document. Rule: in the
``sequential`` layout they hold the last ``window - 1`` positions of the composed sequence (taken from the
documents' own windows, re-rotated with the layer's local base: the same keys a query there would see if the pieces
were placed side by side); in the ``parallel`` layout they hold the window of the longest document (the one the
question follows) and the other documents are seen through the global layers only. Both keep the entries of a
sliding layer contiguous and ascending in position, which the index-based window of the CUDA kernel relies on.

Window: the composed positions plus ``reserve`` (question and answer) must fit the model's positions. Documents are
taken in the given order (best first); one that does not fit is dropped and listed in ``composition.dropped``
(``on_overflow="error"`` raises ``ContextTooLongError`` instead).

Repair (``repair=n``, sequential only): the first ``n`` context tokens of every document after the first are
recomputed on top of the documents placed before it (their ids are in ``CacheInfo.input_ids``), and their keys and
values replace the independently encoded ones wherever the cache kept them (CacheBlend/EPIC-style).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .cache import CacheInfo, PackedCache, PackedLayer
from .checks import as_list
from .errors import ContextTooLongError, InvalidArgumentError, KVzipError, ModelMismatchError
from .models import ANSWER_RESERVE, KVzipModel

LAYOUTS = ("parallel", "sequential")
EXACT_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ComposedPart:
    """Where one input cache sits in a composition."""

    source: int  # index of the cache in the list given to ``compose``
    start: int  # composed position of its first context token
    length: int  # its context positions
    shift: int  # positions its keys were moved by (0 in the parallel layout)


@dataclass(frozen=True)
class Composition:
    """How a composed cache was built: the layout, the documents used (in order) and those dropped."""

    layout: str
    parts: tuple[ComposedPart, ...]
    dropped: tuple[int, ...] = ()
    repaired_tokens: int = 0  # per document after the first

    @property
    def used(self) -> tuple[int, ...]:
        return tuple(part.source for part in self.parts)


class ComposedCache(PackedCache):
    """A packed cache over several documents; ``composition`` says which ones and where. ``sources[i]`` gives, for
    each entry of compressed layer ``i`` (``keys``/``positions`` indexing), the index of the input cache it came
    from (-1 for the shared prefix): in the parallel layout positions overlap, so only this tells documents apart."""

    def __init__(self, layers: list[PackedLayer], info: CacheInfo, composition: Composition,
                 sources: dict[int, torch.Tensor] | None = None):
        super().__init__(layers, info)
        self.composition = composition
        self.sources = sources or {}

    @property
    def kept_ratio(self) -> float:
        budgets = self.head_budgets()
        tokens = sum(part.length for part in self.composition.parts)
        return budgets.sum().item() / max(budgets.numel() * tokens, 1)

    def at_ratio(self, ratio: float, level: str | None = None) -> "PackedCache":
        raise InvalidArgumentError("cut each document's cache with at_ratio before composing, not the composition")


class KeyRotation:
    """Moves post-RoPE keys by a position offset with the model's own rotary module (refuses inexact variants)."""

    def __init__(self, model: KVzipModel):
        config = model.config
        decoder = model.model.get_decoder()
        self.rotary = getattr(decoder, "rotary_emb", None)
        self.apply = getattr(sys.modules[type(decoder).__module__], "apply_rotary_pos_emb", None)
        if self.rotary is None or self.apply is None:
            raise InvalidArgumentError(
                f"model {model.name!r} has no rotary position embedding the sequential layout can re-rotate; "
                "use layout='parallel'"
            )
        params = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
        self.per_layer_type = all(isinstance(v, dict) or v is None for v in params.values())
        types = sorted({(p or {}).get("rope_type", "default") for p in params.values()} if self.per_layer_type
                       else {params.get("rope_type", "default")})
        refused = [t for t in types if t not in EXACT_ROPE_TYPES]
        if refused:
            raise InvalidArgumentError(
                f"model {model.name!r} uses RoPE type(s) {refused}: re-rotating its keys by an offset is not exact "
                f"(only {', '.join(EXACT_ROPE_TYPES)} are: dynamic and longrope change with the sequence length, "
                "yarn and proportional scale cos/sin); use layout='parallel'"
            )
        partial = getattr(config, "partial_rotary_factor", 1.0)
        if partial not in (None, 1.0):
            raise InvalidArgumentError(
                f"model {model.name!r} uses a partial rotary embedding (partial_rotary_factor={partial}), which the "
                "sequential layout does not re-rotate; use layout='parallel'"
            )
        self.layer_types = getattr(config, "layer_types", None)

    def __call__(self, keys: torch.Tensor, shift: int, layer: int) -> torch.Tensor:
        """``keys`` (N, head_dim) encoded at positions p, as if encoded at p + ``shift``."""
        if shift == 0 or keys.shape[0] == 0:
            return keys
        x = keys.float()[None, None]
        position = torch.tensor([[shift]], device=keys.device)
        if self.per_layer_type:
            cos, sin = self.rotary(x, position, self.layer_types[layer])
        else:
            cos, sin = self.rotary(x, position)
        _, rotated = self.apply(x, x, cos, sin)
        return rotated[0, 0].to(keys.dtype)


def _check_inputs(model: KVzipModel, caches: Sequence[PackedCache], layout: str, on_overflow: str) -> None:
    if not caches:
        raise InvalidArgumentError("compose needs at least one cache; got an empty list")
    if layout not in LAYOUTS:
        raise InvalidArgumentError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if on_overflow not in ("drop", "error"):
        raise InvalidArgumentError("on_overflow must be 'drop' or 'error'")
    first = caches[0]
    for index, cache in enumerate(caches):
        if not isinstance(cache, PackedCache):
            raise InvalidArgumentError(f"item {index} is a {type(cache).__name__}, not a PackedCache")
        if cache.info.model_fingerprint != first.info.model_fingerprint:
            raise ModelMismatchError(
                f"cannot compose caches of different models: cache 0 was built by {first.info.model_name!r} "
                f"(fingerprint {first.info.model_fingerprint}), cache {index} by {cache.info.model_name!r} "
                f"(fingerprint {cache.info.model_fingerprint})"
            )
        cache.info.check_model(model, where=f"cache {index}")
        if cache.layers[0].keys.dtype != first.layers[0].keys.dtype:
            raise InvalidArgumentError(f"cache {index} holds {cache.layers[0].keys.dtype} keys, cache 0 "
                                       f"{first.layers[0].keys.dtype}: load the caches in one dtype")
        prefix = first.info.prefix_length
        if cache.info.input_ids[:prefix] != first.info.input_ids[:prefix]:
            raise ModelMismatchError(f"cache {index} was built after another prompt prefix than cache 0")


def _place(model: KVzipModel, caches: Sequence[PackedCache], layout: str, reserve: int, on_overflow: str):
    """(parts, dropped, next position): the documents that fit the window, in the given order."""
    prefix = caches[0].info.prefix_length
    limit = model.max_positions - reserve
    parts, dropped, end = [], [], prefix
    for index, cache in enumerate(caches):
        length = cache.info.base_length - prefix
        start = end if layout == "sequential" else prefix
        if start + length > limit:
            dropped.append(index)
            continue
        parts.append(ComposedPart(index, start, length, start - prefix))
        end = max(end, start + length)
    if dropped and (on_overflow == "error" or not parts):
        need = sum(c.info.base_length - prefix for c in caches) + prefix if layout == "sequential" else \
            max(c.info.base_length for c in caches)
        raise ContextTooLongError(
            f"the {len(caches)} documents need {need} positions in the {layout} layout, but model {model.name!r} "
            f"has {model.max_positions} positions and {reserve} are kept for the question and answer; compose fewer "
            "documents" + (" or use layout='parallel'" if layout == "sequential" else "")
        )
    return parts, dropped, end


def _head_ids(offsets: torch.Tensor, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entry index, head) of every entry of every head after its first ``skip`` entries."""
    counts = (offsets[1:] - offsets[:-1] - skip).clamp(min=0)
    heads = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.repeat_interleave(offsets[:-1] + skip, counts)
    within = torch.arange(int(counts.sum())) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return starts + within, heads


def _head_order(heads: torch.Tensor) -> torch.Tensor:
    """The entry order of a built layer: grouped by head, each head's entries in the given order."""
    return torch.sort(heads, stable=True).indices


def _build_layer(keys, values, positions, scores, heads, num_heads, next_position, like: PackedLayer) -> PackedLayer:
    """Group entries by head through the public constructor: each head's entries in the given order."""
    order = _head_order(heads)
    offsets = torch.zeros(num_heads + 1, dtype=torch.int64)
    offsets[1:] = torch.bincount(heads, minlength=num_heads).cumsum(0)
    dev = order.to(keys.device)
    return PackedLayer(keys[dev], values[dev], offsets, positions[order], scores[order], next_position,
                       like.compressed, like.sliding_window)


def _compose_scored(index: int, caches, parts, prefix: int, next_position: int,
                    rotate) -> tuple[PackedLayer, torch.Tensor]:
    """A compressed layer: the prefix once, then every document's kept entries, each head best-first; and the
    source (input cache index, -1 for the prefix) of each of its entries."""
    first = caches[parts[0].source].layers[index]
    entry, heads = _head_ids(first.offsets, 0)
    is_prefix = (entry - torch.repeat_interleave(first.offsets[:-1], first.counts)) < prefix
    keep = entry[is_prefix]
    pieces = [(first.keys[keep.to(first.keys.device)], first.values[keep.to(first.keys.device)],
               first.positions[keep], first.scores[keep], heads[is_prefix], torch.full((len(keep),), -1))]
    for part in parts:
        layer = caches[part.source].layers[index]
        entry, heads = _head_ids(layer.offsets, prefix)
        dev = entry.to(layer.keys.device)
        keys = rotate(layer.keys[dev], part.shift, index)
        pieces.append((keys, layer.values[dev], layer.positions[entry] + part.shift, layer.scores[entry], heads,
                       torch.full((len(entry),), part.source)))
    keys, values, positions, scores, heads, sources = (torch.cat(x) for x in zip(*pieces))
    best_first = torch.sort(scores, descending=True, stable=True).indices  # prefix (inf) first, then by score
    keys, values = keys[best_first.to(keys.device)], values[best_first.to(keys.device)]
    layer = _build_layer(keys, values, positions[best_first], scores[best_first], heads[best_first],
                         first.num_heads, next_position, first)
    return layer, sources[best_first][_head_order(heads[best_first])]


def _compose_window(index: int, caches, parts, layout: str, prefix: int, next_position: int, rotate) -> PackedLayer:
    """A sliding-window (uncompressed) layer, by the rule in the module docstring."""
    if layout == "parallel":
        longest = max(parts, key=lambda p: p.length)
        layer = caches[longest.source].layers[index]
        return PackedLayer(layer.keys, layer.values, layer.offsets, layer.positions, layer.scores, next_position,
                           layer.compressed, layer.sliding_window)
    first = caches[parts[0].source].layers[index]
    pieces = []
    for n, part in enumerate(parts):  # the first document brings the prefix entries its window holds
        layer = caches[part.source].layers[index]
        entry, heads = _head_ids(layer.offsets, 0)
        if n:
            own = layer.positions[entry] >= prefix
            entry, heads = entry[own], heads[own]
        dev = entry.to(layer.keys.device)
        pieces.append((rotate(layer.keys[dev], part.shift, index), layer.values[dev],
                       layer.positions[entry] + part.shift, layer.scores[entry], heads))
    keys, values, positions, scores, heads = (torch.cat(x) for x in zip(*pieces))
    window = first.sliding_window
    lowest = next_position - (window - 1) if window else 0
    visible = positions >= lowest
    keys, values = keys[visible.to(keys.device)], values[visible.to(keys.device)]
    positions, scores, heads = positions[visible], scores[visible], heads[visible]
    ascending = torch.sort(positions, stable=True).indices
    layer = _build_layer(keys[ascending.to(keys.device)], values[ascending.to(keys.device)], positions[ascending],
                         scores[ascending], heads[ascending], first.num_heads, next_position, first)
    expected = torch.arange(max(lowest, 0), next_position, dtype=layer.positions.dtype)
    for s in layer.head_slices(layer.counts):
        if not torch.equal(layer.positions[s], expected):
            raise KVzipError(f"layer {index}: the documents' windows do not cover the composed window")
    return layer


def _compose(model, caches, parts, layout: str, next_position: int, rotate, dropped=(), repaired=0) -> ComposedCache:
    prefix = caches[0].info.prefix_length
    template = caches[parts[0].source]
    layers, sources = [], {}
    for i, layer in enumerate(template.layers):
        if layer.compressed:
            built, sources[i] = _compose_scored(i, caches, parts, prefix, next_position, rotate)
            layers.append(built)
        else:
            layers.append(_compose_window(i, caches, parts, layout, prefix, next_position, rotate))
    used = [caches[p.source].info for p in parts]
    tokens = sum(p.length for p in parts)
    prefix_bytes = template.info.full_nbytes * prefix // max(template.info.base_length, 1)
    info = CacheInfo(
        model_name=template.info.model_name,
        model_fingerprint=template.info.model_fingerprint,
        template_digest=template.info.template_digest,
        prefix_length=prefix,
        context_length=next_position - prefix,
        ratio=sum(i.ratio * (i.base_length - prefix) for i in used) / max(tokens, 1),
        level=_common(i.level for i in used),
        scorer=_common(i.scorer for i in used),
        full_nbytes=sum(i.full_nbytes for i in used) - prefix_bytes * (len(used) - 1),
        # the documents' tokens in order (in the parallel layout their positions overlap)
        input_ids=template.info.input_ids[:prefix] + sum((i.input_ids[prefix:] for i in used), ()),
    )
    return ComposedCache(layers, info, Composition(layout, tuple(parts), tuple(dropped), repaired), sources)


def _unmoved(keys: torch.Tensor, shift: int, layer: int) -> torch.Tensor:
    return keys


def _common(values) -> str:
    values = set(values)
    return values.pop() if len(values) == 1 else "mixed"


def compose(
    model: KVzipModel,
    caches: Sequence[PackedCache],
    layout: str = "parallel",
    reserve: int = ANSWER_RESERVE,
    on_overflow: str = "drop",
    repair: int = 0,
) -> ComposedCache:
    """One cache over ``caches`` (best first) for ``model``; see the module docstring for layouts and rules.

    ``reserve``: positions kept free after the composition for the question and answer. ``repair``: context tokens
    recomputed at the start of every document after the first (sequential layout only).
    """
    what = "compose takes a list of packed caches"
    if isinstance(caches, PackedCache):  # a cache iterates over its layers
        raise InvalidArgumentError(f"{what}, got one PackedCache")
    caches = as_list(caches, what)
    _check_inputs(model, caches, layout, on_overflow)
    if repair < 0 or (repair and layout != "sequential"):
        raise InvalidArgumentError(
            "repair takes a token count >= 0 and applies to the sequential layout only (in the parallel layout every "
            "document's first tokens see exactly the prefix they were encoded after)"
        )
    rotate = KeyRotation(model) if layout == "sequential" else _unmoved
    parts, dropped, next_position = _place(model, caches, layout, reserve, on_overflow)
    caches = [c.to(model.device) if c.layers[0].keys.device != model.device else c for c in caches]
    composed = _compose(model, caches, parts, layout, next_position, rotate, dropped)
    if repair:
        _repair(model, composed, caches, parts, rotate, repair)
        composed.composition = Composition(layout, tuple(parts), tuple(dropped), repair)
    return composed


def _repair(model: KVzipModel, composed: ComposedCache, caches, parts, rotate, tokens: int) -> None:
    """Recompute the first ``tokens`` context tokens of every document after the first over the ones before it."""
    from .generate import packed_forward

    prefix = composed.info.prefix_length
    for n, part in enumerate(parts[1:], start=1):
        ids = list(caches[part.source].info.input_ids[prefix : prefix + min(tokens, part.length)])
        if len(ids) < min(tokens, part.length):
            raise InvalidArgumentError(f"cache {part.source} stores no token ids (CacheInfo.input_ids): cannot repair")
        before = _compose(model, caches, list(parts[:n]), "sequential", part.start, rotate)
        with torch.inference_mode():
            packed_forward(model, before, ids)
        for index, layer in enumerate(composed.layers):
            hit = ((layer.positions >= part.start) & (layer.positions < part.start + len(ids))).nonzero()[:, 0]
            if not len(hit):
                continue
            fresh_keys, fresh_values = before.layers[index].tail_states()  # (1, heads, len(ids), head_dim)
            heads = torch.bucketize(hit, layer.offsets[1:], right=True).to(fresh_keys.device)
            steps = (layer.positions[hit] - part.start).to(torch.int64).to(fresh_keys.device)
            keys, values = layer.keys.clone(), layer.values.clone()
            dev = hit.to(keys.device)
            keys[dev] = fresh_keys[0, heads, steps].to(keys.dtype)
            values[dev] = fresh_values[0, heads, steps].to(values.dtype)
            layer.keys, layer.values = keys, values
