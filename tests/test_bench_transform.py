"""The transform-coding measurement (kvzip_rag.bench.transform): bit allocation, quantizer, codec round trips and
the RoPE frame, against slow references."""

from __future__ import annotations

import itertools

import pytest
import torch

from kvzip_rag.bench.transform import (
    MAX_BITS,
    ComponentCodec,
    RopeFrame,
    TransformCodec,
    allocate,
    coded_rows,
    uniform_quantize,
)


def brute_force(distortion: torch.Tensor, total: int) -> float:
    """The least total distortion of any allocation of exactly ``total`` bits (each component <= MAX_BITS)."""
    best = float("inf")
    for bits in itertools.product(range(distortion.shape[1]), repeat=distortion.shape[0]):
        if sum(bits) == total:
            best = min(best, float(sum(distortion[j, b] for j, b in enumerate(bits))))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_allocation_matches_brute_force_on_convex_tables(seed):
    """Greedy reverse water-filling is optimal when each extra bit buys less than the one before."""
    g = torch.Generator().manual_seed(seed)
    variance = torch.rand(4, generator=g) * 10 + 0.01
    shrink = torch.rand(4, generator=g) * 0.3 + 0.1  # each bit keeps this fraction of the distortion
    distortion = variance[:, None] * shrink[:, None] ** torch.arange(4)[None].float()
    for total in range(0, 13):
        bits = allocate(distortion, total)
        assert int(bits.sum()) == total and int(bits.max()) <= 3
        assert float(distortion.gather(1, bits[:, None]).sum()) == pytest.approx(brute_force(distortion, total))


def test_allocation_gives_the_strong_component_more_bits():
    distortion = torch.tensor([[100.0 * 4.0**-b for b in range(MAX_BITS + 1)],
                               [1.0 * 4.0**-b for b in range(MAX_BITS + 1)]])
    assert allocate(distortion, 4).tolist() == [4, 0]


def test_uniform_quantizer_error_is_at_most_half_a_step_inside_the_clip():
    c = torch.linspace(-2.999, 2.999, 1001)[:, None].expand(-1, 3)
    bits = torch.tensor([1, 3, 0])
    clip = torch.tensor([3.0, 3.0, 3.0])
    out = uniform_quantize(c, bits, clip)
    step = 2 * clip / 2.0**bits
    assert bool(((out - c).abs()[:, :2] <= step[:2] / 2 + 1e-6).all())
    assert bool((out[:, 2] == 0).all())  # no bits: the mean
    assert len(out[:, 0].unique()) == 2 and len(out[:, 1].unique()) == 8


def reference_code(codec: ComponentCodec, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """The codec one row and one component at a time."""
    out = torch.empty_like(x)
    for i, row in enumerate(x):
        c = (row - codec.mean) @ codec.encode_matrix
        q = torch.zeros_like(c)
        for j in range(len(c)):
            b = int(bits[j])
            if b:
                step = 2 * float(codec.clip[j, b]) / 2**b
                level = min(max(int(torch.floor(c[j] / step + 2 ** (b - 1))), 0), 2**b - 1)
                q[j] = (level + 0.5 - 2 ** (b - 1)) * step
        out[i] = q @ codec.decode_matrix + codec.mean
    return out


def fitted(seed: int = 0, d: int = 8) -> tuple[ComponentCodec, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.logspace(0, -2, d)[None]
    x = torch.randn(600, d, generator=g) @ mix + torch.randn(d, generator=g)
    a = torch.randn(d, d, generator=g)
    return ComponentCodec.fit(x, a @ a.T + torch.eye(d)), x


def test_codec_matches_a_slow_reference():
    codec, x = fitted()
    bits = allocate(codec.distortion, 16)
    assert torch.allclose(codec.code(x[:40], bits), reference_code(codec, x[:40], bits), atol=1e-4)


def test_codec_round_trips_at_full_bits_and_decodes_to_the_mean_at_none():
    codec, x = fitted(1)
    assert torch.allclose(codec.encode_matrix @ codec.decode_matrix, torch.eye(8), atol=1e-4)
    full = codec.code(x, torch.full((8,), MAX_BITS))
    assert float((full - x).pow(2).mean().sqrt()) < 0.02 * float(x.std())  # clipped outliers aside
    none = codec.code(x, torch.zeros(8, dtype=torch.long))
    assert torch.allclose(none, codec.mean.expand_as(x), atol=1e-5)


def test_more_bits_never_measure_worse_on_the_calibration_rows():
    codec, x = fitted(2)
    errors = [float(((codec.code(x, allocate(codec.distortion, total)) - x) @ codec.encode_matrix).pow(2).mean())
              for total in (0, 8, 16, 32, 48)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 10


def test_rope_frame_undo_and_redo_are_inverse_and_match_the_model(tiny_llama):
    frame = RopeFrame(tiny_llama)
    head_dim = tiny_llama.config.hidden_size // tiny_llama.config.num_attention_heads
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(5, head_dim, generator=g)
    positions = torch.tensor([0, 3, 17, 100, 511])
    assert torch.allclose(frame.redo(frame.undo(keys, positions), positions), keys, atol=1e-5)
    assert torch.allclose(frame.undo(keys, torch.zeros(5, dtype=torch.long)), keys, atol=1e-6)
    # the same content at two positions: undoing each position gives the same pre-RoPE key
    at_zero = frame.undo(keys, torch.zeros(5, dtype=torch.long))
    assert torch.allclose(frame.undo(frame.redo(at_zero, positions), positions), at_zero, atol=1e-5)
    assert not torch.allclose(frame.redo(at_zero, positions), at_zero, atol=1e-3)


def test_transform_codec_on_a_cache(tiny_llama):
    """Applied to a cache of its calibration text: the prefix untouched, the coded rows close at 8 bits, further at
    1, and the code bytes as counted."""
    from kvzip_rag.bench.runner import PreparedDocument

    texts = ["The quick brown fox jumps over the lazy dog. " * 12, "A river runs through the old town square. " * 10]
    codec = TransformCodec(tiny_llama, texts)
    cache, _ = PreparedDocument(tiny_llama, texts[1]).base("full")
    fine, coarse = codec.apply(cache, MAX_BITS), codec.apply(cache, 1)
    prefix = cache.info.prefix_length
    rows = 0
    for index, head, span in coded_rows(cache):
        layer = cache.layers[index]
        start = int(layer.offsets[head])
        assert torch.equal(fine.layers[index].keys[start:start + prefix], layer.keys[start:start + prefix])
        for coded, tolerance in ((fine, 0.05), (coarse, None)):
            error = (coded.layers[index].values[span] - layer.values[span]).norm() / layer.values[span].norm()
            if tolerance is not None:
                assert float(error) < tolerance
        assert float((coarse.layers[index].keys[span] - layer.keys[span]).norm()) > float(
            (fine.layers[index].keys[span] - layer.keys[span]).norm())
        rows += span.stop - span.start
    head_dim = tiny_llama.config.hidden_size // tiny_llama.config.num_attention_heads
    assert codec.code_bytes(cache, 2) == rows * 2 * 2 * head_dim // 8
