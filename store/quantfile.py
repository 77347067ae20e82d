"""Quantized document caches (``kv_bits`` 8 or 4) inside a document blob: tensor names, row groups, header fields,
and reading back only the rows a ratio keeps.

Per layer ``l`` of the document's own entries (the shared template prefix is stored apart, unquantized)::

    fk.{l}, fv.{l}   unquantized leading rows of each head (the ``full_precision`` most important entries)
    qk.{l}, qv.{l}   uint8 codes of the other entries (4 bits: two per byte)
    ks.{l}, km.{l}   fp16 key scale / min, one row per group of ``key_group`` consecutive entries of a head
    vs.{l}, vm.{l}   fp16 value scale / min, one row per quantized entry

Every tensor is row-grouped by head, so the blob's block checksums cover codes and scales alike and a lower ratio
reads the first rows of each head's group of every tensor (``kvzip_rag.quant`` keeps groups prefix-aligned).
``pos``/``score``/``off`` stay as in an unquantized blob.
"""

from __future__ import annotations

import json

import torch

from kvzip_rag.quant import KV_BITS, QuantizedLayer, QuantSpec, group_counts, split_counts

from .blob import BlobReader

TENSORS = ("fk", "fv", "qk", "qv", "ks", "km", "vs", "vm")


def _offsets(counts: torch.Tensor) -> list[int]:
    return [0, *(int(x) for x in counts.cumsum(0).tolist())]


def quantized_tensors(index: int, layer: QuantizedLayer) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The tensors and row groups of one quantized layer (its positions, scores and offsets excluded)."""
    full, quantized = layer.split()
    rows = {"f": _offsets(full), "q": _offsets(quantized), "g": _offsets(group_counts(quantized, layer.spec.key_group))}
    tensors = {
        f"fk.{index}": layer.full_keys, f"fv.{index}": layer.full_values,
        f"qk.{index}": layer.key_codes, f"qv.{index}": layer.value_codes,
        f"ks.{index}": layer.key_scale, f"km.{index}": layer.key_min,
        f"vs.{index}": layer.value_scale, f"vm.{index}": layer.value_min,
    }
    groups = {name: rows["f" if name[0] == "f" else "g" if name[0] == "k" else "q"] for name in tensors}
    return tensors, groups


def quant_metadata(layers: list[QuantizedLayer]) -> dict[str, str]:
    spec = layers[0].spec
    return {
        "kv_bits": str(spec.bits), "key_group": str(spec.key_group), "value_group": str(spec.value_group),
        "full_precision": str(spec.full_precision), "full_rows": json.dumps([layer.full_rows for layer in layers]),
        "head_dim": json.dumps([layer.head_dim for layer in layers]),
    }


def read_spec(reader: BlobReader, num_layers: int) -> tuple[QuantSpec, list[int], list[int]] | None:
    """(spec, full rows per layer, head_dim per layer) of a quantized blob; None for an unquantized one. A bit
    width this version does not know is refused with a message that says what to do."""
    meta = reader.metadata
    bits = meta.get("kv_bits", "16")
    if bits not in {str(b) for b in KV_BITS}:
        raise reader.fail(
            f"it stores {bits}-bit keys and values, which this kvzip-rag cannot read (it reads "
            f"{', '.join(map(str, KV_BITS))}); upgrade kvzip-rag or rebuild the cache"
        )
    if bits == "16":
        return None
    try:
        spec = QuantSpec(int(bits), int(meta["key_group"]), int(meta["value_group"]), int(meta["full_precision"]))
        full_rows = [int(x) for x in json.loads(meta["full_rows"])]
        head_dims = [int(x) for x in json.loads(meta["head_dim"])]
    except (KeyError, ValueError, TypeError) as error:
        raise reader.fail(f"incomplete quantization header ({type(error).__name__}: {error})") from None
    if len(full_rows) != num_layers or len(head_dims) != num_layers or min(full_rows + [0]) < 0:
        raise reader.fail("its quantization header does not match its layers")
    return spec, full_rows, head_dims


def read_layer(
    reader: BlobReader, index: int, spec: QuantSpec, full_rows: int, head_dim: int, dtype: torch.dtype,
    offsets: torch.Tensor, keep: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor, base_length: int,
    compressed: bool, sliding_window: int | None,
) -> QuantizedLayer:
    """The first ``keep[h]`` entries of every head of quantized layer ``index``. Only the rows and key groups those
    entries need are read; each block read is checked, and the shapes and scales too."""
    counts = offsets[1:] - offsets[:-1]
    full, quantized = split_counts(counts, full_rows)
    expected = {"f": _offsets(full), "q": _offsets(quantized), "g": _offsets(group_counts(quantized, spec.key_group))}
    for name in TENSORS:
        if reader.groups.get(f"{name}.{index}") != expected["f" if name[0] == "f" else "g" if name[0] == "k" else "q"]:
            raise reader.fail(f"row groups of {name}.{index} do not match the head offsets")
    keep_full, keep_q = split_counts(keep, full_rows)
    full_keep, q_keep = keep_full.tolist(), keep_q.tolist()
    group_keep = group_counts(keep_q, spec.key_group).tolist()
    new_offsets = torch.zeros_like(offsets)
    new_offsets[1:] = keep.cumsum(0)
    layer = QuantizedLayer(
        spec=spec, full_rows=full_rows, dtype=dtype, head_dim=head_dim, offsets=new_offsets,
        positions=positions, scores=scores,
        full_keys=reader.rows(f"fk.{index}", full_keep), full_values=reader.rows(f"fv.{index}", full_keep),
        key_codes=reader.rows(f"qk.{index}", q_keep), value_codes=reader.rows(f"qv.{index}", q_keep),
        key_scale=reader.rows(f"ks.{index}", group_keep), key_min=reader.rows(f"km.{index}", group_keep),
        value_scale=reader.rows(f"vs.{index}", q_keep), value_min=reader.rows(f"vm.{index}", q_keep),
        base_length=base_length, compressed=compressed, sliding_window=sliding_window,
    )
    if layer.full_keys.dtype != dtype:
        raise reader.fail(f"unquantized rows of layer {index} are not {dtype}")
    try:
        layer.check()
    except ValueError as error:
        raise reader.fail(f"quantized layer {index}: {error}") from None
    return layer
