"""kvzip-fast: the learned gate trains, predicts KVzip's ranking better than key-norm, saves and reloads exactly,
is refused for another model, falls back to KVzip without a gate, and `kvzip-rag calibrate` writes it."""

from __future__ import annotations

import logging
import random

import pytest
import torch
from typer.testing import CliRunner

import kvzip_rag
from kvzip_rag.compression import compress, pack
from kvzip_rag.errors import ModelMismatchError
from kvzip_rag.prefill import prefill_document
from kvzip_rag.scorers import KVzipFastScorer, KVzipScorer
from kvzip_rag.scorers.fast_calibration import calibrate, gate_inputs, read_corpus, spearman
from kvzip_rag.scorers.fast_gate import Gate, find_gate, gate_path

from conftest import build_tiny

WORDS = ("harbour ferry granite basalt lighthouse keeper ledger storm island regatta anchor silver winter gulls "
         "the a of and in was by with every morning night built engineer northern southern red white miles").split()


def make_texts(count: int, words: int = 160, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) + "." for _ in range(count)]


@pytest.fixture(scope="module")
def trained(tiny_llama) -> Gate:
    return calibrate(tiny_llama, make_texts(8), holdout=2)


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gate_ranks_like_kvzip_better_than_key_norm(tiny_llama, trained):
    for text in make_texts(3, seed=99):  # held-out text, never seen in calibration
        document = prefill_document(tiny_llama, text)
        truth = KVzipScorer().score(document)
        keys, _ = gate_inputs(document, truth)
        predicted = trained.predict(keys)
        norm = torch.stack([-k.norm(dim=-1) for k in keys])
        rho_gate = spearman(truth.flatten(), predicted.flatten())
        rho_norm = spearman(truth.flatten(), norm.flatten())
        assert rho_gate > rho_norm + 0.1, (rho_gate, rho_norm)
        assert rho_gate > 0.5
    assert float(trained.meta["heldout_rho_global_gate"]) > float(trained.meta["heldout_rho_global_keynorm"])


def test_saved_gate_reloads_bit_identically(tiny_llama, trained, tmp_path):
    path = trained.save(tmp_path / "gate.safetensors")
    again = Gate.load(path, tiny_llama)
    assert torch.equal(again.weight, trained.weight) and torch.equal(again.bias, trained.bias)
    assert again.layers == trained.layers and again.meta == trained.meta
    assert again.model_fingerprint == tiny_llama.fingerprint
    keys = [torch.randn(2, 5, 16) for _ in trained.layers]
    assert torch.equal(again.predict(keys), trained.predict(keys))


def test_gate_of_another_model_is_refused(tiny_llama, trained, smol_tokenizer, tmp_path):
    other = build_tiny("llama", smol_tokenizer, seed=1)
    path = trained.save(tmp_path / "gate.safetensors")
    with pytest.raises(ModelMismatchError, match="calibrated for the model with fingerprint"):
        Gate.load(path, other)
    with pytest.raises(ModelMismatchError, match="kvzip-rag calibrate"):
        compress(other, make_texts(1)[0], scorer=KVzipFastScorer(trained))


def test_without_a_gate_falls_back_to_kvzip_with_a_notice(tiny_llama, own_cache, caplog):
    text = make_texts(1, seed=5)[0]
    assert find_gate(tiny_llama) is None
    with caplog.at_level(logging.WARNING, logger="kvzip_rag"):
        cache = compress(tiny_llama, text, ratio=0.3, scorer="kvzip-fast")
    notices = [r for r in caplog.records if "no calibrated gate" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert cache.info.scorer == "kvzip"
    reference = compress(tiny_llama, text, ratio=0.3, scorer="kvzip")
    for mine, theirs in zip(cache.layers, reference.layers):
        assert torch.equal(mine.positions, theirs.positions)


def test_stored_gate_is_found_and_recorded(tiny_llama, trained, own_cache):
    trained.save(gate_path(tiny_llama))
    text = make_texts(1, seed=7)[0]
    cache = compress(tiny_llama, text, ratio=0.3, scorer="kvzip-fast")
    assert cache.info.scorer == "kvzip-fast"
    document = prefill_document(tiny_llama, text)
    scores = trained.predict([document.context_keys(layer) for layer in document.compressed_layers])
    reference = pack(document, scores, 0.3, "pair", "kvzip-fast")
    for mine, theirs in zip(cache.layers, reference.layers):
        assert torch.equal(mine.positions, theirs.positions)
    kvzip = compress(tiny_llama, text, ratio=0.3, scorer="kvzip")
    assert any(not torch.equal(a.positions, b.positions) for a, b in zip(cache.layers, kvzip.layers))


def test_read_corpus_round_robins_files(tiny_llama, tmp_path):
    for name, text in zip("abc", make_texts(3, words=300)):
        (tmp_path / f"{name}.txt").write_text(text)
    (tmp_path / "skip.csv").write_text("x,y\n")
    segments = read_corpus(tmp_path, tiny_llama, segment_tokens=100, max_segments=4)
    assert len(segments) == 4
    assert all(80 <= len(tiny_llama.encode(s)) <= 110 for s in segments)


def test_calibrate_cli_on_a_tiny_model_folder(tmp_path, smol_tokenizer, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvzip_rag.cli import app

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    folder = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, text in enumerate(make_texts(3, words=200)):
        (corpus / f"{index}.md").write_text(text)
    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    runner = CliRunner(env={"COLUMNS": "200", "KVZIP_RAG_MODEL": None})
    result = runner.invoke(app, ["calibrate", "--model", str(folder), "--data", str(corpus), "--segment-tokens",
                                 "80", "--max-segments", "4", "--holdout", "1", "--threads", "1"])
    assert result.exit_code == 0, result.output
    model = kvzip_rag.load_model(str(folder), threads=1)
    gate = Gate.load(gate_path(model), model)
    assert gate.meta["segments"] == "4" and "heldout_rho_global_gate" in gate.meta
    missing = runner.invoke(app, ["calibrate", "--model", str(folder), "--data", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "does not exist" in missing.output
