"""KVzipLLM: LlamaIndex's own engines (RetrieverQueryEngine.from_args, condense-question chat, RouterQueryEngine,
SubQuestionQueryEngine) run offline over the local model via ``Settings.llm`` (no OpenAI package involved)."""

from __future__ import annotations

import asyncio

import pytest
from llama_index.core import Document, Settings
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.chat_engine import CondenseQuestionChatEngine
from llama_index.core.llms import ChatMessage
from llama_index.core.query_engine import RetrieverQueryEngine, RouterQueryEngine, SubQuestionQueryEngine
from llama_index.core.question_gen import LLMQuestionGenerator
from llama_index.core.tools import QueryEngineTool

from kvzip_rag.integrations.llamaindex import KVzipIndex, KVzipLLM

HARBOUR = "The harbour of Velmora was built in 1731 by the engineer Ansel Brask."
BAKERY = "The bakery on Mill Street opens at six in the morning and sells rye bread."


@pytest.fixture()
def llm_settings():
    before = Settings._llm
    yield Settings
    Settings._llm = before


def test_completion_chat_streaming_async_and_callbacks(tiny_llama):
    debug = LlamaDebugHandler()
    llm = KVzipLLM(tiny_llama, max_new_tokens=6, callback_manager=CallbackManager([debug]))
    text = llm.complete("Say hello.").text
    pieces = list(llm.stream_complete("Say hello."))
    assert pieces and pieces[-1].text.strip() == text and "".join(p.delta for p in pieces).strip() == text
    reply = llm.chat([ChatMessage(role="system", content="Be brief."), ChatMessage(role="user", content="Hi")])
    assert reply.message.role.value == "assistant"
    assert asyncio.run(llm.acomplete("Say hello.")).text == text
    streamed = asyncio.run(_collect(llm.astream_chat([ChatMessage(role="system", content="Be brief."),
                                                      ChatMessage(role="user", content="Hi")])))
    assert streamed and streamed[-1].message.content.strip() == reply.message.content.strip()
    pairs = debug.get_event_pairs(CBEventType.LLM)
    assert len(pairs) >= 3
    usage = pairs[0][1].payload["completion"].raw["usage"]
    assert usage["completion_tokens"] >= 1 and usage["prompt_tokens"] > 3


async def _collect(agen):
    stream = await agen
    return [item async for item in stream]


def test_retriever_query_engine_from_args_and_condense_question_chat(tiny_llama, tmp_path, llm_settings):
    llm_settings.llm = KVzipLLM(tiny_llama, max_new_tokens=6)
    index = KVzipIndex.from_documents([Document(text=HARBOUR, id_="harbour"), Document(text=BAKERY, id_="bakery")],
                                      model=tiny_llama, store=tmp_path / "store")
    engine = RetrieverQueryEngine.from_args(index.as_retriever())  # LlamaIndex's synthesizer, our LLM
    response = engine.query("Who built the harbour?")
    assert response.response and response.source_nodes[0].node.node_id == "harbour:0"
    chat = CondenseQuestionChatEngine.from_defaults(query_engine=index.as_query_engine(max_new_tokens=4))
    first = chat.chat("Who built the harbour?")
    second = chat.chat("And when?")  # condensed by KVzipLLM, then answered from a compressed cache
    assert first.response is not None and second.response is not None and len(chat.chat_history) == 4


@pytest.mark.slow
def test_router_and_sub_question_engines_with_the_default_model(default_model, tmp_path, llm_settings):
    llm_settings.llm = KVzipLLM(default_model, max_new_tokens=96)
    sea = KVzipIndex.from_documents([Document(text=HARBOUR, id_="harbour")], model=default_model,
                                    store=tmp_path / "sea")
    town = KVzipIndex.from_documents([Document(text=BAKERY, id_="bakery")], model=default_model,
                                     store=tmp_path / "town")
    tools = [
        QueryEngineTool.from_defaults(sea.as_query_engine(max_new_tokens=16), name="sea",
                                      description="Questions about the harbour"),
        QueryEngineTool.from_defaults(town.as_query_engine(max_new_tokens=16), name="town",
                                      description="Questions about the bakery and bread"),
    ]
    router = RouterQueryEngine.from_defaults(query_engine_tools=tools)  # LLMSingleSelector over KVzipLLM
    response = router.query("When does the bakery open?")
    # The selector ran on the local model (which tool it picks is that 135M model's judgement); the chosen
    # tool answered from its compressed cache.
    assert response.metadata["selector_result"].selections and "ttft_s" in response.metadata
    assert response.source_nodes[0].node.ref_doc_id in ("bakery", "harbour")
    # LlamaIndex picks an OpenAI question generator unless told otherwise; with LLMQuestionGenerator the
    # engine runs offline. Whether a 135M model writes the JSON that generator parses is the model's limit.
    engine = SubQuestionQueryEngine.from_defaults(query_engine_tools=tools, use_async=False,
                                                  question_gen=LLMQuestionGenerator.from_defaults())
    try:
        answer = engine.query("When does the bakery open, and who built the harbour?")
    except ValueError as error:
        assert "JSON" in str(error)  # not an import error: the model ran and its output was not JSON
        pytest.xfail(f"SmolLM2-135M does not write the sub-question JSON: {error}")
    assert answer.response
