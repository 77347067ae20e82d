"""Correctness anchors of the engine: exact reproduction at ratio 1, the scorer against a slow reference,
budgets that follow the ratio, independent vs follow-up questions, and clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import kvzip_rag
from kvzip_rag.prefill import compressed_layer_indices, prefill, prefill_document
from kvzip_rag.scorers import KVzipScorer

from conftest import build_tiny

TEXT = (
    "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. It has two breakwaters, the northern one "
    "made of granite and the southern one of basalt. Ferries leave for the island of Tessin every morning at seven. "
    "The lighthouse at the end of the northern breakwater is painted red and white, and its lamp can be seen from "
    "eighteen nautical miles away. Every August the town holds a regatta in which fishing boats race around the "
    "harbour, and the winner receives a silver anchor."
)
ATOL = 1e-4  # float32 on CPU: packed and full attention differ only by summation order


def full_cache_logits(model: kvzip_rag.KVzipModel, history: list[int], new_ids: list[int]) -> torch.Tensor:
    """Reference: transformers' own SDPA attention over a DynamicCache of the whole history."""
    model.model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            cache = DynamicCache(config=model.model.config)
            model.forward(history, cache)
            out = model.forward(new_ids, cache)
    finally:
        model.model.set_attn_implementation(kvzip_rag.attention.ATTENTION_NAME)
    return out.logits[0]


def packed_logits(model: kvzip_rag.KVzipModel, cache: kvzip_rag.PackedCache, new_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        out = model.forward(new_ids, cache)
    return out.logits[0]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3"])
def test_ratio_one_reproduces_full_cache_logits(family, smol_tokenizer):
    model = build_tiny(family, smol_tokenizer)
    text = " ".join([TEXT] * 2)  # longer than Gemma's tiny sliding window (24), so window handling is exercised
    cache = kvzip_rag.compress(model, text, ratio=1.0, prefill_chunk=48)  # chunked prefill: attends to its past
    document = list(cache.info.input_ids)
    question = model.encode(model.template.question_text("Who built the harbour?"))
    # Longer than Gemma's tiny window, so the window also applies inside the appended tail.
    follow = model.encode(" Ansel Brask built it in 1731, with two breakwaters of granite and basalt, and a red and white "
                          "lighthouse whose lamp is seen from eighteen nautical miles away.")
    expected = full_cache_logits(model, document, question)
    assert torch.allclose(packed_logits(model, cache, question), expected, atol=ATOL)
    # Decoding step by step appends to the packed cache's tail: still identical to the full cache.
    expected_next = full_cache_logits(model, document + question, follow)
    assert torch.allclose(packed_logits(model, cache, follow), expected_next, atol=ATOL)
    cache.rewind()
    assert cache.tail_length == 0


def test_rewind_returns_to_the_document_and_reset_means_the_same(tiny_llama):
    """``rewind()`` names what a packed cache does; transformers' ``reset()`` (which zeroes a plain cache) keeps
    working on it and rewinds too, never wiping the document."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    question = tiny_llama.encode(tiny_llama.template.question_text("Who built the harbour?"))
    first = packed_logits(tiny_llama, cache, question)
    assert cache.tail_length == len(question)
    cache.rewind()
    assert cache.tail_length == 0 and torch.equal(packed_logits(tiny_llama, cache, question), first)
    cache.reset()
    assert cache.tail_length == 0 and torch.equal(packed_logits(tiny_llama, cache, question), first)


def masked_reference_logits(model: kvzip_rag.KVzipModel, cache: kvzip_rag.PackedCache, new_ids: list[int]):
    """The testing device of the spec: the full cache with the evicted entries masked out, by plain eager math.

    The document is computed with ordinary causal attention; the new tokens see, in each compressed layer and kv
    head, only the document entries that head kept.
    """
    from transformers import AttentionInterface

    base = cache.info.base_length
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    kept = {}
    for index, layer in enumerate(cache.layers):
        if layer.compressed:
            offsets = layer.offsets.tolist()
            kept[index] = [set(layer.positions[a:b].tolist()) for a, b in zip(offsets, offsets[1:])]

    def masked_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        length = key.shape[2]
        positions = torch.arange(length)
        allowed = positions[None, :] <= positions[:, None]
        if getattr(module, "sliding_window", None):
            allowed &= positions[None, :] > positions[:, None] - module.sliding_window
        allowed = allowed.repeat(query.shape[1], 1, 1)
        for head, keep in enumerate(kept.get(module.layer_idx, [])):
            evicted = torch.tensor([p not in keep for p in range(base)])
            allowed[head * group : (head + 1) * group, base:, :base] &= ~evicted
        keys = key.repeat_interleave(group, dim=1)[0]
        values = value.repeat_interleave(group, dim=1)[0]
        logits = (query[0] @ keys.transpose(1, 2)) * scaling
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return (weights @ values).transpose(0, 1).unsqueeze(0), None

    AttentionInterface.register("kvzip_test_masked", masked_attention)
    model.model.set_attn_implementation("kvzip_test_masked")
    try:
        with torch.inference_mode():
            out = model.model(torch.tensor([list(cache.info.input_ids) + new_ids]))
    finally:
        model.model.set_attn_implementation(kvzip_rag.attention.ATTENTION_NAME)
    return out.logits[0, base:]


@pytest.mark.parametrize("level", ["pair", "uniform", "head"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_packed_cache_equals_masked_full_cache(family, level, smol_tokenizer):
    """Below ratio 1 (unequal head budgets at pair level), attention over the packed layout is exact."""
    model = build_tiny(family, smol_tokenizer, seed=2)
    cache = kvzip_rag.compress(model, " ".join([TEXT] * 2), ratio=0.3, level=level)
    question = model.encode(model.template.question_text("Who built the harbour?"))
    expected = masked_reference_logits(model, cache, question)
    assert torch.allclose(packed_logits(model, cache, question), expected, atol=ATOL)


def test_lower_ratio_changes_logits(tiny_llama):
    """The anchor above must be able to fail: evicting entries does change the output."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2)
    question = tiny_llama.encode(tiny_llama.template.question_text("Who built the harbour?"))
    expected = full_cache_logits(tiny_llama, list(cache.info.input_ids), question)
    assert not torch.allclose(packed_logits(tiny_llama, cache, question), expected, atol=ATOL)


@pytest.mark.slow
def test_ratio_one_reproduces_full_cache_logits_real_model(default_model):
    cache = kvzip_rag.compress(default_model, TEXT, ratio=1.0)
    question = default_model.encode(default_model.template.question_text("Who built the harbour?"))
    expected = full_cache_logits(default_model, list(cache.info.input_ids), question)
    assert torch.allclose(packed_logits(default_model, cache, question), expected, atol=1e-3)


def reference_kvzip_scores(model: kvzip_rag.KVzipModel, text: str, chunk_size: int) -> torch.Tensor:
    """Slow reference: materialise every attention matrix with eager attention over prefix + context + repeat,
    then restrict each repeat query's weights to {prefix, current chunk, repeat tokens} by renormalising."""
    document = prefill_document(model, text)
    scorer = KVzipScorer(chunk_size=chunk_size)
    prefix, n = document.prefix_length, document.context_length
    base = prefix + n
    layers = compressed_layer_indices(model)
    heads = model.config.num_key_value_heads
    group = model.config.num_attention_heads // heads
    scores = torch.zeros(len(layers), heads, n)
    model.model.set_attn_implementation("eager")
    try:
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            repeat = scorer.repeat_ids(document, start, end)
            ids = document.prefix_ids + document.context_ids + repeat
            with torch.no_grad():
                attentions = model.model(torch.tensor([ids]), output_attentions=True).attentions
            allowed = list(range(prefix)) + list(range(prefix + start, prefix + end)) + list(range(base, len(ids)))
            for row, layer in enumerate(layers):
                weights = attentions[layer][0, :, base:, :][:, :, allowed].double()  # (H, repeat, |allowed|)
                weights = weights / weights.sum(-1, keepdim=True)
                chunk = weights[:, :, prefix : prefix + end - start]
                for head in range(heads):
                    block = chunk[head * group : (head + 1) * group]
                    scores[row, head, start:end] = block.amax(dim=(0, 1)).float()
    finally:
        model.model.set_attn_implementation(kvzip_rag.attention.ATTENTION_NAME)
    return scores


@pytest.mark.parametrize("lse_from_forward", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_scorer_matches_slow_reference(family, lse_from_forward, smol_tokenizer, monkeypatch):
    from kvzip_rag.scorers.kvzip import _RepeatObserver

    if not lse_from_forward:  # the path used where the forward pass reports no per-range normalisers (CUDA)
        original = _RepeatObserver.restricted_lse
        monkeypatch.setattr(_RepeatObserver, "restricted_lse", lambda self, q, k, parts, s: original(self, q, k, None, s))
    model = build_tiny(family, smol_tokenizer, seed=1)
    chunk_size = 40  # several repeat chunks over the ~100-token context
    document = prefill_document(model, TEXT)
    assert document.context_length > 2 * chunk_size
    fast = KVzipScorer(chunk_size=chunk_size).score(document)
    slow = reference_kvzip_scores(model, TEXT, chunk_size)
    assert fast.shape == slow.shape
    assert torch.allclose(fast, slow, rtol=1e-3, atol=1e-6)


def test_scoring_leaves_the_full_cache_untouched(tiny_llama):
    document = prefill_document(tiny_llama, TEXT)
    before = [layer.keys.clone() for layer in document.cache.layers]
    KVzipScorer(chunk_size=32).score(document)
    assert all(torch.equal(a, layer.keys) for a, layer in zip(before, document.cache.layers))


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.7])
def test_pair_level_keeps_the_global_top_fraction(tiny_llama, ratio):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=ratio)
    n, info = cache.info.context_length, cache.info
    budgets = cache.head_budgets()
    assert budgets.sum().item() == round(ratio * n * budgets.numel())
    assert cache.kept_ratio == pytest.approx(ratio, abs=1 / n)
    kept_entries = budgets.sum().item() + info.prefix_length * budgets.numel()
    all_entries = (info.prefix_length + n) * budgets.numel()
    assert cache.nbytes / cache.full_nbytes == pytest.approx(kept_entries / all_entries)


def test_uniform_and_head_levels(tiny_llama):
    n = kvzip_rag.compress(tiny_llama, TEXT, ratio=1.0).info.context_length
    uniform = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3, level="uniform").head_budgets()
    assert (uniform == round(0.3 * n)).all()
    heads = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5, level="head").head_budgets()
    assert set(heads.flatten().tolist()) <= {0, n}
    assert (heads == n).sum().item() == round(0.5 * heads.numel())


def test_head_level_is_its_own_scorer(tiny_llama):
    """Head level ranks by ``HeadScorer`` (calibrated once per model, constant per head); scorers refuse levels
    they do not rank at, by name."""
    from kvzip_rag.compression import resolve_scorer
    from kvzip_rag.errors import InvalidArgumentError
    from kvzip_rag.scorers import HeadScorer, SnapKVScorer
    from kvzip_rag.scorers.head_calibration import head_scores

    assert isinstance(resolve_scorer("kvzip", "head"), HeadScorer)
    assert isinstance(resolve_scorer("kvzip-head", "head"), HeadScorer)
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5, level="head", scorer=HeadScorer())
    assert cache.info.scorer == "kvzip-head" and cache.info.level == "head"
    document = prefill_document(tiny_llama, TEXT)
    scores = HeadScorer().score(document)
    assert torch.equal(scores[:, :, 0], head_scores(tiny_llama)) and (scores == scores[:, :, :1]).all()
    with pytest.raises(InvalidArgumentError, match="kvzip-head"):
        kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5, level="pair", scorer="kvzip-head")
    with pytest.raises(InvalidArgumentError, match="snapkv"):
        kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5, level="head", scorer=SnapKVScorer())


def test_observers_follow_the_attention_protocol(tiny_llama):
    """Scorers hand the attention an ``AttentionObserver``: it is called through ``observe`` in every layer and
    receives the log-sum-exp of exactly the key ranges its ``key_cuts`` ask for."""
    from kvzip_rag.attention import AttentionObserver
    from kvzip_rag.scorers import H2OScorer

    class Recorder(AttentionObserver):
        key_cuts = (5, 9)

        def __init__(self):
            self.seen = []

        def observe(self, module, query, key, lse_parts):
            self.seen.append((module.layer_idx, sorted(lse_parts)))

    recorder = Recorder()
    ids = tiny_llama.encode(TEXT)[:16]
    prefill(tiny_llama, ids, chunk_size=12, observer=recorder)
    layers = tiny_llama.config.num_hidden_layers
    assert [layer for layer, _ in recorder.seen] == list(range(layers)) * 2
    assert recorder.seen[-1][1] == [(0, 5), (5, 9), (9, 12), (12, 16)]  # second chunk: 12 past keys, 4 new
    assert isinstance(H2OScorer().prefill_observer(20, 4, [0, 1]), AttentionObserver)


def test_at_ratio_equals_compressing_at_that_ratio(tiny_llama):
    high = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.6)
    low = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.25)
    derived = high.at_ratio(0.25)
    for a, b in zip(derived.layers, low.layers):
        assert torch.equal(a.offsets, b.offsets)
        assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys)


def test_independent_questions_do_not_leak(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3)
    alone = kvzip_rag.answer(tiny_llama, cache, "When do ferries leave?", max_new_tokens=8)
    kvzip_rag.answer(tiny_llama, cache, "What colour is the lighthouse?", max_new_tokens=8)
    after = kvzip_rag.answer(tiny_llama, cache, "When do ferries leave?", max_new_tokens=8)
    assert after.token_ids == alone.token_ids
    assert cache.tail_length == 0


def assert_first_token(model: kvzip_rag.KVzipModel, reply: kvzip_rag.Answer, expected_logits: torch.Tensor) -> None:
    token = int(expected_logits.argmax())
    if token in model.stop_token_ids:
        assert reply.token_ids == [] and reply.finish_reason == "stop"
    else:
        assert reply.token_ids[0] == token


def dialogue_ids(model: kvzip_rag.KVzipModel, cache: kvzip_rag.PackedCache,
                 answer_ids: list[int]) -> tuple[list[int], list[int]]:
    """A first turn ("Who built the harbour?" and its answer) after the document, and the follow-up "And when?",
    as the ids one prompt of the whole dialogue would hold: what a conversation's second turn must reproduce."""
    template = model.template
    history = list(cache.info.input_ids) + model.encode(template.question_text("Who built the harbour?"))
    return history + list(answer_ids), model.encode(template.question_text("And when?", first_turn=False))


def test_follow_up_sees_the_earlier_turn(tiny_llama):
    """A conversation's second turn is computed exactly as if the whole dialogue were one prompt."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=1.0)
    chat = kvzip_rag.Conversation(tiny_llama, cache)
    first = chat.ask("Who built the harbour?", max_new_tokens=6)
    history, follow_ids = dialogue_ids(tiny_llama, cache, first.token_ids)
    expected = full_cache_logits(tiny_llama, history, follow_ids)[-1]
    stream = chat.stream("And when?", max_new_tokens=1)
    list(stream)
    assert_first_token(tiny_llama, stream.result, expected)
    # The tail now holds both turns; an independent answer would have been computed without them.
    assert cache.tail_length == len(history) - cache.info.base_length + len(follow_ids) + 1
    assert chat.turns[0][0] == "Who built the harbour?"
    chat.reset()
    assert cache.tail_length == 0 and not chat.turns


def test_streaming_yields_pieces_that_join_to_the_answer(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3)
    stream = kvzip_rag.stream_answer(tiny_llama, cache, "Who built the harbour?", max_new_tokens=12)
    pieces = list(stream)
    assert len(pieces) >= 2
    assert "".join(pieces).strip() == stream.result.text
    assert kvzip_rag.answer(tiny_llama, cache, "Who built the harbour?", max_new_tokens=12).text == stream.result.text


def test_sampling_is_seeded_and_stop_strings_cut(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3)
    a = kvzip_rag.answer(tiny_llama, cache, "Describe the harbour.", temperature=1.0, top_p=0.9, seed=3,
                         max_new_tokens=10)
    b = kvzip_rag.answer(tiny_llama, cache, "Describe the harbour.", temperature=1.0, top_p=0.9, seed=3,
                         max_new_tokens=10)
    assert a.token_ids == b.token_ids
    full = kvzip_rag.answer(tiny_llama, cache, "Describe the harbour.", max_new_tokens=10)
    stop = full.text.split()[1] if len(full.text.split()) > 1 else full.text[:2]
    cut = kvzip_rag.answer(tiny_llama, cache, "Describe the harbour.", max_new_tokens=10, stop=[stop])
    assert stop not in cut.text and cut.finish_reason == "stop"


@pytest.mark.parametrize(
    ("text", "kwargs", "error", "match"),
    [
        ("", {}, kvzip_rag.EmptyDocumentError, "empty"),
        ("  \n\t ", {}, kvzip_rag.EmptyDocumentError, "empty"),
        (TEXT, {"ratio": 0.0}, kvzip_rag.InvalidArgumentError, r"\(0, 1\]"),
        (TEXT, {"ratio": 1.5}, kvzip_rag.InvalidArgumentError, r"\(0, 1\]"),
        (TEXT, {"level": "layer"}, kvzip_rag.InvalidArgumentError, "unknown level"),
        (TEXT, {"scorer": "magic"}, kvzip_rag.InvalidArgumentError, "unknown scorer"),
        ("A lone \ud800 surrogate.", {}, kvzip_rag.InvalidArgumentError, "lone surrogate"),
        (TEXT, {"prefill_chunk": -1}, kvzip_rag.InvalidArgumentError, "prefill chunk size"),  # crashed the process
        (TEXT, {"prefill_chunk": 0}, kvzip_rag.InvalidArgumentError, "prefill chunk size"),
    ],
)
def test_bad_input_is_refused_clearly(tiny_llama, text, kwargs, error, match):
    with pytest.raises(error, match=match):
        kvzip_rag.compress(tiny_llama, text, **kwargs)


def test_bad_questions_options_and_models_are_refused_clearly(tiny_llama):
    """One-line errors before any model work, never a tokenizer's TypeError or an AttributeError from inside."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    with pytest.raises(kvzip_rag.InvalidArgumentError, match="lone surrogate"):
        kvzip_rag.answer(tiny_llama, cache, "Who built \udfff it?")
    with pytest.raises(kvzip_rag.InvalidArgumentError, match="is a string"):
        tiny_llama.encode(b"bytes")
    with pytest.raises(kvzip_rag.InvalidArgumentError, match="sampling is a SamplingOptions"):
        kvzip_rag.answer(tiny_llama, cache, "Who built it?", {"max_new_tokens": 2})
    with pytest.raises(kvzip_rag.InvalidArgumentError, match="list of packed caches"):
        kvzip_rag.compose(tiny_llama, cache)
    with pytest.raises(kvzip_rag.InvalidArgumentError, match="cache is a PackedCache"):
        kvzip_rag.answer(tiny_llama, "the document", "Who built it?")
    with pytest.raises(kvzip_rag.InvalidArgumentError, match="model is a KVzipModel"):
        kvzip_rag.Conversation(tiny_llama.model, cache)
    for wrong, match in (({"name_or_path": 3.5}, "a model is"), ({"name_or_path": 0}, "a model is"),
                         ({"device": "abacus"}, "unknown device"),
                         ({"dtype": "float77"}, "unknown dtype")):
        with pytest.raises(kvzip_rag.InvalidArgumentError, match=match):
            kvzip_rag.load_model(**wrong)
    assert kvzip_rag.answer(tiny_llama, cache, "Who built it?", max_new_tokens=2).token_ids


def test_context_longer_than_the_model_names_the_limit(smol_tokenizer):
    model = build_tiny("llama", smol_tokenizer, max_position_embeddings=600)
    with pytest.raises(kvzip_rag.ContextTooLongError, match=r"at most \d+ context tokens"):
        kvzip_rag.compress(model, TEXT * 10)


def test_cache_from_another_model_is_refused(tiny_llama, smol_tokenizer):
    other = build_tiny("llama", smol_tokenizer, seed=7)
    cache = kvzip_rag.compress(other, TEXT, ratio=0.3)
    with pytest.raises(kvzip_rag.ModelMismatchError, match="built by model"):
        kvzip_rag.answer(tiny_llama, cache, "Who built the harbour?")
    with pytest.raises(kvzip_rag.ModelMismatchError):
        kvzip_rag.Conversation(tiny_llama, cache)


def test_baseline_scorers_run_on_the_same_packed_cache(tiny_llama):
    for name in ("snapkv", "h2o", "keynorm", "random"):
        cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3, scorer=name)
        assert cache.info.scorer == name
        assert cache.head_budgets().sum().item() == round(0.3 * cache.info.context_length * cache.head_budgets().numel())


def test_add_turn_resumes_a_conversation_from_its_text(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=1.0)
    first = kvzip_rag.answer(tiny_llama, cache, "Who built the harbour?", max_new_tokens=6)
    assert first.mean_logprob is not None and first.mean_logprob <= 0
    resumed = kvzip_rag.Conversation(tiny_llama, cache)
    resumed.add_turn("Who built the harbour?", first.text)
    expected = full_cache_logits(tiny_llama, *dialogue_ids(tiny_llama, cache, tiny_llama.encode(first.text)))[-1]
    reply = resumed.ask("And when?", max_new_tokens=1)
    assert_first_token(tiny_llama, reply, expected)
    assert len(resumed.turns) == 2


def test_a_turn_closed_midway_is_cut_out_of_the_conversation(tiny_llama):
    """A consumer that stops reading a follow-up (a client gone, an error) leaves the cache as the conversation
    was: the next turn is computed as if the abandoned one never happened."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=1.0)
    chat = kvzip_rag.Conversation(tiny_llama, cache)
    first = chat.ask("Who built the harbour?", max_new_tokens=6)
    tail = cache.tail_length
    abandoned = iter(chat.stream("Tell me more.", max_new_tokens=8, stop=[]))
    next(abandoned)
    assert cache.tail_length > tail
    abandoned.close()
    assert cache.tail_length == tail and len(chat.turns) == 1
    expected = full_cache_logits(tiny_llama, *dialogue_ids(tiny_llama, cache, first.token_ids))[-1]
    stream = chat.stream("And when?", max_new_tokens=1)
    list(stream)
    assert_first_token(tiny_llama, stream.result, expected)
    assert [q for q, _ in chat.turns] == ["Who built the harbour?", "And when?"]
