"""Model loading: aliases from PyPI GGUF wheels, local folders, clear errors; and the real-model answers."""

from __future__ import annotations

import re

import pytest
import torch

import kvzip_rag
from kvzip_rag.models import ALIASES, model_fingerprint

from conftest import build_tiny


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", text.lower())).strip()


def test_default_alias_loads_from_the_converted_folder(default_model):
    assert default_model.name == "smollm2-135m-instruct"
    assert default_model.config.model_type == "llama"
    assert "<|im_start|>assistant" in default_model.template.suffix
    from kvzip_rag.models import cache_dir

    assert (cache_dir() / "models" / "smollm2-135m-instruct" / "model.safetensors").is_file()  # converted once
    again = kvzip_rag.load_model("SmolLM2-135M-Instruct")  # aliases are case-insensitive
    assert again.fingerprint == default_model.fingerprint


def test_local_folder_loads_and_keeps_its_identity(tmp_path, smol_tokenizer):
    tiny = build_tiny("qwen2", smol_tokenizer)
    tiny.model.save_pretrained(tmp_path)
    smol_tokenizer.save_pretrained(tmp_path)
    loaded = kvzip_rag.load_model(str(tmp_path))
    assert loaded.fingerprint == tiny.fingerprint
    assert loaded.model.config._attn_implementation == "kvzip"


def test_fingerprint_changes_with_the_weights(smol_tokenizer):
    a = build_tiny("llama", smol_tokenizer, seed=0)
    b = build_tiny("llama", smol_tokenizer, seed=1)
    assert model_fingerprint(a.model) != model_fingerprint(b.model)
    with torch.no_grad():
        a.model.to(torch.bfloat16)
    assert model_fingerprint(a.model) == build_tiny("llama", smol_tokenizer, seed=0).fingerprint


def test_unknown_model_names_what_was_tried(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in the test
    with pytest.raises(kvzip_rag.ModelNotFoundError, match="built-in aliases") as error:
        kvzip_rag.load_model("no-such-org/no-such-model-kvzip")
    assert "no-such-org/no-such-model-kvzip" in str(error.value)
    with pytest.raises(kvzip_rag.ModelNotFoundError, match="does not exist"):
        kvzip_rag.load_model("/nowhere/model.gguf")


def test_base_model_template_falls_back_to_question_answer(smol_tokenizer):
    from kvzip_rag.prompt import PromptTemplate

    class NoTemplate:
        chat_template = None
        bos_token = "<s>"

    template = PromptTemplate.from_tokenizer(NoTemplate())
    assert template.question_text("Why?") == "\n\nQuestion: Why?\nAnswer:"
    assert PromptTemplate.from_tokenizer(smol_tokenizer).digest != template.digest


@pytest.mark.slow
def test_default_model_answers_squad_from_a_compressed_article(default_model, squad):
    """End to end on real data: one 0.3-ratio cache of an article answers all its questions."""
    article = next(a for a in squad if a["title"] == "Super_Bowl_50")
    paragraphs = article["paragraphs"][:4]
    cache = kvzip_rag.compress(default_model, "\n\n".join(p["context"] for p in paragraphs), ratio=0.3)
    assert cache.nbytes < 0.4 * cache.full_nbytes
    questions = [q for p in paragraphs for q in p["qas"]][:12]
    hits = 0
    for qa in questions:
        reply = kvzip_rag.answer(default_model, cache, qa["question"], max_new_tokens=32)
        hits += any(normalise(gold["text"]) in normalise(reply.text) for gold in qa["answers"])
    print(f"\nSQuAD Super_Bowl_50, ratio 0.3: {hits}/{len(questions)} answers contain the gold answer")
    assert hits / len(questions) >= 0.25


@pytest.mark.slow
def test_gemma3_alias_compresses_only_global_layers():
    """Gemma 3 270M (hybrid sliding-window layers) from its PyPI GGUF parts."""
    model = kvzip_rag.load_model("gemma3-270m")
    assert model.template.question_lead.endswith("Question: ")  # a base model: no chat template
    text = "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. " * 3
    cache = kvzip_rag.compress(model, text, ratio=0.3)
    kinds = model.config.layer_types
    assert cache.compressed_layers == [i for i, kind in enumerate(kinds) if kind == "full_attention"]
    assert all(layer.sliding_window for layer in cache.layers if not layer.compressed)
    reply = kvzip_rag.answer(model, cache, "Who built the harbour of Velmora?", max_new_tokens=12)
    assert reply.token_ids


def test_alias_table_pins_every_wheel():
    for alias in ALIASES.values():
        for wheel in alias.wheels:
            assert "==" in wheel.requirement and len(wheel.sha256) == 64


@pytest.mark.slow
def test_local_gguf_file_converts_to_the_same_model(default_model, tmp_path):
    """A user's own .gguf goes through the same dequantize-and-save path as the aliases."""
    from kvzip_rag.models import _assemble_gguf

    gguf = _assemble_gguf(ALIASES["smollm2-135m-instruct"], tmp_path)
    loaded = kvzip_rag.load_model(str(gguf))
    assert loaded.fingerprint == default_model.fingerprint


def test_unreachable_hub_fails_in_seconds(monkeypatch):
    """A hub id with no reachable hub looks only in the local cache: our error at once, not a minute of retries
    (``.invalid`` never resolves, so this holds with or without network)."""
    import time

    from kvzip_rag.models import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "https://hub.kvzip-rag.invalid")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    assert not hub_reachable()
    start = time.perf_counter()
    with pytest.raises(kvzip_rag.ModelNotFoundError, match="unreachable") as error:
        kvzip_rag.load_model("no-such-org/no-such-model-kvzip")
    assert "no-such-org/no-such-model-kvzip" in str(error.value)
    assert time.perf_counter() - start < 20  # the hub client's retries took ~55 s before


def test_answering_reaches_the_user_without_warnings(tiny_llama):
    """No FutureWarning (``past_key_values`` renamed ``cache``) nor any other warning from compress and answer."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache = kvzip_rag.compress(tiny_llama, "The harbour of Velmora was built in 1731 by Ansel Brask.", ratio=0.5)
        kvzip_rag.answer(tiny_llama, cache, "Who built the harbour?", max_new_tokens=4)
        conversation = kvzip_rag.Conversation(tiny_llama, cache)
        conversation.ask("Who built it?", max_new_tokens=3)
        conversation.add_turn("When?", "In 1731.")
