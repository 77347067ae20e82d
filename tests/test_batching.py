"""Batched decoding over different caches (kvzip_rag.batch) and the continuous-batching scheduler
(kvzip_rag.scheduler): each sequence gets its batch-1 logits and answers; no cross-talk between requests."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag import attention
from kvzip_rag.batch import batched_forward
from kvzip_rag.compose import compose
from kvzip_rag.generate import packed_forward
from kvzip_rag.quant import quantize

from conftest import build_tiny
from test_engine import ATOL, TEXT
from test_packed_attention import reference_flash_attn_varlen_func

OTHER = ("The Orlen valley railway opened in 1884 and climbs 900 metres in eleven kilometres. Its steepest part uses a "
         "rack, and the trains are pushed, never pulled, by small green locomotives built in Winterthur.")
QUESTIONS = ["Who built the harbour?", "When did the railway open?", "What colour is the lighthouse?"]
STEPS = kvzip_rag.PackedLayer.MIN_ROOM + 4  # past the first reserved room: every tail regrows mid-batch


def varied_caches(model: kvzip_rag.KVzipModel) -> list[kvzip_rag.PackedCache]:
    """Caches of different shapes: compressed (unequal head budgets), whole, composed of two, quantized."""
    compressed = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    whole = kvzip_rag.compress(model, OTHER, ratio=1.0)
    composed = compose(model, [kvzip_rag.compress(model, TEXT, ratio=0.5), kvzip_rag.compress(model, OTHER, ratio=0.5)])
    quantized = quantize(kvzip_rag.compress(model, OTHER, ratio=0.6), 8).dequantize()
    return [compressed, whole, composed, quantized]


def serial_logits(model, caches, prompts, steps: int) -> list[torch.Tensor]:
    """Reference: each cache alone, its prompt then ``steps`` greedy tokens, batch size 1."""
    out = []
    with torch.inference_mode():
        for cache, prompt in zip(caches, prompts):
            rows = [packed_forward(model, cache, prompt)]
            for _ in range(steps):
                rows.append(packed_forward(model, cache, [int(rows[-1].argmax())]))
            out.append(torch.stack(rows))
            cache.reset()
    return out


def batched_logits(model, caches, prompts, steps: int) -> list[torch.Tensor]:
    """Per-sequence prefill, then ``steps`` batched greedy steps over all the caches at once."""
    with torch.inference_mode():
        rows = [torch.stack([packed_forward(model, c, p) for c, p in zip(caches, prompts)])]
        for _ in range(steps):
            rows.append(batched_forward(model, caches, [int(r.argmax()) for r in rows[-1]]))
    for cache in caches:
        cache.reset()
    return list(torch.stack(rows, 1))


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_batched_decoding_gives_each_sequence_its_batch_one_logits(family, smol_tokenizer):
    model = build_tiny(family, smol_tokenizer, seed=5)
    caches = varied_caches(model)
    prompts = [model.encode(model.template.question_text(q)) for q in QUESTIONS + ["Why?"]]
    expected = serial_logits(model, caches, prompts, STEPS)
    got = batched_logits(model, caches, prompts, STEPS)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=ATOL), (g - e).abs().max()
    assert not torch.allclose(got[0], got[1], atol=ATOL)  # the sequences really differ


def test_flash_path_in_a_batch_matches_the_torch_path(smol_tokenizer, monkeypatch):
    """The CUDA code path (flash_attn_varlen_func over each cache's buffer in place) run on CPU with the reference
    kernel gives the batched torch path's logits; one kernel call per sequence and layer."""
    model = build_tiny("gemma3", smol_tokenizer, seed=2)
    caches = varied_caches(model)[:3]
    prompts = [model.encode(model.template.question_text(q)) for q in QUESTIONS]
    expected = batched_logits(model, caches, prompts, 6)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return reference_flash_attn_varlen_func(*args, **kwargs)

    monkeypatch.setattr(attention, "use_flash", lambda query: True)
    monkeypatch.setattr(attention, "_flash_varlen", lambda: spy)
    got = batched_logits(model, caches, prompts, 6)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=ATOL)
    assert len(calls) == 7 * len(caches) * len(caches[0].layers)


def test_a_batch_needs_one_token_per_cache(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    with pytest.raises(kvzip_rag.errors.InvalidArgumentError, match="one token per cache"):
        batched_forward(tiny_llama, [cache], [1, 2])
