"""kvzip-value: KVzip's scores weighted by each pair's relative output norm ||W_o v|| (issue #25)."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.prefill import prefill_document
from kvzip_rag.scorers import SCORERS, KVzipScorer, ValueWeightedScorer
from kvzip_rag.scorers.value import DEFAULT_POWER, attention_modules, output_norms

from conftest import build_tiny

TEXT = ("The bridge, built in 1821 by Ada Lovelace's cousin, spans the river; it was rebuilt (twice) after floods. "
        "Locals call it \"the old crossing\" - and, in winter, they skate beneath it!\n\n" * 3)


def plain_output_norms(document) -> torch.Tensor:
    """Slow reference: project every context value through each query head's slice of ``o_proj`` and take the root
    mean square of the norms over the heads that share its kv head; divide by the head's mean."""
    model = document.model
    heads, kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads
    group = heads // kv_heads
    modules = attention_modules(model.model)
    rows = []
    for layer in document.compressed_layers:
        values = document.cache.layers[layer].values[0, :, document.prefix_length : document.base_length].double()
        dim = values.shape[-1]
        weight = modules[layer].o_proj.weight.detach().double()
        per_kv = []
        for kv in range(kv_heads):
            norms = [(values[kv] @ weight[:, h * dim : (h + 1) * dim].T).norm(dim=-1)
                     for h in range(kv * group, (kv + 1) * group)]
            per_kv.append(torch.stack(norms).pow(2).mean(0).sqrt())
        block = torch.stack(per_kv)
        rows.append(block / block.mean(-1, keepdim=True))
    return torch.stack(rows).float()


def test_registered_as_a_scorer():
    assert SCORERS["kvzip-value"] is ValueWeightedScorer


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_output_norms_match_the_plain_projection(family, smol_tokenizer):
    model = build_tiny(family, smol_tokenizer, seed=2)
    document = prefill_document(model, TEXT)
    fast = output_norms(document)
    assert fast.shape == (len(document.compressed_layers), document.num_kv_heads, document.context_length)
    assert torch.allclose(fast, plain_output_norms(document), rtol=1e-4, atol=1e-5)
    assert torch.allclose(fast.mean(-1), torch.ones(fast.shape[:2]), atol=1e-5)


@pytest.mark.parametrize("power", [DEFAULT_POWER, 1.0, 0.0])
def test_scores_are_kvzip_times_output_norms_to_the_power(tiny_llama, power):
    document = prefill_document(tiny_llama, TEXT)
    weighted = ValueWeightedScorer(power=power, chunk_size=40).score(document)
    plain = KVzipScorer(chunk_size=40).score(document)
    assert torch.allclose(weighted, plain * plain_output_norms(document) ** power, rtol=1e-4, atol=1e-9)
    assert torch.equal(weighted.argsort(-1), plain.argsort(-1)) == (power == 0.0)


@pytest.mark.parametrize("power", [-1, 9, "2", True, float("nan")])
def test_bad_power_is_refused(power):
    with pytest.raises(InvalidArgumentError, match="output-norm power"):
        ValueWeightedScorer(power=power)


def test_keeps_pairs_with_larger_output_norms(tiny_llama):
    document = prefill_document(tiny_llama, TEXT)
    norms = output_norms(document)

    def kept_norm(scorer: str) -> float:
        cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, scorer=scorer)
        prefix = cache.info.prefix_length
        kept = []
        for row, layer in enumerate(x for x in cache.layers if x.compressed):
            for head in range(len(layer.offsets) - 1):
                positions = layer.positions[int(layer.offsets[head]) : int(layer.offsets[head + 1])]
                kept.append(norms[row, head, positions[positions >= prefix].long() - prefix])
        return float(torch.cat(kept).mean())

    assert kept_norm("kvzip-value") > kept_norm("kvzip")


def test_uniform_level_and_head_level(tiny_llama):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, level="uniform", scorer="kvzip-value")
    assert cache.info.scorer == "kvzip-value"
    with pytest.raises(InvalidArgumentError, match="kvzip-value"):
        kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, level="head", scorer="kvzip-value")


def test_store_round_trip_partial_load_and_corruption(tiny_llama, tmp_path):
    """A kvzip-value K4V2 cache goes through the store's blob format like any other: a lower-ratio load is the
    stored cache cut at that ratio, a blob written and read back is the same cache, and a damaged byte is refused."""
    from kvzip_rag.errors import CorruptBlobError
    from kvzip_rag.store import CacheStore
    from kvzip_rag.store.cachefile import read_cache, write_cache

    def same(a, b) -> bool:
        return all(torch.equal(x.positions, y.positions) and torch.equal(x.keys, y.keys)
                   and torch.equal(x.values, y.values) for x, y in zip(a.layers, b.layers, strict=True))

    with CacheStore(tmp_path / "store") as store:
        (record,) = store.add_document(tiny_llama, TEXT, doc_id="doc", ratio=0.3, kv_bits=3,
                                       scorer="kvzip-value").caches
        assert (record.scorer, record.kv_bits) == ("kvzip-value", 3)
        stored = store.load_cache("doc", tiny_llama)
        assert stored.info.scorer == "kvzip-value"
        assert same(store.load_cache("doc", tiny_llama, ratio=0.1), stored.at_ratio(0.1))
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.3, kv_bits=3, scorer="kvzip-value")
    path = tmp_path / "c.safetensors"
    write_cache(cache, path)
    assert same(read_cache(path), cache)
    data = bytearray(path.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError):
        read_cache(path)
