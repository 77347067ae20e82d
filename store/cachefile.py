"""Compressed caches as blobs: which tensors a document cache and the shared template prefix are stored as, and
how a document cache is read back at its stored ratio or any lower one.

A document blob (``kind=document``) holds the document's own entries (:func:`kvzip_rag.cache.split_prefix`):
per layer ``k.{l}``/``v.{l}`` (rows grouped by head, best first); ``off`` (every layer's head offsets, one after
another: ``heads + 1`` each, ``layer_heads`` in the header), ``pos`` and ``score`` (every layer's entries, in the
order of the offsets) and ``input_ids``. The small tensors of all layers are joined because every load reads them
all, and one tensor costs one header entry and one digest instead of one per layer (at ratio 0.125 the per-layer
ones were 2% of a 4-bit blob); positions and input ids are unsigned 16-bit when they fit (documents and
vocabularies under 65,536), else int32. Format 3 and older blobs (``pos.{l}``/``score.{l}``/``off.{l}``, int32)
are read too. The template prefix is either ``shared`` (a ``kind=prefix`` blob stored once per model and
template, joined on load) or ``inline`` (``pk.{l}``/``pv.{l}`` in the same file: a standalone cache file).

Because every head's entries are best first, the cache at a lower ratio is the first rows of each head: the reader
reads the (small) scores, asks :func:`kvzip_rag.cache.rows_at_ratio` how many rows each head keeps, and reads only
those rows. The ratio/level policy (what a stored cache can be loaded as) is :func:`check_loadable`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from kvzip_rag.budget import Budget, ratio_covers
from kvzip_rag.cache import (
    CacheInfo,
    PackedCache,
    PackedLayer,
    PrefixKV,
    cache_info,
    info_fields,
    join_prefix,
    rows_at_ratio,
    split_prefix,
)
from kvzip_rag.errors import CorruptBlobError, InvalidArgumentError, ModelMismatchError
from kvzip_rag.quant import QuantizedCache, QuantizedLayer

from .backends import atomic_write
from .blob import BlobReader, EncodedBlob, ReadStats, encode_blob, local_reader
from .quantfile import TENSORS as QUANT_TENSORS
from .quantfile import layer_requests, quant_metadata, quantized_tensors, read_layer, read_spec

OLD_LAYOUT = ("kvzip-rag/2", "kvzip-rag/3")  # formats with per-layer pos/score/off tensors (int32 positions)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _versions() -> dict[str, str]:
    import transformers

    import kvzip_rag

    return {"torch": torch.__version__, "transformers": transformers.__version__, "kvzip_rag": kvzip_rag.__version__}


def _heads(offsets: torch.Tensor) -> list[int]:
    return [int(x) for x in offsets.tolist()]


def _compact(values: torch.Tensor) -> torch.Tensor:
    """Non-negative ints as unsigned 16-bit when all are below 65,536, else int32 (read back as int32)."""
    fits = not values.numel() or (int(values.min()) >= 0 and int(values.max()) < 1 << 16)
    return values.to(torch.uint16 if fits else torch.int32)


def _ints(values: torch.Tensor) -> torch.Tensor:
    """A stored int tensor (uint16 or int32) as int32."""
    return values.to(torch.int32)


def _prefix_tensors(prefix: PrefixKV) -> tuple[dict, dict]:
    tensors, groups = {}, {}
    heads = [k.shape[0] // max(prefix.prefix_length, 1) for k in prefix.keys]
    for layer, k, v, h in zip(prefix.layers, prefix.keys, prefix.values, heads):
        tensors[f"pk.{layer}"], tensors[f"pv.{layer}"] = k, v
        groups[f"pk.{layer}"] = groups[f"pv.{layer}"] = [i * prefix.prefix_length for i in range(h + 1)]
    return tensors, groups


# ------------------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class EncodedCache:
    blob: EncodedBlob
    kv_nbytes: int  # keys + values of the document's own entries (the prefix excluded when shared)
    prefix: PrefixKV  # the prefix split off (stored elsewhere when shared)

    @property
    def nbytes(self) -> int:
        """Size of the blob."""
        return len(self.blob.data)

    @property
    def sha256(self) -> str:
        return self.blob.sha256


def encode_document(cache: PackedCache, *, shared_prefix: bool, segment_sha256: str = "") -> EncodedCache:
    """A document cache's blob; ``shared_prefix=False`` makes a standalone file (prefix inline)."""
    dtypes = {layer.keys.dtype for layer in cache.layers}
    if len(dtypes) != 1:
        raise InvalidArgumentError(f"all layers of a cache must share one dtype to be stored, got {sorted(map(str, dtypes))}")
    prefix, body = split_prefix(cache)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[str, list[int]] = {}
    kv_nbytes = 0
    quantized = None
    if cache.quantized is not None:  # stored as quantized (kvzip_rag.quant), without the shared prefix rows
        quantized = [q.drop_prefix(cache.info.prefix_length) if q.compressed else q for q in cache.quantized.layers]
    for index, layer in enumerate(body):
        if quantized is None:
            tensors[f"k.{index}"], tensors[f"v.{index}"] = layer.keys, layer.values
            groups[f"k.{index}"] = groups[f"v.{index}"] = _heads(layer.offsets)
            kv_nbytes += layer.keys.nbytes + layer.values.nbytes
        else:
            extra, extra_groups = quantized_tensors(index, quantized[index])
            tensors.update(extra)
            groups.update(extra_groups)
            kv_nbytes += quantized[index].nbytes
    tensors["off"] = torch.cat([layer.offsets for layer in body]).to(torch.int32)
    tensors["pos"] = _compact(torch.cat([layer.positions for layer in body]))
    tensors["score"] = torch.cat([layer.scores.to(torch.float32) for layer in body])
    tensors["input_ids"] = _compact(torch.tensor(list(cache.info.input_ids), dtype=torch.int64))
    if not shared_prefix:
        extra, extra_groups = _prefix_tensors(prefix)
        tensors.update(extra)
        groups.update(extra_groups)
    metadata = {
        "kind": "document",
        **info_fields(cache.info),
        "prefix": "shared" if shared_prefix else "inline",
        "prefix_layers": json.dumps(list(prefix.layers)),
        "dtype": str(dtypes.pop()).removeprefix("torch."),
        "num_layers": str(len(body)),
        "compressed": json.dumps([bool(layer.compressed) for layer in body]),
        "layer_heads": json.dumps([len(layer.offsets) - 1 for layer in body]),
        "sliding_window": json.dumps([layer.sliding_window for layer in body]),
        "versions": json.dumps(_versions(), sort_keys=True),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "segment_sha256": segment_sha256,
        **(quant_metadata(quantized) if quantized is not None else {"kv_bits": "16"}),
    }
    return EncodedCache(encode_blob(tensors, metadata, groups), kv_nbytes, prefix)


def encode_prefix(prefix: PrefixKV, model_name: str) -> EncodedBlob:
    tensors, groups = _prefix_tensors(prefix)
    metadata = {
        "kind": "prefix", "model_name": model_name, "model_fingerprint": prefix.model_fingerprint,
        "template_digest": prefix.template_digest, "prefix_length": str(prefix.prefix_length),
        "prefix_layers": json.dumps(list(prefix.layers)),
        "versions": json.dumps(_versions(), sort_keys=True),
    }
    return encode_blob(tensors, metadata, groups)


# ------------------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class DocumentHeader:
    """What a document blob's header says (its ``info`` has no input ids: they are a tensor)."""

    info: CacheInfo
    prefix: str  # "shared" or "inline"
    prefix_layers: tuple[int, ...]
    dtype: str
    num_layers: int
    compressed: tuple[bool, ...]
    sliding_window: tuple[int | None, ...]
    versions: dict
    created: str
    segment_sha256: str
    payload_sha256: str
    header_nbytes: int
    metadata: dict
    quant: tuple | None = None  # (QuantSpec, full rows per layer, head_dim per layer) of a kv_bits 8/4 blob
    layer_heads: tuple[int, ...] | None = None  # heads per layer of a blob with joined small tensors (format 4)

    @property
    def kv_bits(self) -> int:
        return self.quant[0].bits if self.quant else 16


def document_header(reader: BlobReader) -> DocumentHeader:
    meta = reader.metadata
    if meta.get("kind") != "document":
        raise reader.fail(f"it holds a {meta.get('kind')!r}, not a document cache")
    try:
        header = DocumentHeader(
            info=cache_info(meta), prefix=meta["prefix"], prefix_layers=tuple(json.loads(meta["prefix_layers"])),
            dtype=meta["dtype"], num_layers=int(meta["num_layers"]),
            compressed=tuple(bool(x) for x in json.loads(meta["compressed"])),
            sliding_window=tuple(None if x is None else int(x) for x in json.loads(meta["sliding_window"])),
            versions=json.loads(meta["versions"]), created=meta.get("created", ""),
            segment_sha256=meta.get("segment_sha256", ""), payload_sha256=reader.payload_sha256,
            header_nbytes=reader.data_start, metadata=meta,
        )
    except (KeyError, ValueError, TypeError) as error:
        raise reader.fail(f"incomplete header ({type(error).__name__}: {error})") from None
    n = header.num_layers
    quant = read_spec(reader, n)
    header = replace(header, quant=quant, info=replace(header.info, kv_bits=quant[0].bits if quant else 16))
    kv = QUANT_TENSORS if quant else ("k", "v")
    expected = {"input_ids"} | {f"{p}.{i}" for i in range(n) for p in kv}
    if reader.format in OLD_LAYOUT:
        expected |= {f"{p}.{i}" for i in range(n) for p in ("pos", "score", "off")}
    else:
        try:
            heads = tuple(int(x) for x in json.loads(meta["layer_heads"]))
        except (KeyError, ValueError, TypeError) as error:
            raise reader.fail(f"incomplete header ({type(error).__name__}: {error})") from None
        if len(heads) != n or min(heads, default=1) < 1:
            raise reader.fail("its head counts do not match its layers")
        header = replace(header, layer_heads=heads)
        expected |= {"off", "pos", "score"}
    if header.prefix == "inline":
        expected |= {f"{p}.{i}" for i in header.prefix_layers for p in ("pk", "pv")}
    if set(reader.tensors) != expected or len(header.compressed) != n or len(header.sliding_window) != n \
            or header.prefix not in ("shared", "inline") \
            or list(header.prefix_layers) != [i for i in range(n) if header.compressed[i]]:
        raise reader.fail("its tensors do not match its header")
    if header.dtype not in _DTYPES:
        raise reader.fail(f"unknown dtype {header.dtype!r}")
    return header


def read_prefix(reader: BlobReader) -> PrefixKV:
    """The shared prefix stored in a ``kind=prefix`` blob (or inline in a standalone document blob)."""
    meta = reader.metadata
    try:
        layers = tuple(int(i) for i in json.loads(meta["prefix_layers"]))
        prefix = PrefixKV(meta["model_fingerprint"], meta["template_digest"], int(meta["prefix_length"]), layers,
                          tuple(reader.tensor(f"pk.{i}") for i in layers), tuple(reader.tensor(f"pv.{i}") for i in layers))
    except (KeyError, ValueError, TypeError) as error:
        raise reader.fail(f"incomplete prefix header ({type(error).__name__}: {error})") from None
    for k, v in zip(prefix.keys, prefix.values):
        if k.shape != v.shape or k.dim() != 2 or k.shape[0] % max(prefix.prefix_length, 1):
            raise reader.fail("prefix keys/values do not match the prefix length")
    return prefix


def check_loadable(stored: CacheInfo, ratio: float | None, level: str | None, where: str) -> tuple[float, str]:
    """The (ratio, level) a cache stored as ``stored`` loads at: any lower ratio of its own level; another level
    only from ratio 1.0 (and never to or from ``"head"``). ``InvalidArgumentError`` otherwise."""
    budget = Budget(stored.ratio if ratio is None else ratio, level or stored.level)
    ratio, level = budget.ratio, budget.level
    if not ratio_covers(stored.ratio, ratio):
        raise InvalidArgumentError(
            f"{where} is stored at ratio {stored.ratio}; it can load at any ratio up to that, not {ratio} "
            "(recompress the document at a higher ratio)"
        )
    if not budget.served_by(stored.ratio, stored.level):
        raise InvalidArgumentError(
            f"{where} is stored at level {stored.level!r}, ratio {stored.ratio}; another level can only be derived "
            "from a cache stored at ratio 1.0 (and never to or from 'head'): recompress instead"
        )
    return ratio, level


def read_document(
    reader: BlobReader, *, ratio: float | None = None, level: str | None = None, prefix: PrefixKV | None = None
) -> PackedCache:
    """The document cache in ``reader`` at ``ratio``/``level`` (default: as stored), reading only the rows kept.

    ``prefix`` is the shared prefix for a ``shared`` blob (ignored for ``inline`` ones)."""
    header = document_header(reader)
    stored = header.info
    ratio, level = check_loadable(stored, ratio, level, reader.where)
    base = stored.base_length
    input_ids = _ints(reader.tensor("input_ids"))
    if input_ids.numel() != base:
        raise reader.fail("input_ids do not match the prefix and context lengths")
    offsets, positions, scores = [], [], []
    for index, (off, pos, sc) in enumerate(_small_tensors(reader, header)):
        off = off.to(torch.int64)
        counts = off[1:] - off[:-1]
        if off.dim() != 1 or off.numel() < 2 or int(off[0]) != 0 or bool((counts < 0).any()) \
                or pos.numel() != int(off[-1]) or sc.numel() != int(off[-1]) or (not header.quant and (
                    _heads(off) != reader.groups.get(f"k.{index}") or _heads(off) != reader.groups.get(f"v.{index}"))):
            raise reader.fail(f"inconsistent head offsets in layer {index}")
        offsets.append(off)
        positions.append(pos)
        scores.append(sc)
    compressed = [i for i in range(header.num_layers) if header.compressed[i]]
    keep = {i: offsets[i][1:] - offsets[i][:-1] for i in range(header.num_layers)}
    if compressed and (ratio < stored.ratio or level != stored.level):
        budgets = rows_at_ratio([scores[i] for i in compressed], [offsets[i] for i in compressed],
                                stored.context_length, ratio, level)
        keep.update(zip(compressed, budgets))
    layers = []
    # keys and values (or codes and scales) of all layers in one round of requests (object stores)
    if header.quant:
        spec, full_rows, head_dims = header.quant
        requests = [r for i in range(header.num_layers)
                    for r in layer_requests(reader, i, spec, full_rows[i], offsets[i], keep[i])]
    else:
        requests = [(f"{kind}.{i}", keep[i].tolist()) for i in range(header.num_layers) for kind in ("k", "v")]
    read = iter(reader.rows_many(requests))
    for index in range(header.num_layers):
        counts = keep[index]
        if not torch.equal(counts, offsets[index][1:] - offsets[index][:-1]):
            rows = torch.cat([torch.arange(a, a + int(k)) for a, k in zip(offsets[index][:-1].tolist(), counts)])
            pos, sc = positions[index][rows], scores[index][rows]
        else:
            pos, sc = positions[index], scores[index]
        if header.quant:
            layers.append(read_layer(reader, index, [next(read) for _ in QUANT_TENSORS], spec, full_rows[index],
                                     head_dims[index], _DTYPES[header.dtype], counts, pos, sc, base,
                                     header.compressed[index], header.sliding_window[index]))
            continue
        keys, values = next(read), next(read)
        if keys.dtype != _DTYPES[header.dtype] or keys.shape != values.shape or keys.dim() != 2:
            raise reader.fail(f"keys/values of layer {index} do not match the header")
        new_offsets = torch.zeros_like(offsets[index])
        new_offsets[1:] = counts.cumsum(0)
        layers.append(PackedLayer(keys, values, new_offsets, pos, sc, base, header.compressed[index],
                                  header.sliding_window[index]))
    if header.prefix == "inline":
        prefix = read_prefix(reader)
    elif prefix is None:
        raise InvalidArgumentError(f"{reader.where} shares its template prefix: load it through its CacheStore")
    info = replace(header.info, ratio=ratio, level=level, input_ids=tuple(input_ids.tolist()))
    try:
        if header.quant:
            return _join_quantized(prefix, layers, info).dequantize()
        return join_prefix(prefix, layers, info)
    except ModelMismatchError as error:
        raise CorruptBlobError(f"{reader.where}: {error}") from None


def _small_tensors(reader: BlobReader, header: DocumentHeader) -> list[tuple[torch.Tensor, ...]]:
    """(offsets, positions as int32, scores) of every layer, read in one round of requests (object stores); from
    the joined tensors of format 4, split by ``layer_heads`` and each layer's last offset."""
    n = header.num_layers
    if header.layer_heads is None:
        small = reader.read_tensors([f"{kind}.{i}" for i in range(n) for kind in ("off", "pos", "score")])
        return [(small[3 * i], _ints(small[3 * i + 1]), small[3 * i + 2]) for i in range(n)]
    off, pos, sc = reader.read_tensors(["off", "pos", "score"])
    if off.dim() != 1 or off.numel() != sum(header.layer_heads) + n:
        raise reader.fail("its head offsets do not match its head counts")
    layer_offsets = off.to(torch.int64).split([h + 1 for h in header.layer_heads])
    entries = [int(o[-1]) for o in layer_offsets]
    if pos.numel() != sum(entries) or sc.numel() != sum(entries) or min(entries, default=0) < 0:
        raise reader.fail("its positions and scores do not match its head offsets")
    return list(zip(layer_offsets, _ints(pos).split(entries), sc.split(entries)))


def _join_quantized(prefix: PrefixKV, body: list[QuantizedLayer], info: CacheInfo) -> QuantizedCache:
    """The quantized cache with the (unquantized) template prefix back in front of every compressed layer."""
    if not prefix.matches(info) or list(prefix.layers) != [i for i, q in enumerate(body) if q.compressed]:
        raise ModelMismatchError("the template prefix does not belong to this document cache")
    covered = dict(zip(prefix.layers, zip(prefix.keys, prefix.values)))
    layers = [q.add_prefix(*covered[i], info.prefix_length) if i in covered else q for i, q in enumerate(body)]
    return QuantizedCache(layers, info)


# ------------------------------------------------------------------------------------------ standalone cache files


def write_cache(cache: PackedCache, path: str | os.PathLike) -> EncodedCache:
    """Write ``cache`` (its tail, if any, is not stored) as one standalone file, atomically."""
    encoded = encode_document(cache, shared_prefix=False)
    atomic_write(Path(path), encoded.blob.data)
    return encoded


def read_cache(
    path: str | os.PathLike, *, ratio: float | None = None, level: str | None = None, label: str | None = None,
    stats: ReadStats | None = None,
) -> PackedCache:
    """A standalone cache file at its stored ratio or any lower ``ratio`` (equal to ``at_ratio``; only the kept
    rows are read, see ``stats.nbytes``). Check the model yourself: ``cache.info.check_model(model)``."""
    with local_reader(path, label, stats) as reader:
        return read_document(reader, ratio=ratio, level=level)


def read_cache_header(path: str | os.PathLike, label: str | None = None) -> DocumentHeader:
    with local_reader(path, label) as reader:
        return document_header(reader)


def verify_cache(path: str | os.PathLike, label: str | None = None) -> DocumentHeader:
    """Check everything in a standalone cache file: header, payload sha256, every block and the structure."""
    with local_reader(path, label) as reader:
        reader.verify_payload()
        read_document(reader)
        return document_header(reader)
