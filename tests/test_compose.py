"""Composition of compressed caches: one cache is itself, the sequential layout matches pieces encoded independently
and placed by re-rotation (a slow reference from plain transformers), repair over a whole piece is a joint prefill,
and bad input gets clear errors."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import kvzip_rag
from kvzip_rag.compose import ComposedCache, compose
from kvzip_rag.errors import ContextTooLongError, InvalidArgumentError, ModelMismatchError

from conftest import build_tiny
from test_engine import ATOL, TEXT, full_cache_logits, packed_logits

PIECE_A = TEXT
PIECE_B = " The winner of the August regatta receives a silver anchor."  # shorter than Gemma's tiny window (24)
QUESTION = "Who built the harbour, and what does the regatta winner receive?"


def question_ids(model) -> list[int]:
    return model.encode(model.template.question_text(QUESTION))


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_composing_one_cache_is_that_cache(family, layout, smol_tokenizer):
    model = build_tiny(family, smol_tokenizer, seed=3)
    cache = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3)
    composed = compose(model, [cache], layout=layout)
    assert isinstance(composed, ComposedCache) and composed.composition.used == (0,)
    assert composed.info.base_length == cache.info.base_length
    ids = question_ids(model)
    assert torch.equal(packed_logits(model, composed, ids), packed_logits(model, cache, ids))


# ---------------------------------------------------------------- slow reference from plain transformers

def causal_attention(module, query, key, value, scaling, past=None, q_pos=None):
    """Eager attention masked by position: causal, and within the layer's sliding window."""
    group = query.shape[1] // key.shape[1]
    q_pos = torch.arange(query.shape[2]) if q_pos is None else q_pos
    k_pos = q_pos
    keys, values = key[0], value[0]
    if past is not None:
        keys, values = torch.cat([past[0], keys], dim=1), torch.cat([past[1], values], dim=1)
        k_pos = torch.cat([past[2], q_pos])
    allowed = k_pos[None, :] <= q_pos[:, None]
    if getattr(module, "sliding_window", None):
        allowed &= k_pos[None, :] > q_pos[:, None] - module.sliding_window
    keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
    logits = (query[0] @ keys.transpose(1, 2)) * scaling
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (weights @ values).transpose(0, 1).unsqueeze(0), None


def recorded_kv(model, ids: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Post-RoPE keys and values of every layer for ``ids`` encoded alone (transformers' SDPA, no cache)."""
    record = {}

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        record[module.layer_idx] = (key[0].clone(), value[0].clone())
        return causal_attention(module, query, key, value, scaling)

    AttentionInterface.register("kvzip_test_record", recording)
    model.model.set_attn_implementation("kvzip_test_record")
    try:
        with torch.inference_mode():
            model.model(torch.tensor([ids]))
    finally:
        model.model.set_attn_implementation(kvzip_rag.attention.ATTENTION_NAME)
    return record


def rotate_reference(model, layer: int, keys: torch.Tensor, shift: int) -> torch.Tensor:
    """Move keys by ``shift`` positions: multiply each (x_i, x_{i+d/2}) pair, as a complex number, by e^(i shift f)."""
    rotary = model.model.get_decoder().rotary_emb
    layer_types = getattr(model.config, "layer_types", None)
    inv_freq = getattr(rotary, f"{layer_types[layer]}_inv_freq") if hasattr(rotary, "layer_types") else rotary.inv_freq
    half = keys.shape[-1] // 2
    z = torch.complex(keys[..., :half].double(), keys[..., half:].double())
    z = z * torch.polar(torch.ones_like(inv_freq, dtype=torch.float64), shift * inv_freq.double())
    return torch.cat([z.real, z.imag], dim=-1).to(keys.dtype)


def logits_over_past(model, past: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], new_ids: list[int],
                     start: int) -> torch.Tensor:
    """Logits of ``new_ids`` at positions ``start...`` attending (eager math, masked by position) to explicit per-layer
    (keys, values, positions) plus themselves, with each layer's sliding window."""
    q_pos = torch.arange(start, start + len(new_ids))

    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        return causal_attention(module, query, key, value, scaling, past[module.layer_idx], q_pos)

    AttentionInterface.register("kvzip_test_past", attention)
    model.model.set_attn_implementation("kvzip_test_past")
    try:
        with torch.inference_mode():
            out = model.model(torch.tensor([new_ids]), position_ids=q_pos[None])
    finally:
        model.model.set_attn_implementation(kvzip_rag.attention.ATTENTION_NAME)
    return out.logits[0]


def placed_reference(model, layout: str, pieces: list[str], new_ids: list[int]) -> torch.Tensor:
    """Each piece encoded alone after the prefix; sequential: piece i moved after the ones before it by rotation;
    parallel: all at their encoded positions, sliding layers holding the longest piece (the rule of compose)."""
    prefix = model.encode(model.template.prefix)
    contexts = [model.encode(p) for p in pieces]
    records = [recorded_kv(model, prefix + c) for c in contexts]
    sliding = {i for i, t in enumerate(getattr(model.config, "layer_types", None) or []) if t == "sliding_attention"}
    longest = max(range(len(pieces)), key=lambda i: len(contexts[i]))
    past, next_position = {}, len(prefix) + (sum(map(len, contexts)) if layout == "sequential" else
                                              max(map(len, contexts)))
    for layer in records[0]:
        keys, values, positions = [records[0][layer][0][:, : len(prefix)]], [records[0][layer][1][:, : len(prefix)]], \
            [torch.arange(len(prefix))]
        start = len(prefix)
        for i, (record, context) in enumerate(zip(records, contexts)):
            if layout == "parallel" and layer in sliding and i != longest:
                continue
            shift = start - len(prefix) if layout == "sequential" else 0
            k, v = record[layer][0][:, len(prefix):], record[layer][1][:, len(prefix):]
            keys.append(rotate_reference(model, layer, k, shift) if shift else k)
            values.append(v)
            positions.append(torch.arange(start, start + len(context)))
            if layout == "sequential":
                start += len(context)
        past[layer] = (torch.cat(keys, dim=1), torch.cat(values, dim=1), torch.cat(positions))
    return logits_over_past(model, past, new_ids, next_position)


@pytest.mark.parametrize("layout", ["sequential", "parallel"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_composition_matches_pieces_placed_independently(family, layout, smol_tokenizer):
    """Ratio 1.0, nothing evicted: composed logits = the slow reference, within ATOL (float32 summation order and
    float32 vs float64 rotation). Gemma's piece B is shorter than its window, so the window spans both pieces."""
    model = build_tiny(family, smol_tokenizer, seed=4)
    caches = [kvzip_rag.compress(model, piece, ratio=1.0) for piece in (PIECE_A, PIECE_B)]
    composed = compose(model, caches, layout=layout)
    ids = question_ids(model)
    expected = placed_reference(model, layout, [PIECE_A, PIECE_B], ids)
    got = packed_logits(model, composed, ids)
    assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()
    # The anchor can fail: the other layout puts piece B elsewhere and changes the logits.
    other = compose(model, caches, layout="parallel" if layout == "sequential" else "sequential")
    assert not torch.allclose(packed_logits(model, other, ids), expected, atol=ATOL)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_repair_over_a_whole_piece_is_the_joint_prefill(family, smol_tokenizer):
    """Recomputing every token of piece B on top of piece A (ratio 1.0) is exactly prefilling A and B together."""
    model = build_tiny(family, smol_tokenizer, seed=5)
    caches = [kvzip_rag.compress(model, piece, ratio=1.0) for piece in (PIECE_A, PIECE_B)]
    ids = question_ids(model)
    joint = list(caches[0].info.input_ids) + list(caches[1].info.input_ids[caches[1].info.prefix_length:])
    expected = full_cache_logits(model, joint, ids)
    length = caches[1].info.context_length
    repaired = compose(model, caches, layout="sequential", repair=length)
    assert repaired.composition.repaired_tokens == length
    assert torch.allclose(packed_logits(model, repaired, ids), expected, atol=ATOL)
    plain = compose(model, caches, layout="sequential")
    assert not torch.allclose(packed_logits(model, plain, ids), expected, atol=ATOL)
    # A partial repair changes only the first tokens' entries of the second piece.
    partial = compose(model, caches, layout="sequential", repair=3)
    start = partial.composition.parts[1].start
    for a, b in zip(partial.layers, plain.layers):
        moved = ~torch.isclose(a.keys, b.keys, atol=1e-6).all(-1)
        assert ((b.positions[moved] >= start) & (b.positions[moved] < start + 3)).all()


# ---------------------------------------------------------------- bad input

def test_bad_input_gets_clear_errors(tiny_llama, smol_tokenizer):
    cache = kvzip_rag.compress(tiny_llama, PIECE_A, ratio=0.5)
    with pytest.raises(InvalidArgumentError, match="empty list"):
        compose(tiny_llama, [])
    other_model = build_tiny("llama", smol_tokenizer, seed=9)
    other = kvzip_rag.compress(other_model, PIECE_B, ratio=0.5)
    with pytest.raises(ModelMismatchError, match="different models"):
        compose(tiny_llama, [cache, other])
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        compose(tiny_llama, [other])
    with pytest.raises(InvalidArgumentError, match="layout"):
        compose(tiny_llama, [cache], layout="diagonal")
    with pytest.raises(InvalidArgumentError, match="sequential"):
        compose(tiny_llama, [cache, cache], layout="parallel", repair=4)


def test_window_drops_documents_or_refuses(tiny_llama):
    caches = [kvzip_rag.compress(tiny_llama, text, ratio=0.5) for text in (PIECE_A, PIECE_B, PIECE_A)]
    base = caches[0].info.base_length  # the prefix and piece A
    reserve = tiny_llama.max_positions - (base + 20)  # room for piece A and piece B (13 tokens), not for A again
    composed = compose(tiny_llama, caches, layout="sequential", reserve=reserve)
    assert composed.composition.used == (0, 1) and composed.composition.dropped == (2,)
    assert composed.info.base_length == base + caches[1].info.context_length
    with pytest.raises(ContextTooLongError, match="compose fewer documents"):
        compose(tiny_llama, caches, layout="sequential", reserve=reserve, on_overflow="error")
    # In parallel, every document starts after the prefix: all three fit.
    assert compose(tiny_llama, caches, layout="parallel", reserve=reserve).composition.dropped == ()
    with pytest.raises(ContextTooLongError):
        compose(tiny_llama, caches, layout="parallel", reserve=tiny_llama.max_positions - 10)


def test_sequential_refuses_inexact_rope_variants(smol_tokenizer):
    model = build_tiny("llama", smol_tokenizer, seed=6)
    caches = [kvzip_rag.compress(model, piece, ratio=1.0) for piece in (PIECE_A, PIECE_B)]
    model.model.config.rope_parameters = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(InvalidArgumentError, match="yarn"):
        compose(model, caches, layout="sequential")
    compose(model, caches, layout="parallel")  # nothing is rotated there


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_real_model_answers_from_two_documents(default_model, layout):
    """SmolLM2 answers this from both documents in one prompt (checked), and from neither document alone."""
    model = default_model
    documents = ["The museum opens at 9 am.\n", "The museum closes at 5 pm.\n"]
    question = "When does the museum open and close?"
    caches = [kvzip_rag.compress(model, text, ratio=1.0) for text in documents]

    def both(text: str) -> bool:
        return "9 am" in text and "5 pm" in text

    assert not any(both(kvzip_rag.answer(model, c, question, max_new_tokens=24).text) for c in caches)
    for ratio in (1.0, 0.3):
        composed = compose(model, [c.at_ratio(ratio) if ratio < 1 else c for c in caches], layout=layout)
        assert composed.composition.used == (0, 1)
        assert both(kvzip_rag.answer(model, composed, question, max_new_tokens=24).text)
