"""The packed, physically smaller KV cache: a real transformers ``Cache`` the model decodes from.

Per layer, the kept entries of all kv heads live in one flat ``(N, head_dim)`` array for keys and one for values,
head after head; ``offsets`` (``num_heads + 1``) delimit the heads. Inside a head, entries are ordered by
descending importance (the never-evicted prefix first), with their original positions and scores beside them, so
a prefix of each head's slice is exactly the cache at a lower ratio. Tokens appended later (questions, answers)
go to a dense per-head *tail* that ``reset()`` drops, bringing the cache back to the compressed document.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .budget import allocate_budgets
from .errors import ModelMismatchError


@dataclass(frozen=True)
class CacheInfo:
    """What a packed cache is: which model and template built it, over which tokens, kept how."""

    model_name: str
    model_fingerprint: str
    template_digest: str
    prefix_length: int
    context_length: int
    ratio: float
    level: str
    scorer: str
    full_nbytes: int
    input_ids: tuple[int, ...] = field(repr=False, default=())
    kv_bits: int = 16  # 8 or 4: the entries went through quantization (kvzip_rag.quant), 16: as computed

    @property
    def base_length(self) -> int:
        return self.prefix_length + self.context_length

    def check_model(self, model, where: str = "this cache") -> None:
        """Refuse a model other than the one (and the prompt template) that built the cache: its keys would be
        meaningless there. ``model`` is a KVzipModel."""
        if self.model_fingerprint != model.fingerprint:
            raise ModelMismatchError(
                f"{where} was built by model {self.model_name!r} (fingerprint {self.model_fingerprint}) but the "
                f"given model is {model.name!r} (fingerprint {model.fingerprint}); load that model or recompress "
                "the document"
            )
        if self.template_digest != model.template.digest:
            raise ModelMismatchError(
                f"{where} was built with another prompt template (digest {self.template_digest}, current "
                f"{model.template.digest}); recompress the document"
            )


class PackedLayer(CacheLayerMixin):
    """One layer of a packed cache (see the module docstring for the layout)."""

    is_sliding = False
    is_croppable = True

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        offsets: torch.Tensor,
        positions: torch.Tensor,
        scores: torch.Tensor,
        base_length: int,
        compressed: bool,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.keys, self.values = keys, values
        self.offsets = offsets.to(torch.int64).cpu()
        self.positions, self.scores = positions, scores
        self.base_length = base_length
        self.compressed = compressed
        self.sliding_window = sliding_window
        self.num_heads = len(self.offsets) - 1
        counts = self.counts
        self.equal_count = int(counts[0]) if bool((counts == counts[0]).all()) else None  # lets heads batch
        self.is_initialized = True
        self.tail_keys = keys.new_zeros(1, self.num_heads, 0, keys.shape[-1])
        self.tail_values = values.new_zeros(1, self.num_heads, 0, values.shape[-1])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: a packed layer is built complete."""

    @property
    def tail_length(self) -> int:
        return self.tail_keys.shape[2]

    @property
    def counts(self) -> torch.Tensor:
        """Entries per kv head (prefix included)."""
        return self.offsets[1:] - self.offsets[:-1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != 1:
            raise ValueError("the packed cache answers one sequence at a time (batch size 1)")
        self.tail_keys = torch.cat([self.tail_keys, key_states], dim=2)
        self.tail_values = torch.cat([self.tail_values, value_states], dim=2)
        return self.tail_keys, self.tail_values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built by transformers but unused by the packed attention; keep them tail-sized and cheap.
        return self.tail_length + query_length, self.base_length

    def get_seq_length(self) -> int:
        return self.base_length + self.tail_length

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tail tokens (the packed document itself is never cropped)."""
        keep = max(self.tail_length + tokens_to_remove, 0) if tokens_to_remove < 0 else tokens_to_remove
        self.tail_keys = self.tail_keys[:, :, :keep]
        self.tail_values = self.tail_values[:, :, :keep]

    def reset(self) -> None:
        self.crop(0)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def head_slices(self, keep: torch.Tensor) -> list[slice]:
        """Slices of the first ``keep[h]`` entries of every head."""
        starts = self.offsets[:-1].tolist()
        return [slice(s, s + int(k)) for s, k in zip(starts, keep.tolist())]

    def truncated(self, keep: torch.Tensor) -> "PackedLayer":
        """A new layer with only the first ``keep[h]`` entries of each head."""
        index = torch.cat([torch.arange(s.start, s.stop) for s in self.head_slices(keep)])
        offsets = torch.zeros(self.num_heads + 1, dtype=torch.int64)
        offsets[1:] = keep.cumsum(0)
        dev = self.keys.device
        return PackedLayer(
            self.keys[index.to(dev)], self.values[index.to(dev)], offsets, self.positions[index], self.scores[index],
            self.base_length, self.compressed, self.sliding_window,
        )


class PackedCache(Cache):
    """A compressed document cache. Pass it as ``past_key_values`` together with ``kvzip_cache=`` (see generate)."""

    def __init__(self, layers: list[PackedLayer], info: CacheInfo):
        super().__init__(layers=layers)
        self.info = info
        self.quantized = None  # the QuantizedCache these layers were dequantized from (what a store writes)

    @property
    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.compressed]

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed document's keys and values (without question/answer tails)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes the same document took in the uncompressed cache."""
        return self.info.full_nbytes

    def head_budgets(self) -> torch.Tensor:
        """Kept context entries per (compressed layer, kv head): the non-uniform budgets of pair-level eviction."""
        prefix = self.info.prefix_length
        return torch.stack([self.layers[i].counts - prefix for i in self.compressed_layers])

    @property
    def kept_ratio(self) -> float:
        """Fraction of the context's (layer, head, token) entries kept in the compressed layers."""
        budgets = self.head_budgets()
        return budgets.sum().item() / max(budgets.numel() * self.info.context_length, 1)

    def reset(self) -> None:
        """Forget appended questions and answers: back to the compressed document."""
        for layer in self.layers:
            layer.reset()

    @property
    def tail_length(self) -> int:
        return self.layers[0].tail_length

    def at_ratio(self, ratio: float, level: str | None = None) -> "PackedCache":
        """The cache this one would have been at a lower ``ratio``: top entries only, no re-scoring."""
        level = level or self.info.level
        keep = ratio_keep(self.layers, self.info, ratio, level)
        layers = [layer.truncated(keep[i]) if i in keep else layer for i, layer in enumerate(self.layers)]
        cache = PackedCache(layers, replace(self.info, ratio=ratio, level=level))
        if self.quantized is not None:
            cache.quantized = self.quantized.at_ratio(ratio, level)
        return cache

    def to(self, device: torch.device | str) -> "PackedCache":
        for layer in self.layers:
            layer.keys, layer.values = layer.keys.to(device), layer.values.to(device)
            layer.tail_keys, layer.tail_values = layer.tail_keys.to(device), layer.tail_values.to(device)
        return self


def ratio_keep(layers, info: CacheInfo, ratio: float, level: str) -> dict[int, torch.Tensor]:
    """Entries to keep per head (prefix included) of every compressed layer at ``ratio``: :func:`rows_at_ratio` on
    the stored scores, for packed and quantized layers alike (``layers`` have offsets, scores and compressed)."""
    prefix = info.prefix_length
    compressed = [i for i, layer in enumerate(layers) if layer.compressed]
    if not compressed:
        return {}
    scores, offsets = [], []
    for i in compressed:
        off = layers[i].offsets.tolist()
        rows = torch.cat([torch.arange(a + prefix, z) for a, z in zip(off[:-1], off[1:])])
        scores.append(layers[i].scores[rows])
        context_offsets = torch.zeros(len(off), dtype=torch.int64)
        context_offsets[1:] = (layers[i].counts - prefix).cumsum(0)
        offsets.append(context_offsets)
    budgets = rows_at_ratio(scores, offsets, info.context_length, ratio, level)
    return {i: budget + prefix for i, budget in zip(compressed, budgets)}


# ------------------------------------------------------------------------------------------------------------------
# Storage helpers (owned by the store work): the one CacheInfo constructor from stored fields, the shared template
# prefix split from / joined to a document's cache, and how many rows of each head a lower ratio keeps.

_INFO_TYPES = {
    "model_name": str, "model_fingerprint": str, "template_digest": str, "prefix_length": int,
    "context_length": int, "ratio": float, "level": str, "scorer": str, "full_nbytes": int,
}


def cache_info(fields, input_ids=()) -> CacheInfo:
    """The one way to rebuild a ``CacheInfo`` from stored fields (a blob header's strings, a row's columns, a
    dict): each field converted to its type, a missing one raising ``KeyError``, a malformed one ``ValueError``."""
    get = fields.get if isinstance(fields, dict) else (lambda name: getattr(fields, name))
    values = {}
    for name, kind in _INFO_TYPES.items():
        value = get(name)
        if value is None:
            raise KeyError(name)
        values[name] = kind(value)
    bits = fields.get("kv_bits") if isinstance(fields, dict) else getattr(fields, "kv_bits", None)
    return CacheInfo(**values, input_ids=tuple(int(i) for i in input_ids), kv_bits=int(bits) if bits else 16)


def info_fields(info: CacheInfo) -> dict[str, str]:
    """``info`` as strings (``input_ids`` left out), the inverse of :func:`cache_info`."""
    return {name: repr(float(getattr(info, name))) if kind is float else str(getattr(info, name))
            for name, kind in _INFO_TYPES.items()}


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of the template prefix in the compressed layers.

    Causal attention never lets the prefix see the document, so this is the same for every document of one model
    and template: the store keeps it once and joins it to each document's body on load. ``keys[i]``/``values[i]``
    belong to layer ``layers[i]``, ``(heads * prefix_length, head_dim)``, head after head, like ``PackedLayer``.
    Sliding-window layers are not covered: their window may or may not still hold the prefix, so they stay whole
    in the body.
    """

    model_fingerprint: str
    template_digest: str
    prefix_length: int
    layers: tuple[int, ...]
    keys: tuple[torch.Tensor, ...] = field(repr=False)
    values: tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def to(self, device: torch.device | str) -> "PrefixKV":
        return replace(self, keys=tuple(k.to(device) for k in self.keys), values=tuple(v.to(device) for v in self.values))

    def matches(self, info: CacheInfo) -> bool:
        return (self.model_fingerprint, self.template_digest, self.prefix_length) == (
            info.model_fingerprint, info.template_digest, info.prefix_length)


def _prefix_rows(layer: PackedLayer, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of every head's first ``prefix`` entries, and of the rest (the body)."""
    starts, counts = layer.offsets[:-1], layer.counts
    head_rows = [torch.arange(int(s), int(s) + int(c)) for s, c in zip(starts, counts)]
    return torch.cat([r[:prefix] for r in head_rows]), torch.cat([r[prefix:] for r in head_rows])


def _split_layer(layer: PackedLayer, prefix: int) -> tuple[torch.Tensor, torch.Tensor, PackedLayer]:
    if bool((layer.counts < prefix).any()):
        raise ValueError("a compressed layer keeps fewer entries than the prefix")
    head_rows, body_rows = _prefix_rows(layer, prefix)
    expected = torch.arange(prefix).repeat(layer.num_heads)
    if not torch.equal(layer.positions[head_rows].to(torch.int64), expected):
        raise ValueError("the first entries of a head are not the template prefix")
    dev = layer.keys.device
    offsets = torch.zeros_like(layer.offsets)
    offsets[1:] = (layer.counts - prefix).cumsum(0)
    body = PackedLayer(
        layer.keys[body_rows.to(dev)], layer.values[body_rows.to(dev)], offsets, layer.positions[body_rows],
        layer.scores[body_rows], layer.base_length, layer.compressed, layer.sliding_window,
    )
    return layer.keys[head_rows.to(dev)], layer.values[head_rows.to(dev)], body


def split_prefix(cache: "PackedCache") -> tuple[PrefixKV, list[PackedLayer]]:
    """The shared prefix and the document's own entries (compressed layers without their prefix rows, sliding
    layers whole). ``join_prefix`` puts them back together exactly."""
    info, keys, values, body, covered = cache.info, [], [], [], []
    for index, layer in enumerate(cache.layers):
        if not layer.compressed:
            body.append(layer)
            continue
        k, v, rest = _split_layer(layer, info.prefix_length)
        keys.append(k)
        values.append(v)
        body.append(rest)
        covered.append(index)
    prefix = PrefixKV(info.model_fingerprint, info.template_digest, info.prefix_length, tuple(covered),
                      tuple(keys), tuple(values))
    return prefix, body


def join_prefix(prefix: PrefixKV, body: list[PackedLayer], info: CacheInfo) -> "PackedCache":
    """A document's cache from the shared prefix and its body (the inverse of :func:`split_prefix`)."""
    if not prefix.matches(info):
        raise ModelMismatchError(
            f"the shared prefix was built by model fingerprint {prefix.model_fingerprint}, template "
            f"{prefix.template_digest}, {prefix.prefix_length} tokens; the document cache by "
            f"{info.model_fingerprint}, {info.template_digest}, {info.prefix_length} tokens"
        )
    covered = dict(zip(prefix.layers, zip(prefix.keys, prefix.values)))
    if sorted(covered) != [i for i, layer in enumerate(body) if layer.compressed]:
        raise ModelMismatchError("the shared prefix does not cover the document cache's compressed layers")
    p, layers = info.prefix_length, []
    for index, layer in enumerate(body):
        if index not in covered:
            layers.append(layer)
            continue
        pk, pv = covered[index]
        ks, vs, pos, sc = [], [], [], []
        head_pos = torch.arange(p, dtype=layer.positions.dtype)
        head_scores = torch.full((p,), float("inf"), dtype=layer.scores.dtype)
        for h, (a, z) in enumerate(zip(layer.offsets[:-1].tolist(), layer.offsets[1:].tolist())):
            ks += [pk[h * p : (h + 1) * p], layer.keys[a:z]]
            vs += [pv[h * p : (h + 1) * p], layer.values[a:z]]
            pos += [head_pos, layer.positions[a:z]]
            sc += [head_scores, layer.scores[a:z]]
        offsets = layer.offsets.clone()
        offsets[1:] += p * torch.arange(1, layer.num_heads + 1)
        layers.append(PackedLayer(torch.cat(ks), torch.cat(vs), offsets, torch.cat(pos), torch.cat(sc),
                                  layer.base_length, True, layer.sliding_window))
    return PackedCache(layers, info)


def rows_at_ratio(
    scores: list[torch.Tensor], offsets: list[torch.Tensor], context_length: int, ratio: float, level: str
) -> list[torch.Tensor]:
    """How many context rows of each head the compressed layers keep at ``ratio``/``level``, given each layer's
    context-only (prefix removed) ``scores`` and head ``offsets``, best first per head: what ``at_ratio`` keeps."""
    per_head = [[s[a:z] for a, z in zip(o[:-1].tolist(), o[1:].tolist())] for s, o in zip(scores, offsets)]
    budgets = allocate_budgets(per_head, context_length, ratio, level)
    return list(budgets.unbind(0))


def packed_fresh(cache: "PackedCache") -> "PackedCache":
    """A new cache sharing the (never mutated) packed tensors, with its own empty tails."""
    layers = [PackedLayer(x.keys, x.values, x.offsets, x.positions, x.scores, x.base_length, x.compressed,
                          x.sliding_window) for x in cache.layers]
    return PackedCache(layers, cache.info)
