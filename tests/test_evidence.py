"""Evidence from the cache and abstention: the recorded attention mass equals an eager reference over the full
cache, composed caches map every pair back to its own document, citations are sentences of the stored text, and
the service returns them (or abstains) in every composition strategy; one end-to-end check with the real model."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag.answers import Target
from kvzip_rag.compose import compose
from kvzip_rag.evidence import Evidence, EvidenceRecorder, citations, document_places
from kvzip_rag.generate import answer

from conftest import build_tiny
from test_engine import TEXT

OTHER = "The bakery on Mill Street opens at six. It sells rye bread and cinnamon buns to the ferry crews."
QUESTION = "Who built the harbour?"


def eager_mass(model: kvzip_rag.KVzipModel, ids: list[int], queries: range, context: range) -> torch.Tensor:
    """Reference: plain transformers with eager attention over the whole sequence (no cache at all); the attention
    probabilities of ``queries`` on the ``context`` positions, summed over queries, layers and heads, normalised."""
    hf = model.model
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = hf(torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        hf.set_attn_implementation(previous)
    attentions = torch.stack(out.attentions)[:, 0]  # (layers, heads, L, L)
    picked = attentions[:, :, list(queries)][..., list(context)]
    return picked.sum(dim=(0, 1, 2)).double() / (attentions.shape[0] * attentions.shape[1] * len(queries))


@pytest.fixture(scope="module")
def tiny(smol_tokenizer) -> kvzip_rag.KVzipModel:
    return build_tiny("llama", smol_tokenizer, seed=5)


def test_recorded_mass_equals_eager_attention_over_the_full_cache(tiny):
    cache = kvzip_rag.compress(tiny, TEXT, ratio=1.0)
    recorder = EvidenceRecorder(cache)
    result = answer(tiny, cache, QUESTION, max_new_tokens=6)
    evidence = recorder.finish()
    assert evidence.steps == 1 + len(result.token_ids) - 1  # the prompt's last token, then each generated but last
    prompt = tiny.encode(tiny.template.question_text(QUESTION))
    ids = list(cache.info.input_ids) + prompt + result.token_ids
    first_query = cache.info.base_length + len(prompt) - 1
    expected = eager_mass(tiny, ids, range(first_query, first_query + evidence.steps),
                          range(cache.info.prefix_length, cache.info.base_length))
    assert torch.allclose(evidence.token_mass[0], expected, atol=1e-5)
    assert evidence.document_share == pytest.approx(float(expected.sum()), abs=1e-5)
    assert all(layer.evidence is None for layer in cache.layers)  # detached: later answers record nothing


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_composed_pairs_map_back_to_their_own_document(tiny, layout):
    caches = [kvzip_rag.compress(tiny, text, ratio=1.0) for text in (TEXT, OTHER)]
    composed = compose(tiny, caches, layout=layout)
    recorder = EvidenceRecorder(composed)
    for index in recorder.layers:  # mass 1 on document 0's pairs, 2 on document 1's, 5 on the prefix
        recorder.mass[index] = (composed.sources[index] + 1).float().where(composed.sources[index] >= 0,
                                                                           torch.tensor(5.0))
    recorder.steps, recorder.heads = 1, 1
    evidence = recorder.finish()
    kv_heads = composed.layers[0].num_heads
    for place in document_places(composed):  # ratio 1.0: each token has one pair per kv head in every layer,
        assert place.length == caches[place.source].info.context_length  # and all mass is over 1 step x 1 head
        assert torch.allclose(evidence.token_mass[place.source],
                              torch.full((place.length,), (place.source + 1.0) * kv_heads).double())


def test_citations_are_the_attended_sentences_of_the_stored_text(tiny):
    cache = kvzip_rag.compress(tiny, OTHER, ratio=1.0)
    offsets = tiny.tokenizer(OTHER, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    second = OTHER.index("It sells")
    in_second = [b - 1 >= second for _, b in offsets]  # a token belongs to the sentence of its last character
    mass = torch.tensor([0.3 if inside else 0.01 for inside in in_second], dtype=torch.float64)
    target = Target("bakery", 0, 1.0, OTHER)
    cited = citations(Evidence({0: mass}, float(mass.sum()), 1), {0: (target, OTHER)}, tiny.tokenizer, cache)
    assert cited[0].text == OTHER[second:] == OTHER[cited[0].start : cited[0].end]
    assert cited[0].weight == pytest.approx(float(mass[in_second].sum() / mass.sum()))
    assert len(cited) == 1  # the first sentence holds under a quarter of the best one's mass
    edited = OTHER.replace("rye", "oat")  # stored text no longer matches the cache's tokens: nothing is cited
    assert citations(Evidence({0: mass}, 1.0, 1), {0: (target, edited)}, tiny.tokenizer, cache) == []
