"""The langchain-tests standard suites, run for real against KVzipRetriever and ChatKVzip.

A tiny random-weight Llama (2 layers, hidden 64) with the real SmolLM2 tokenizer keeps them fast; its answers are
gibberish, which is all these suites need (they check the protocol: types, streaming, usage, async, batching).
Features ChatKVzip does not have are declared absent here, not faked: tool calling, tool choice, structured output,
JSON mode, image/audio/video/PDF inputs, model override per call, serialisation. Answer quality is tested in
test_langchain.py with the real model.
"""

from __future__ import annotations

import pytest
import torch
from langchain_core.messages import AIMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

import kvzip_rag
from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever
from kvzip_rag.qa import QAService
from kvzip_rag.store import CacheStore

DOCUMENTS = {
    "harbour": (
        "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. It has two breakwaters, the northern "
        "one made of granite and the southern one of basalt. Ferries leave the harbour for the island of Tessin every "
        "morning at seven."
    ),
    "orchard": (
        "The orchard on Mill Hill grows forty-two varieties of apple. Cider is pressed every October in a barn beside "
        "the river, and the apples are carried there from the harbour road on carts."
    ),
    "lighthouse": (
        "The lighthouse at the end of the northern breakwater is painted red and white. Its lamp can be seen from "
        "eighteen nautical miles away, and ships entering the harbour steer by it at night."
    ),
    "regatta": (
        "Every August the town holds a regatta in which fishing boats race around the harbour, and the winner "
        "receives a silver anchor made by the blacksmith of Velmora."
    ),
}

_STATE: dict = {}


def tiny_model(tokenizer) -> kvzip_rag.KVzipModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    return kvzip_rag.wrap_model(LlamaForCausalLM(config), tokenizer, name="tiny")


def build_index(model, documents: dict[str, str], path) -> QAService:
    """A QA service over a store holding ``documents`` (id -> text) under ``path`` (no LlamaIndex involved)."""
    store = CacheStore(path)
    for doc_id, text in documents.items():
        store.add_document(model, text, doc_id=doc_id, metadata={"topic": doc_id}, ratio=0.3)
    return QAService(store, model, ratio=0.3)


@pytest.fixture(scope="module", autouse=True)
def tiny_index(smol_tokenizer, tmp_path_factory):
    """Built once for this module; the suites' constructor params read it from ``_STATE``."""
    _STATE["index"] = build_index(tiny_model(smol_tokenizer), DOCUMENTS, tmp_path_factory.mktemp("lc-standard"))
    yield _STATE["index"]
    _STATE.clear()


class TestKVzipRetrieverStandard(RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[KVzipRetriever]:
        return KVzipRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"qa": _STATE["index"], "k": 2}

    @property
    def retriever_query_example(self) -> str:
        # Every document mentions the harbour, so full-text search finds at least the 3 the suite asks for.
        return "What happens in the harbour?"


class _ChatKVzipConfig:
    """What ChatKVzip declares, shared by the unit and integration suites."""

    @property
    def chat_model_class(self) -> type[ChatKVzip]:
        return ChatKVzip

    @property
    def chat_model_params(self) -> dict:
        return {"qa": _STATE["index"], "max_new_tokens": 8}

    @property
    def has_tool_calling(self) -> bool:
        return False  # bind_tools is overridden only to raise a clear NotImplementedError

    @property
    def has_tool_choice(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False  # with_structured_output raises NotImplementedError

    @property
    def supports_json_mode(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return False

    @property
    def supports_image_urls(self) -> bool:
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        return False

    @property
    def supports_video_inputs(self) -> bool:
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        return False

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # the caches belong to the index's model; another model name is refused

    @property
    def supported_usage_metadata_details(self) -> dict:
        # The document's tokens are served from its compressed cache: reported as cache_read input tokens.
        return {"invoke": ["cache_read_input"], "stream": ["cache_read_input"]}


class TestChatKVzipUnit(_ChatKVzipConfig, ChatModelUnitTests):
    pass


class TestChatKVzipIntegration(_ChatKVzipConfig, ChatModelIntegrationTests):
    def invoke_with_cache_read_input(self, *, stream: bool = False) -> AIMessage:
        model = ChatKVzip(**self.chat_model_params)
        question = "Who built the harbour of Velmora?"
        if not stream:
            return model.invoke(question)
        full = None
        for chunk in model.stream(question):
            full = chunk if full is None else full + chunk
        return full
