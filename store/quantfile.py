"""Quantized document caches (``kv_bits`` 8 or 4) inside a document blob: tensor names, row groups, header fields,
and reading back only the rows a ratio keeps.

Per layer ``l`` of the document's own entries (the shared template prefix is stored apart, unquantized), three
tensors, so a load makes as few range reads as an unquantized blob's ``k``/``v``::

    f.{l}   (rows, 2, head_dim) cache dtype: keys and values of each head's unquantized leading entries
            (the ``full_precision`` most important ones)
    q.{l}   (rows, bytes) uint8, one row per quantized entry: key codes | value codes | value scales | value mins
            (codes: 4 bits two per byte, 2 bits four; scales and mins: fp16 bytes)
    g.{l}   (groups, 2, head_dim) fp16: key scale and min of each group of ``key_group`` consecutive entries

Every tensor is row-grouped by head, so the blob's block checksums cover codes and scales alike and a lower ratio
reads the first rows of each head's group of every tensor (``kvzip_rag.quant`` keeps groups prefix-aligned).
``pos``/``score``/``off`` stay as in an unquantized blob.
"""

from __future__ import annotations

import json

import torch

from kvzip_rag.quant import KV_BITS, SCALE_DTYPE, QuantizedLayer, QuantSpec, code_width, group_counts, split_counts

from .blob import BlobReader

TENSORS = ("f", "q", "g")


def _offsets(counts: torch.Tensor) -> list[int]:
    return [0, *(int(x) for x in counts.cumsum(0).tolist())]


def _row_groups(layer_counts: torch.Tensor, full_rows: int, key_group: int) -> dict[str, list[int]]:
    full, quantized = split_counts(layer_counts, full_rows)
    return {"f": _offsets(full), "q": _offsets(quantized), "g": _offsets(group_counts(quantized, key_group))}


def _fp16_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def quantized_tensors(index: int, layer: QuantizedLayer) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The tensors and row groups of one quantized layer (its positions, scores and offsets excluded)."""
    rows = _row_groups(layer.counts, layer.full_rows, layer.spec.key_group)
    tensors = {
        f"f.{index}": torch.stack([layer.full_keys, layer.full_values], dim=1),
        f"q.{index}": torch.cat([layer.key_codes, layer.value_codes, _fp16_bytes(layer.value_scale),
                                 _fp16_bytes(layer.value_min)], dim=1),
        f"g.{index}": torch.stack([layer.key_scale, layer.key_min], dim=1),
    }
    return tensors, {name: rows[name.split(".")[0]] for name in tensors}


def quant_metadata(layers: list[QuantizedLayer]) -> dict[str, str]:
    spec = layers[0].spec
    return {
        "kv_bits": str(spec.bits), "key_bits": str(spec.key_bits), "value_bits": str(spec.value_bits),
        "key_group": str(spec.key_group), "value_group": str(spec.value_group),
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
    stated = (meta.get("key_bits", str(spec.key_bits)), meta.get("value_bits", str(spec.value_bits)))
    if stated != (str(spec.key_bits), str(spec.value_bits)):
        raise reader.fail(f"it states {stated[0]}-bit keys and {stated[1]}-bit values, which kv_bits {bits} is not")
    if len(full_rows) != num_layers or len(head_dims) != num_layers or min(full_rows + [0]) < 0:
        raise reader.fail("its quantization header does not match its layers")
    return spec, full_rows, head_dims


def layer_requests(
    reader: BlobReader, index: int, spec: QuantSpec, full_rows: int, offsets: torch.Tensor, keep: torch.Tensor
) -> list[tuple[str, list[int]]]:
    """The ``rows_many`` requests for the first ``keep[h]`` entries of every head of quantized layer ``index``:
    only the rows and key groups those entries need (the row groups are checked against the head offsets first)."""
    expected = _row_groups(offsets[1:] - offsets[:-1], full_rows, spec.key_group)
    for name in TENSORS:
        if reader.groups.get(f"{name}.{index}") != expected[name]:
            raise reader.fail(f"row groups of {name}.{index} do not match the head offsets")
    keep_full, keep_q = split_counts(keep, full_rows)
    return [(f"f.{index}", keep_full.tolist()), (f"q.{index}", keep_q.tolist()),
            (f"g.{index}", group_counts(keep_q, spec.key_group).tolist())]


def read_layer(
    reader: BlobReader, index: int, tensors: list[torch.Tensor], spec: QuantSpec, full_rows: int, head_dim: int,
    dtype: torch.dtype, keep: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor, base_length: int,
    compressed: bool, sliding_window: int | None,
) -> QuantizedLayer:
    """Quantized layer ``index`` from the tensors :func:`layer_requests` asked for (each block read was checked);
    the shapes and scales are checked too."""
    full, entries, groups = tensors
    width, value_width = code_width(spec.key_bits, head_dim), code_width(spec.value_bits, head_dim)
    codes = width + value_width
    value_groups = head_dim // spec.value_group_for(head_dim)
    if full.dim() != 3 or full.shape[1:] != (2, head_dim) or full.dtype != dtype \
            or entries.dim() != 2 or entries.shape[1] != codes + 4 * value_groups or entries.dtype != torch.uint8 \
            or groups.dim() != 3 or groups.shape[1:] != (2, head_dim) or groups.dtype != SCALE_DTYPE:
        raise reader.fail(f"quantized tensors of layer {index} do not match the header")
    fp16 = lambda a, z: entries[:, a:z].contiguous().view(SCALE_DTYPE)  # noqa: E731
    new_offsets = torch.zeros(len(keep) + 1, dtype=torch.int64)
    new_offsets[1:] = keep.cumsum(0)
    layer = QuantizedLayer(
        spec=spec, full_rows=full_rows, dtype=dtype, head_dim=head_dim, offsets=new_offsets,
        positions=positions, scores=scores, full_keys=full[:, 0], full_values=full[:, 1],
        key_codes=entries[:, :width], value_codes=entries[:, width:codes],
        value_scale=fp16(codes, codes + 2 * value_groups), value_min=fp16(codes + 2 * value_groups, None),
        key_scale=groups[:, 0], key_min=groups[:, 1],
        base_length=base_length, compressed=compressed, sliding_window=sliding_window,
    )
    try:
        layer.check()
    except ValueError as error:
        raise reader.fail(f"quantized layer {index}: {error}") from None
    return layer
