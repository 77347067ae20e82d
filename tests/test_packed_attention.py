"""The packed layout that grows in place, and both attention paths over it: the CPU path against the masked full
cache, the CUDA path's varlen arguments against a plain reference of ``flash_attn_varlen_func`` (on CPU), the real
flash-attn kernel where CUDA is present, and the trap of a packed cache read by another attention."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag import attention
from kvzip_rag.errors import PackedAttentionRequiredError

from conftest import build_tiny
from test_engine import ATOL, TEXT, masked_reference_logits, packed_logits


def reference_flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
    causal=False, window_size=(-1, -1), **unused,
):
    """flash_attn_varlen_func's documented semantics in plain PyTorch: sequence b is rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` of q and of k/v; the causal mask and the window are aligned to the
    bottom-right corner (query i of Lq sees key j of Lk iff j <= i + Lk - Lq, and j >= i + Lk - Lq - left);
    query heads share kv heads in groups (GQA); a query that sees no key outputs zeros."""
    assert dropout_p == 0.0 and not unused.get("softcap")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    left, right = window_size
    for b in range(len(cu_seqlens_q) - 1):
        qa, qb = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ka, kb = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        lq, lk = qb - qa, kb - ka
        assert lq <= max_seqlen_q and lk <= max_seqlen_k
        if lq == 0:
            continue
        i = torch.arange(lq)[:, None] + lk - lq
        j = torch.arange(lk)[None, :]
        visible = torch.ones(lq, lk, dtype=torch.bool)
        if causal:
            visible &= j <= i
        if right >= 0:
            visible &= j <= i + right
        if left >= 0:
            visible &= j >= i - left
        keys = k[ka:kb].repeat_interleave(group, dim=1).transpose(0, 1).float()  # (heads, lk, d)
        values = v[ka:kb].repeat_interleave(group, dim=1).transpose(0, 1).float()
        logits = (q[qa:qb].transpose(0, 1).float() @ keys.transpose(1, 2)) * scale
        weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out[qa:qb] = (weights @ values).transpose(0, 1).to(q.dtype)
    return out


def test_reference_flash_semantics():
    """The reference itself: equal lengths match SDPA's causal attention; with more keys than queries the causal
    mask is bottom-right aligned (the last query sees every key); a window of w sees the last w keys."""
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    cu = torch.tensor([0, 5])
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True
    ).transpose(0, 1)
    assert torch.allclose(reference_flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True), expected, atol=1e-6)
    q1 = torch.randn(1, 2, 8)
    full = torch.nn.functional.scaled_dot_product_attention(q1.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))
    out = reference_flash_attn_varlen_func(q1, k, v, torch.tensor([0, 1]), cu, 1, 5, causal=True)
    assert torch.allclose(out, full.transpose(0, 1), atol=1e-6)
    windowed = reference_flash_attn_varlen_func(q1, k, v, torch.tensor([0, 1]), cu, 1, 5, causal=True,
                                                window_size=(1, 0))
    last_two = torch.nn.functional.scaled_dot_product_attention(
        q1.transpose(0, 1), k[3:].transpose(0, 1), v[3:].transpose(0, 1))
    assert torch.allclose(windowed, last_two.transpose(0, 1), atol=1e-6)


def decode_logits(model: kvzip_rag.KVzipModel, cache: kvzip_rag.PackedCache, ids: list[int], steps: int):
    """The question in one pass, then ``steps`` tokens one at a time (greedy): every step's logits."""
    out = [packed_logits(model, cache, ids)[-1]]
    for _ in range(steps):
        out.append(packed_logits(model, cache, [int(out[-1].argmax())])[-1])
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_cuda_path_arguments_match_torch_path(family, smol_tokenizer, monkeypatch):
    """The CUDA code path (one varlen call over the buffer in place, empty-query sequences over reserved rows) run
    on CPU with the reference kernel swapped in gives the torch path's logits, through tail regrowths."""
    model = build_tiny(family, smol_tokenizer, seed=3)
    cache = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    assert len(set(cache.layers[-1].counts.tolist())) > 1  # pair level: unequal head budgets
    question = model.encode(model.template.question_text("Who built the harbour?"))
    steps = kvzip_rag.PackedLayer.MIN_ROOM + 8  # past the first reserved room: one regrowth mid-decoding
    expected = decode_logits(model, cache, question, steps)
    cache.rewind()
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[3:5])
        return reference_flash_attn_varlen_func(*args, **kwargs)

    monkeypatch.setattr(attention, "use_flash", lambda query: True)
    monkeypatch.setattr(attention, "_flash_varlen", lambda: spy)
    got = decode_logits(model, cache, question, steps)
    assert torch.allclose(got, expected, atol=ATOL)
    assert len(calls) == (steps + 1) * len(cache.layers)  # one kernel call per layer and step
    cu_q, cu_k = calls[-1]
    assert len(cu_k) == 2 * cache.layers[0].num_heads and (cu_q[1::2] - cu_q[::2] == 1).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none here)")
def test_real_flash_attn_matches_torch_path(smol_tokenizer):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed (pip install 'kvzip-rag[cuda]')")
    model = build_tiny("llama", smol_tokenizer, seed=3)
    model.model.to("cuda", torch.bfloat16)
    cache = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    question = model.encode(model.template.question_text("Who built the harbour?"))
    layer, query = cache.layers[0], None
    with torch.inference_mode():
        packed_logits(model, cache, question)
        query = torch.randn(1, model.config.num_attention_heads, 1, layer.buffer_keys.shape[-1], device="cuda",
                            dtype=torch.bfloat16)
        flash = attention.flash_packed_attention(query, layer, 0.125)
        reference = attention.torch_packed_attention(query, layer, 0.125)
    assert torch.allclose(flash.float(), reference.float(), atol=2e-2)


def test_decoding_grows_in_place_and_reset_keeps_the_buffer(smol_tokenizer):
    """Appends within the reserved room write into the same buffer (no per-token copy of the cache); a regrowth
    is geometric; reset forgets the tail without reallocating; token by token equals the masked full cache."""
    model = build_tiny("qwen3", smol_tokenizer, seed=4)
    cache = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    layer = cache.layers[0]
    document_keys, nbytes = layer.keys.clone(), cache.nbytes
    question = model.encode(model.template.question_text("Who built the harbour?"))
    packed_logits(model, cache, question)
    buffer, room = layer.buffer_keys.data_ptr(), layer.room
    generated = []
    steps = [packed_logits(model, cache, question[-1:])[-1]]  # then one token at a time (the decoding mask)
    for _ in range(room - len(question) - 1):
        generated.append(int(steps[-1].argmax()))
        steps.append(packed_logits(model, cache, generated[-1:])[-1])
    assert layer.buffer_keys.data_ptr() == buffer and layer.tail_length == room
    expected = masked_reference_logits(model, cache, question + question[-1:] + generated)  # same tokens
    assert torch.allclose(torch.stack(steps), expected[len(question) :], atol=ATOL)
    cache.rewind()
    assert layer.tail_length == 0 and layer.buffer_keys.data_ptr() == buffer
    again = packed_logits(model, cache, question + question[-1:] + generated)
    assert torch.allclose(again, expected, atol=ATOL)
    packed_logits(model, cache, [generated[0]])  # past the room: regrowth to twice the room
    assert layer.room == 2 * room and layer.buffer_keys.data_ptr() != buffer
    assert torch.equal(layer.keys, document_keys) and cache.nbytes == nbytes  # the document is untouched
    tail_keys, _ = layer.tail_states()
    assert tail_keys.shape[2] == layer.tail_length


def test_a_regrowth_keeps_the_tail_and_the_row_meta_matches_a_plain_reference(smol_tokenizer):
    """After a regrowth (head by head slice copies) every head's entries and tail are where the layout says, and the
    decoding mask built head by head equals one built row by row from its definition."""
    from kvzip_rag.cache import NO_POSITION

    model = build_tiny("llama", smol_tokenizer, seed=6)  # 4 query heads over 2 kv heads
    cache = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    packed_logits(model, cache, model.encode(model.template.question_text("Who built the harbour?")))
    before = [layer.tail_states() for layer in cache.layers]
    cache.reserve(cache.layers[0].room + 5)  # past the room: every layer regrows
    query_heads = model.config.num_attention_heads
    for layer, (keys, values) in zip(cache.layers, before):
        after_keys, after_values = layer.tail_states()
        assert torch.equal(after_keys, keys) and torch.equal(after_values, values)
        meta = layer.row_meta(query_heads)
        group = query_heads // layer.num_heads
        heads, positions, bias = [], [], torch.full((query_heads, len(layer.buffer_keys)), float("-inf"))
        for h in range(layer.num_heads):
            first, count = int(layer.offsets[h]), int(layer.counts[h])
            for i in range(count + layer.room):
                row = len(heads)
                heads.append(h)
                if i < count:
                    positions.append(int(layer.positions[first + i]))
                elif i < count + layer.tail_length:
                    positions.append(layer.base_length + i - count)
                else:
                    positions.append(NO_POSITION)
                if positions[-1] != NO_POSITION:
                    bias[h * group:(h + 1) * group, row] = 0
        assert meta.heads.tolist() == heads and meta.positions.tolist() == positions
        assert torch.equal(meta.decode_bias, bias.to(meta.decode_bias.dtype))


def test_generate_with_packed_cache_uses_packed_attention(tiny_llama):
    """``model.generate`` with a packed cache (no ``kvzip_cache=``) decodes from the packed document: the same
    greedy tokens as ``answer``."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3)
    expected = kvzip_rag.answer(tiny_llama, cache, "Who built the harbour?", max_new_tokens=6).token_ids
    prompt = list(cache.info.input_ids) + tiny_llama.encode(tiny_llama.template.question_text("Who built the harbour?"))
    with torch.inference_mode():  # the usual call: the whole sequence, the cache holding its first part
        out = tiny_llama.model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, **{tiny_llama.cache_argument: cache}
        )
    assert len(expected) == 6 and out[0, len(prompt) :].tolist() == expected


def test_packed_cache_under_another_attention_raises(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3)
    ids = tiny_llama.encode(tiny_llama.template.question_text("Who built the harbour?"))
    tiny_llama.model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(PackedAttentionRequiredError, match="packed attention"):
            tiny_llama.forward(ids, cache)
    finally:
        tiny_llama.model.set_attn_implementation(attention.ATTENTION_NAME)
