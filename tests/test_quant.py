"""Quantized packed caches (kvzip_rag.quant): error bounds, logits after a round trip, lower-ratio prefixes."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.quant import (
    QuantizedLayer,
    QuantSpec,
    check_bits,
    dequantize_keys,
    dequantize_values,
    key_group_index,
    quantize,
    quantize_keys,
    quantize_values,
    spread_crumbs,
    spread_nibbles,
)

from test_engine import TEXT, packed_logits

LONG_TEXT = " ".join([TEXT] * 3)


def _rows(seed: int, rows: int, dim: int) -> torch.Tensor:
    """Gaussian rows with a few outlier channels (as real keys have), some constant runs and a huge offset."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=generator)
    x[:, 3] *= 40
    x[:, 7] += 100
    x[: rows // 4, 5] = 2.5  # constant inside a group: scale would be 0
    return x


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("key_group", [1, 5, 32])
def test_key_error_is_at_most_half_a_step_per_group(bits, key_group):
    counts = torch.tensor([37, 0, 64, 3])  # uneven heads, an empty one, partial last groups
    x = _rows(0, int(counts.sum()), 16)
    spec = QuantSpec(bits, key_group=key_group)
    codes, scale, minimum = quantize_keys(x, counts, spec)
    assert codes.dtype == torch.uint8 and codes.shape == (x.shape[0], 16 * spec.key_bits // 8)  # 3: 4-bit keys
    assert scale.dtype == torch.float16 and scale.shape[0] == sum(-(-int(c) // key_group) for c in counts)
    restored = dequantize_keys(codes, scale, minimum, counts, spec, 16)
    step = scale[key_group_index(counts, key_group)].float()
    error = (restored - x).abs()
    assert (error <= step / 2 + 1e-5 * x.abs()).all()
    assert error.max() > 0  # the test can fail: quantization did change something
    # groups never mix heads: each head's first group starts at its first row
    groups = key_group_index(counts, key_group)
    starts = torch.cumsum(counts, 0) - counts
    for head in range(len(counts)):
        if counts[head]:
            first = groups[starts[head]]
            assert head == 0 or first > groups[starts[head] - 1]


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
@pytest.mark.parametrize("value_group", [8, 16, 12])  # 12 does not divide 16: the whole head_dim is one group
def test_value_error_is_at_most_half_a_step_per_group(bits, value_group):
    x = _rows(1, 50, 16)
    spec = QuantSpec(bits, value_group=value_group)
    codes, scale, minimum = quantize_values(x, spec)
    group = value_group if 16 % value_group == 0 else 16
    assert scale.shape == (50, 16 // group)
    restored = dequantize_values(codes, scale, minimum, spec, 16)
    step = scale.float().repeat_interleave(group, dim=1)
    assert ((restored - x).abs() <= step / 2 + 1e-5 * x.abs()).all()


def test_grid_values_round_trip_exactly_through_the_nibble_packing():
    """Values already on the 4-bit grid come back bit-exact: packing and unpacking lose nothing."""
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (9, 8), generator=generator)
    codes[:, 0], codes[:, 1] = 0, 15  # every row spans the full range, so scale = 1 and min = 0
    x = codes.float()
    spec = QuantSpec(4, value_group=8)
    packed, scale, minimum = quantize_values(x, spec)
    assert packed.shape == (9, 4)
    assert torch.equal(dequantize_values(packed, scale, minimum, spec, 8), x)


def test_k4v2_packs_four_value_codes_per_byte_and_round_trips_grid_values():
    """kv_bits 3: 2-bit values (channel 4i+j in bits 2j..2j+1 of byte i), 4-bit keys; grid values come back exact."""
    spec = QuantSpec(3, value_group=8)
    assert (spec.key_bits, spec.value_bits) == (4, 2)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 3.0, 0.0, 0.0, 1.0]])
    packed, scale, minimum = quantize_values(x, spec)
    assert packed.tolist() == [[0b11100100, 0b01000011]]
    assert torch.equal(dequantize_values(packed, scale, minimum, spec, 8), x)
    keys = torch.arange(16.0).repeat(4, 1).T  # 16 rows, 4 channels: the 4-bit grid
    codes, k_scale, k_min = quantize_keys(keys, torch.tensor([16]), QuantSpec(3, key_group=16))
    assert codes.shape == (16, 2)
    assert torch.equal(dequantize_keys(codes, k_scale, k_min, [16], QuantSpec(3, key_group=16), 4), keys)


def test_unknown_bit_widths_are_refused_clearly(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    for bits in (1, 5, 32, 0, "4", 4.0, True, None):
        with pytest.raises(InvalidArgumentError, match="kv_bits must be one of 16, 8, 4, 3, 2"):
            check_bits(bits)
    with pytest.raises(InvalidArgumentError, match="kv_bits must be one of"):
        quantize(cache, 1)
    with pytest.raises(InvalidArgumentError, match="16 bits is the plain PackedCache"):
        quantize(cache, 16)
    with pytest.raises(InvalidArgumentError, match="key_group"):
        quantize(cache, 8, key_group=0)


def test_k4v2_quantizes_keys_in_groups_of_64_the_others_in_16(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    assert {bits: quantize(cache, bits).spec.key_group for bits in (8, 4, 3, 2)} == {8: 16, 4: 16, 3: 64, 2: 16}
    assert quantize(cache, 3, key_group=16).spec.key_group == 16
    assert quantize(cache, 3).nbytes < quantize(cache, 3, key_group=16).nbytes


def test_values_beyond_float16_are_refused(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    cache.layers[0].values[-1, 0] = -1e6  # the group minimum is below -65504
    with pytest.raises(InvalidArgumentError, match="float16 range"):
        quantize(cache, 8)


def _max_logit_error(model, cache, quantized, question):
    expected = packed_logits(model, cache, question)
    cache.rewind()
    return (packed_logits(model, quantized, question) - expected).abs().max().item()


def test_eight_bits_keep_next_token_logits(tiny_llama):
    """8 bits: next-token logits within 0.005 of the unquantized cache's (measured 6e-4; tiny float32 model, logits
    ~1); 4 bits move them more, so the check can fail."""
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.5)
    question = tiny_llama.encode(tiny_llama.template.question_text("Who built the harbour?"))
    eight = quantize(cache, 8, full_rows=0).dequantize()  # everything quantized, the prefix too
    four = quantize(cache, 4, full_rows=0).dequantize()
    error8 = _max_logit_error(tiny_llama, cache, eight, question)
    error4 = _max_logit_error(tiny_llama, cache, four, question)
    assert 0 < error8 < 0.005
    assert error4 > 4 * error8


def test_structure_and_full_precision_rows_survive(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.4)
    quantized = quantize(cache, 4, full_precision=3)
    restored = quantized.dequantize()
    assert restored.info.kv_bits == 4 and restored.quantized is quantized
    assert quantized.nbytes < cache.nbytes / 2  # tiny model: head_dim 16, the 42 full-precision rows weigh
    full_rows = cache.info.prefix_length + 3
    for before, after in zip(cache.layers, restored.layers):
        assert torch.equal(before.offsets, after.offsets)
        assert torch.equal(before.positions, after.positions) and torch.equal(before.scores, after.scores)
        assert after.keys.dtype == before.keys.dtype
        for start, count in zip(before.offsets[:-1].tolist(), before.counts.tolist()):
            keep = min(count, full_rows)
            assert torch.equal(before.keys[start : start + keep], after.keys[start : start + keep])
            assert torch.equal(before.values[start : start + keep], after.values[start : start + keep])
            if count > full_rows:
                rest = slice(start + keep, start + count)
                assert not torch.equal(before.keys[rest], after.keys[rest])


@pytest.mark.parametrize("level", ["pair", "uniform"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_lower_ratio_is_a_prefix_of_the_quantized_cache(bits, level, tiny_llama):
    """Truncating the quantized cache (what a partial blob read does) equals truncating the dequantized cache."""
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.8, level=level)
    quantized = quantize(cache, bits, key_group=4)
    for ratio in (0.6, 0.3, 0.05):
        low = quantized.at_ratio(ratio)
        assert low.nbytes < quantized.nbytes
        direct = low.dequantize()
        expected = quantized.dequantize().at_ratio(ratio)
        for a, b in zip(direct.layers, expected.layers):
            assert torch.equal(a.offsets, b.offsets) and torch.equal(a.positions, b.positions)
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_group_aligned_lower_ratio_equals_quantizing_the_lower_ratio_cache(tiny_llama):
    """When every head keeps whole key groups, loading lower equals quantizing the lower-ratio cache outright:
    a group's scales depend on its own entries only."""
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.8, level="uniform")
    n = cache.info.context_length
    keep = next(k for k in range(n // 3, 0, -1) if k % 4 == 0)
    ratio = keep / n
    derived = quantize(cache, 4, key_group=4).at_ratio(ratio).dequantize()
    direct = quantize(cache.at_ratio(ratio), 4, key_group=4).dequantize()
    for a, b in zip(derived.layers, direct.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # and with unaligned groups it differs: the statement above is not vacuous
    misaligned = quantize(cache.at_ratio((keep - 2) / n), 4, key_group=4).dequantize()
    derived = quantize(cache, 4, key_group=4).at_ratio((keep - 2) / n).dequantize()
    assert any(not torch.equal(a.keys, b.keys) for a, b in zip(derived.layers, misaligned.layers))


def test_packed_at_ratio_carries_the_quantized_form(tiny_llama):
    cache = quantize(kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.6), 8).dequantize()
    low = cache.at_ratio(0.2)
    assert low.quantized is not None and low.quantized.info.ratio == 0.2
    for a, b in zip(low.layers, low.quantized.dequantize().layers):
        assert torch.equal(a.keys, b.keys)


def test_check_catches_inconsistent_layers(tiny_llama):
    quantized = quantize(kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5), 4)
    layer = quantized.layers[0]
    layer.check()
    for name, bad in [
        ("key_scale", layer.key_scale[:-1]),
        ("value_codes", layer.value_codes[:, :-1]),
        ("value_min", torch.full_like(layer.value_min, float("nan"))),
        ("key_min", torch.where(torch.arange(layer.key_min.numel()).view_as(layer.key_min) == 3,
                                float("-inf"), layer.key_min)),
        ("key_scale", -layer.key_scale),
        ("key_scale", torch.where(torch.arange(layer.key_scale.numel()).view_as(layer.key_scale) == 5,
                                  float("inf"), layer.key_scale)),
        ("value_scale", torch.where(torch.arange(layer.value_scale.numel()).view_as(layer.value_scale) == 2,
                                    0.0, layer.value_scale)),
        ("value_scale", layer.value_scale.float()),
        ("key_codes", layer.key_codes.to(torch.int16)),
    ]:
        original = getattr(layer, name)
        setattr(layer, name, bad)
        with pytest.raises(ValueError):
            layer.check()
        setattr(layer, name, original)


def test_dropping_the_prefix_keeps_the_documents_own_entries(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.4)
    quantized = quantize(cache, 4)
    prefix = cache.info.prefix_length
    restored = quantized.dequantize()
    for layer, whole in zip(quantized.layers, restored.layers):
        body = layer.drop_prefix(prefix).dequantize()
        assert torch.equal(body.counts, whole.counts - prefix)
        bounds = zip(whole.offsets[:-1].tolist(), whole.offsets[1:].tolist())
        rows = torch.cat([torch.arange(a + prefix, z) for a, z in bounds])
        assert torch.equal(body.keys, whole.keys[rows]) and torch.equal(body.values, whole.values[rows])
        assert torch.equal(body.positions, whole.positions[rows])
    with pytest.raises(ValueError, match="not entirely unquantized"):
        quantize(cache, 4, full_rows=2).layers[0].drop_prefix(prefix)


def test_adding_the_prefix_back_restores_the_layer(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.4)
    quantized = quantize(cache, 8, full_precision=2)
    prefix = cache.info.prefix_length
    for layer in quantized.layers:
        full, _ = layer.split()
        rows = torch.cat([torch.arange(a, a + prefix) for a in torch.cumsum(full, 0).sub(full).tolist()])
        joined = layer.drop_prefix(prefix).add_prefix(layer.full_keys[rows], layer.full_values[rows], prefix)
        for name in ("offsets", "positions", "scores", "full_keys", "full_values", "key_codes", "key_scale"):
            assert torch.equal(getattr(joined, name), getattr(layer, name)), name
        assert joined.full_rows == layer.full_rows


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_layers_with_nothing_to_quantize(bits, tiny_llama):
    """A layer whose heads keep only the (unquantized) prefix: empty codes and scales, still a valid layer."""
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.5)
    keep = {i: torch.full((layer.num_heads,), cache.info.prefix_length) for i, layer in enumerate(cache.layers)}
    keep[1] = keep[1] + 5
    layers = [layer.truncated(keep[i]) for i, layer in enumerate(cache.layers)]
    bare = kvzip_rag.PackedCache(layers, cache.info)
    quantized = quantize(bare, bits)
    assert quantized.layers[0].key_codes.shape[0] == 0
    restored = quantized.dequantize()
    assert torch.equal(restored.layers[0].keys, bare.layers[0].keys)
    assert quantized.at_ratio(0.01).dequantize().layers[0].keys.shape == bare.layers[0].keys.shape


# --------------------------------------------------------------------------------------------- the fast dequantization


def _plain_dequantize(layer: QuantizedLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference for ``QuantizedLayer.dequantize``: nibbles unpacked with ``stack``, every quantized row
    given its own scale and min rows (Python loops over heads and rows), ``min + code * scale`` in float32 with one
    ``addcmul`` over the whole layer, cast to the cache dtype, rows placed one by one."""
    def unpack(codes, bits):
        per_byte = 8 // bits
        parts = torch.stack([(codes >> (bits * i)) & ((1 << bits) - 1) for i in range(per_byte)], dim=-1)
        return parts.reshape(codes.shape[0], -1)[:, : layer.head_dim].float()

    counts = layer.counts.tolist()
    full = [min(c, layer.full_rows) for c in counts]
    key_rows, value_rows, group, row = [], [], 0, 0
    value_group = layer.spec.value_group_for(layer.head_dim)
    for count, f in zip(counts, full):
        for j in range(count - f):
            key_rows.append(group + j // layer.spec.key_group)
            value_rows.append(row + j)
        group += -(-(count - f) // layer.spec.key_group)
        row += count - f
    k_scale, k_min = layer.key_scale.float()[key_rows], layer.key_min.float()[key_rows]
    v_scale = layer.value_scale.float()[value_rows].repeat_interleave(value_group, dim=1)
    v_min = layer.value_min.float()[value_rows].repeat_interleave(value_group, dim=1)
    k = torch.addcmul(k_min, unpack(layer.key_codes, layer.spec.key_bits), k_scale).to(layer.dtype)
    v = torch.addcmul(v_min, unpack(layer.value_codes, layer.spec.value_bits), v_scale).to(layer.dtype)
    keys = torch.empty(sum(counts), layer.head_dim, dtype=layer.dtype)
    values = torch.empty_like(keys)
    out_row, full_row, code_row = 0, 0, 0
    for count, f in zip(counts, full):
        for j in range(count):
            source = (layer.full_keys, layer.full_values, full_row) if j < f else (k, v, code_row)
            keys[out_row], values[out_row] = source[0][source[2]], source[1][source[2]]
            out_row += 1
            full_row, code_row = (full_row + 1, code_row) if j < f else (full_row, code_row + 1)
    return keys, values


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_fast_dequantization_equals_the_plain_reference_exactly(bits, dtype, tiny_llama):
    """Bit for bit (the same float32 ``min + code * scale``, then one rounding to the cache dtype), with uneven
    heads, partial key groups, unquantized leading rows and value groups smaller than the head."""
    cache = kvzip_rag.compress(tiny_llama, LONG_TEXT, ratio=0.4)
    for layer in cache.layers:
        layer._set_document(layer.keys.to(dtype), layer.values.to(dtype))
    for options in ({"full_precision": 3, "key_group": 5}, {"full_rows": 0, "value_group": 8}):
        for layer in quantize(cache, bits, **options).layers:
            keys, values = _plain_dequantize(layer)
            fast = layer.dequantize()
            assert fast.keys.dtype == dtype
            assert torch.equal(fast.keys, keys) and torch.equal(fast.values, values)


def test_nibbles_spread_for_either_byte_order():
    """Both byte orders' word layouts: on this machine the other order's words hold the nibbles swapped."""
    import sys

    codes = torch.tensor([[0x21, 0xF0, 0x0F]], dtype=torch.uint8)
    native = spread_nibbles(codes, sys.byteorder).view(torch.uint8)
    other = spread_nibbles(codes, "big" if sys.byteorder == "little" else "little").view(torch.uint8)
    assert native.tolist() == [[1, 2, 0, 15, 15, 0]]
    assert other.tolist() == [[2, 1, 15, 0, 0, 15]]


def test_crumbs_spread_for_either_byte_order():
    """Four 2-bit codes per byte, channel order in memory on this machine, reversed per word in the other order."""
    import sys

    codes = torch.tensor([[0b11100100, 0b00000011]], dtype=torch.uint8)
    native = spread_crumbs(codes, sys.byteorder).view(torch.uint8)
    other = spread_crumbs(codes, "big" if sys.byteorder == "little" else "little").view(torch.uint8)
    assert native.tolist() == [[0, 1, 2, 3, 3, 0, 0, 0]]
    assert other.tolist() == [[3, 2, 1, 0, 0, 0, 0, 3]]
