"""KVzipLLM: LlamaIndex's own engines (RetrieverQueryEngine.from_args, condense-question chat, RouterQueryEngine,
SubQuestionQueryEngine with KVzipQuestionGenerator) run offline over the local model via ``Settings.llm`` (no OpenAI
package involved)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from llama_index.core import Document, Settings
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler
from llama_index.core.chat_engine import CondenseQuestionChatEngine
from llama_index.core.llms import ChatMessage, MockLLM
from llama_index.core.prompts import PromptTemplate
from llama_index.core.query_engine import RetrieverQueryEngine, RouterQueryEngine, SubQuestionQueryEngine
from llama_index.core.schema import QueryBundle
from llama_index.core.tools import QueryEngineTool, ToolMetadata

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.integrations.llamaindex import KVzipIndex, KVzipLLM, KVzipQuestionGenerator
from kvzip_rag.integrations.llamaindex.question_gen import TOOL_CONTEXT, split_questions

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
    for prompt, reason in ((None, "prompt is empty"), (7, "prompt is a string, got int"), ("\ud800", "lone surrogate")):
        with pytest.raises(InvalidArgumentError, match=reason):  # one line, before the tokenizer or template
            llm.complete(prompt)
    for options, reason in (({"temperature": "hot"}, "temperature"), ({"max_tokens": 2.5}, "max_new_tokens")):
        with pytest.raises(InvalidArgumentError, match=reason):
            llm.complete("Say hello.", **options)


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
def test_router_and_sub_question_engines_with_the_default_model(default_model, tmp_path, llm_settings, caplog):
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
    # SubQuestionQueryEngine over the same LLM: the question is split into its two questions, and each is routed
    # by likelihood to the tool whose description it matches.
    question = "When does the bakery open, and who built the harbour?"
    generator = KVzipQuestionGenerator(llm_settings.llm)
    subs = generator.generate([tool.metadata for tool in tools], QueryBundle(question))
    by_tool = {sub.tool_name: sub.sub_question.lower() for sub in subs}
    assert len(subs) == 2 and "harbour" in by_tool["sea"] and "bakery" in by_tool["town"], subs
    engine = SubQuestionQueryEngine.from_defaults(query_engine_tools=tools, question_gen=generator, use_async=False)
    answer = engine.query(question)
    assert answer.response
    assert {n.node.ref_doc_id for n in answer.source_nodes} >= {"harbour", "bakery"}  # both caches answered
    # A split that is not a list of questions is not trusted: the question is asked as written, with a warning.
    words = KVzipQuestionGenerator(llm_settings.llm, prompt=PromptTemplate("Write one word about: {query_str}"))
    with caplog.at_level(logging.WARNING):
        asked = words.generate([tool.metadata for tool in tools], QueryBundle(question))
    assert [sub.sub_question for sub in asked] == [question] and "asking it as written" in caplog.text


def test_split_questions_accepts_only_lists_of_questions():
    assert split_questions("Who built it?\n\n  When did it open? \nWho built it?") == ["Who built it?",
                                                                                      "When did it open?"]
    for text in ("Who built it?", "", "Who built it?\nWhen did it", "Who built it?\nThe harbour.",
                 '[{"sub_question": "Who built it?"}]'):
        assert split_questions(text) is None, text


def test_question_generator_routes_by_likelihood_on_the_given_llm(tiny_llama):
    llm = KVzipLLM(tiny_llama, max_new_tokens=8)
    lp = llm.logprob("The harbour was built", " in 1731 by Ansel")
    assert lp < 0 and lp == pytest.approx(llm.logprob("The harbour was built", " in 1731")
                                          + llm.logprob("The harbour was built in 1731", " by Ansel"), abs=1e-3)
    with pytest.raises(InvalidArgumentError, match="non-empty"):
        llm.logprob("", " text")
    generator = KVzipQuestionGenerator(llm, max_tokens=24)
    tools = [ToolMetadata(name="sea", description="Questions about the harbour"),
             ToolMetadata(name="town", description="Questions about the bakery")]
    subs = generator.generate(tools, QueryBundle("Who built the harbour?"))
    assert subs and all(sub.tool_name in ("sea", "town") and sub.sub_question.endswith("?") for sub in subs)
    for sub in subs:  # each question went to the tool under which the model finds it more likely
        scores = {t.name: llm.logprob(TOOL_CONTEXT.format(description=t.description), " " + sub.sub_question)
                  for t in tools}
        assert scores[sub.tool_name] == max(scores.values())
    assert asyncio.run(generator.agenerate(tools, QueryBundle("Who built the harbour?"))) == subs
    assert generator.generate([], QueryBundle("Who built the harbour?")) == []
    with pytest.raises(InvalidArgumentError, match="KVzipLLM"):
        KVzipQuestionGenerator(MockLLM())


def test_a_base_model_reads_chat_messages_in_the_question_answer_layout(tiny_llama):
    """A tokenizer without a chat template: KVzipLLM's prompt is kvzip_rag.prompt's base-model layout (the one the
    caches use), not a layout of its own; with a template, the template's."""
    import copy

    from kvzip_rag.integrations.llamaindex.llm import _messages_text
    from kvzip_rag.prompt import PromptTemplate, chat_text

    base = copy.copy(tiny_llama.tokenizer)
    base.chat_template = None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who built it?"},
                {"role": "assistant", "content": "Ansel."}, {"role": "user", "content": "When?"}]
    layout = PromptTemplate.from_tokenizer(base)
    assert chat_text(base, messages) == (
        f"{base.bos_token or ''}Question: Be brief.\n\nWho built it?{layout.suffix} Ansel."
        f"{layout.turn_separator}When?{layout.suffix}")
    assert layout.suffix == "\nAnswer:" and layout.turn_separator == "\n\nQuestion: "
    llm = KVzipLLM(tiny_llama, max_new_tokens=3)
    chat = [ChatMessage(role=m["role"], content=m["content"]) for m in messages]
    assert _messages_text(tiny_llama, chat) == tiny_llama.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True) == llm.messages_to_prompt(chat)

