"""LangChain integration: behaviour of KVzipRetriever, ChatKVzip and the QA chain (tiny model, fast), and an LCEL
chain with the real default model on a SQuAD article (answers containing the gold answer, sources, streaming)."""

from __future__ import annotations

import asyncio
import re
import string
from operator import itemgetter

import pytest
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnablePassthrough

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever, create_kvzip_qa_chain
from test_langchain_standard import DOCUMENTS, build_index, tiny_model


@pytest.fixture(scope="module")
def index(smol_tokenizer, tmp_path_factory):
    return build_index(tiny_model(smol_tokenizer), DOCUMENTS, tmp_path_factory.mktemp("lc"))


# ------------------------------------------------------------------------------------------------ retriever


def test_retriever_documents_carry_segment_cache_and_document_metadata(index):
    docs = KVzipRetriever(qa=index, k=4).invoke("Who built the harbour of Velmora?")
    assert docs and len(docs) <= 4
    assert docs[0].metadata["doc_id"] == "harbour"  # the best match first
    for doc in docs:
        meta = doc.metadata
        assert doc.page_content in DOCUMENTS[meta["doc_id"]]
        assert meta["topic"] == meta["doc_id"]  # the document's own metadata
        assert isinstance(meta["cache_id"], int) and meta["segment_index"] == 0
        assert 0 < meta["ratio"] <= 1 and 0 < meta["bytes"] < meta["full_bytes"]
        assert meta["kv_bits"] == 16
        assert isinstance(meta["score"], float)
    scores = [d.metadata["score"] for d in docs]
    assert scores == sorted(scores, reverse=True)


def test_retriever_per_call_k_doc_ids_and_async(index):
    retriever = KVzipRetriever(qa=index, k=3)
    assert len(retriever.invoke("harbour", k=1)) == 1
    only = retriever.invoke("harbour", doc_ids=["orchard", "regatta"])
    assert {d.metadata["doc_id"] for d in only} == {"orchard", "regatta"}
    docs = asyncio.run(retriever.ainvoke("apples and cider"))
    assert docs[0].metadata["doc_id"] == "orchard"
    fallback = retriever.invoke("xylophone quantum zebra")  # nothing matches: the index's fallback, flagged
    assert fallback and all(d.metadata["routing"] == "fallback" and d.metadata["score"] == 0.0 for d in fallback)


# ----------------------------------------------------------------------------------------------- chat model


def test_chat_declares_missing_features_clearly(index):
    chat = ChatKVzip(qa=index)
    with pytest.raises(NotImplementedError, match="tool calling"):
        chat.bind_tools([])
    with pytest.raises(NotImplementedError, match="structured output"):
        chat.with_structured_output({"title": "x", "type": "object", "properties": {}})
    image = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                  {"type": "image", "url": "https://example.com/a.png"}])
    with pytest.raises(NotImplementedError, match="text only"):
        chat.invoke([image])
    with pytest.raises(NotImplementedError, match="tool"):
        chat.invoke([HumanMessage("hi"), AIMessage("", tool_calls=[{"name": "f", "args": {}, "id": "1"}]),
                     ToolMessage("3", tool_call_id="1"), HumanMessage("and?")])
    with pytest.raises(ValueError, match="end with a human message"):
        chat.invoke([HumanMessage("hi"), AIMessage("hello")])
    with pytest.raises(TypeError, match="unexpected"):
        chat.invoke("hi", frequency_penalty=1.0)
    with pytest.raises(ValueError, match="model"):
        chat.invoke("hi", model="gpt-4o")
    for stop in (3, ["Q:", 3], "Q:"):  # the engine's one-line check, not a TypeError from listing them
        with pytest.raises(InvalidArgumentError, match="stop must be a list of strings"):
            chat.invoke("hi", stop=stop, max_new_tokens=2)
    assert chat.invoke("hi", stop=["", "Q:"], max_new_tokens=2).response_metadata["finish_reason"]


def test_chat_routes_streams_and_reports_usage(index):
    chat = ChatKVzip(qa=index, max_new_tokens=6)
    chunks = list(chat.stream("Who built the harbour of Velmora?"))
    assert len([c for c in chunks if c.content]) >= 2  # token by token
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    message = chat.invoke("Who built the harbour of Velmora?")
    assert full.content == message.content  # same greedy answer either way
    meta, usage = message.response_metadata, message.usage_metadata
    assert meta["doc_ids"] == ["harbour"] and meta["routing"] == "search"
    assert meta["model_name"] == "tiny" and full.response_metadata["model_name"] == "tiny"
    assert meta["cache_bytes"] < meta["full_cache_bytes"] and 0 < meta["ratio"] <= 1
    assert meta["ttft_s"] > 0 and meta["decode_s"] >= 0 and meta["finish_reason"] in ("stop", "length")
    assert usage == full.usage_metadata
    assert usage["output_tokens"] <= 6
    assert usage["input_tokens"] > usage["input_token_details"]["cache_read"] == meta["document_tokens"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert chat.invoke("Who built the harbour?", max_tokens=2).usage_metadata["output_tokens"] <= 2


def test_chat_bound_documents_and_fallback(index):
    bound = ChatKVzip(qa=index, doc_ids=["orchard"], max_new_tokens=3)
    assert bound.invoke("Who built the harbour?").response_metadata["doc_ids"] == ["orchard"]
    unmatched = ChatKVzip(qa=index, max_new_tokens=3).invoke("xylophone quantum zebra")
    assert unmatched.response_metadata["routing"] == "fallback" and unmatched.content


def test_system_messages_are_folded_into_the_first_question(index):
    chat = ChatKVzip(qa=index, max_new_tokens=6)
    folded = chat.invoke([SystemMessage("Answer in one word."), HumanMessage("Who built the harbour?")])
    manual = chat.invoke("Answer in one word.\n\nWho built the harbour?")
    assert folded.content == manual.content
    assert folded.response_metadata["doc_ids"] == ["harbour"]  # routed by the human message, not the system one


def test_follow_up_turns_reuse_the_conversation_cache(index):
    chat = ChatKVzip(qa=index, max_new_tokens=6)
    first = chat.invoke("Who built the harbour?")
    history = [HumanMessage("Who built the harbour?"), first, HumanMessage("In which year?")]
    reused = chat.invoke(history)
    assert reused.response_metadata["reused_conversation"] is True
    assert reused.usage_metadata["input_token_details"]["cache_read"] > reused.response_metadata["document_tokens"]
    replayed = ChatKVzip(qa=index, max_new_tokens=6, reuse_conversations=0).invoke(history)
    assert replayed.response_metadata["reused_conversation"] is False
    assert replayed.content == reused.content  # replaying the turn gives the same cache tail
    assert replayed.usage_metadata["input_tokens"] == reused.usage_metadata["input_tokens"]


def test_a_follow_up_about_another_document_brings_it_into_the_conversation(index):
    chat = ChatKVzip(qa=index, max_new_tokens=6)
    first = chat.invoke("Who built the harbour?")
    assert first.response_metadata["node_ids"] == ["harbour:0"] and first.response_metadata["cache_change"] == "new"
    history = [HumanMessage("Who built the harbour?"), first, HumanMessage("When is the cider pressed?")]
    follow = chat.invoke(history)
    meta = follow.response_metadata
    assert meta["reused_conversation"] is True and meta["cache_change"] == "recomposed"
    assert meta["doc_ids"] == ["orchard", "harbour"] and meta["routed_node_ids"] == ["orchard:0"]
    assert meta["routing"] == "search" and meta["dropped"] == []
    # without the kept conversation the history is routed turn by turn and replayed: the same cache and answer
    replayed = ChatKVzip(qa=index, max_new_tokens=6, reuse_conversations=0).invoke(history)
    assert replayed.response_metadata["cache_change"] == "new"
    assert replayed.response_metadata["doc_ids"] == ["orchard", "harbour"] and replayed.content == follow.content
    assert replayed.usage_metadata == follow.usage_metadata


def test_a_conversation_lays_out_its_documents_by_compose(index):
    history = [HumanMessage("Who built the harbour?"), AIMessage("Ida."), HumanMessage("When is the cider pressed?")]
    default = ChatKVzip(qa=index, max_new_tokens=6).invoke(history)
    sequential = ChatKVzip(qa=index, max_new_tokens=6).bind(compose="sequential").invoke(history)
    assert default.response_metadata["compose"] == "parallel"
    assert sequential.response_metadata["compose"] == "sequential"
    assert sequential.response_metadata["doc_ids"] == default.response_metadata["doc_ids"] == ["orchard", "harbour"]
    assert sequential.response_metadata["cache_change"] == "new"
    # best-of-k answers retrieved segments separately; a conversation still needs one cache: parallel
    best = ChatKVzip(qa=index, max_new_tokens=6, compose="best-of-k").invoke(history)
    assert best.response_metadata["compose"] == "parallel" and best.content == default.content


def test_async_stream_stopped_early_releases_the_index_lock(index):
    chat = ChatKVzip(qa=index, max_new_tokens=50)

    async def first_chunk():
        stream = chat.astream("Who built the harbour?")
        async for chunk in stream:
            await stream.aclose()
            return chunk

    assert asyncio.run(first_chunk()).content
    assert index.lock.acquire(timeout=10)  # the worker thread closed the generator and let go
    index.lock.release()

    async def concurrent():
        return await asyncio.gather(*(chat.ainvoke(q, max_tokens=3) for q in ["harbour", "apples", "lighthouse"]))

    assert [m.response_metadata["doc_ids"] for m in asyncio.run(concurrent())] == [["harbour"], ["orchard"],
                                                                                   ["lighthouse"]]


# ------------------------------------------------------------------------------------------------- QA chain


def test_qa_chain_invoke_batch_stream_async_and_composition(index):
    chain = create_kvzip_qa_chain(index, k=2, max_new_tokens=5)
    out = chain.invoke("Who built the harbour?")
    assert set(out) == {"answer", "sources", "abstained", "unsupported_numbers"} and out["answer"]
    assert len(out["sources"]) == 2 and all(isinstance(d, Document) for d in out["sources"])
    assert out["sources"][0].metadata["doc_id"] == "harbour"
    # k > 1: by default one answer from both caches joined (parallel), every source marked as composed.
    assert all(d.metadata["composed"] is True and "chosen" not in d.metadata for d in out["sources"])
    targets = [(d.metadata["doc_id"], d.metadata["segment_index"]) for d in out["sources"]]
    assert out["answer"] == index.answer("Who built the harbour?", targets=targets, compose="parallel",
                                         max_new_tokens=5).text
    assert chain.invoke({"question": "Who built the harbour?"}) == out
    assert chain.batch(["Who built the harbour?", {"question": "apples and cider"}])[0] == out
    assert asyncio.run(chain.ainvoke("Who built the harbour?")) == out
    assert asyncio.run(chain.abatch(["Who built the harbour?"])) == [out]

    chunks = list(chain.stream("Who built the harbour?"))
    assert len(chunks) >= 3 and all(set(c) == {"answer"} for c in chunks[:-1])
    assert set(chunks[-1]) == {"sources", "abstained", "unsupported_numbers"}
    assert "".join(c["answer"] for c in chunks[:-1]) == out["answer"] and chunks[-1]["sources"] == out["sources"]

    async def astream():
        return [c async for c in chain.astream({"question": "Who built the harbour?"})]

    assert asyncio.run(astream()) == chunks

    # Composition with other Runnables.
    text = chain.pick("answer") | StrOutputParser()
    assert list(text.stream("Who built the harbour?")) == [c["answer"] for c in chunks[:-1]]
    assert (chain | itemgetter("answer")).invoke("Who built the harbour?") == out["answer"]
    assert ({"question": RunnablePassthrough()} | chain).invoke("Who built the harbour?") == out
    prompt = PromptTemplate.from_template("Who built the {place}?")
    assert (prompt | chain).invoke({"place": "harbour"}) == out
    with_question = RunnablePassthrough.assign(result=chain) | RunnableLambda(
        lambda d: f'{d["question"]} -> {d["result"]["answer"]}')
    assert with_question.invoke({"question": "Who built the harbour?"}).endswith(out["answer"])
    with pytest.raises(ValueError, match="question"):
        chain.invoke({"topic": "harbour"})


def test_qa_chain_compose_by_name_when_built_and_per_call(index):
    """best-of-k stays selectable (constructor, or one call's ``configurable``); a bad name is a clear error."""
    question = "Who built the harbour?"
    best = create_kvzip_qa_chain(index, k=2, compose="best-of-k", max_new_tokens=5).invoke(question)
    # each source's cache answered on its own; the best answer was kept, and each source says which
    assert sum(d.metadata["chosen"] for d in best["sources"]) == 1
    assert next(d for d in best["sources"] if d.metadata["chosen"]).metadata["answer"] == best["answer"]
    assert all("composed" not in d.metadata for d in best["sources"])
    chain = create_kvzip_qa_chain(index, k=2, max_new_tokens=5)
    assert chain.invoke(question, config={"configurable": {"compose": "best-of-k"}}) == best
    sequential = chain.invoke(question, config={"configurable": {"compose": "sequential"}})
    targets = [(d.metadata["doc_id"], d.metadata["segment_index"]) for d in sequential["sources"]]
    assert sequential["answer"] == index.answer(question, targets=targets, compose="sequential",
                                                max_new_tokens=5).text
    with pytest.raises(ValueError, match="unknown compose='bogus'; choose one of .*best-of-k.*parallel"):
        create_kvzip_qa_chain(index, k=2, compose="bogus")
    with pytest.raises(ValueError, match="unknown compose='bogus'"):
        chain.invoke(question, config={"configurable": {"compose": "bogus"}})
    one = create_kvzip_qa_chain(index, k=1, max_new_tokens=5).invoke(question)  # k == 1: unchanged, no marks
    assert len(one["sources"]) == 1 and set(one["sources"][0].metadata) == set(best["sources"][0].metadata) - {
        "answer", "mean_logprob", "refusal", "chosen"}


# ------------------------------------------------------------------- the Documents link the retriever to the caches


def test_a_prompt_carrying_segment_documents_is_answered_from_their_caches(index):
    """The chat model reads the Documents a prompt template wrote into the prompt, by their doc_id/segment_index
    metadata (no memory of what a retriever handed out): Documents made anywhere work, text without them is a
    plain question, and Documents of segments this store lacks stay text."""
    prompt = ChatPromptTemplate.from_template("Answer from the context only.\n{context}\n\nQuestion: {question}")
    chat = ChatKVzip(qa=index, max_new_tokens=4)
    question = "Who built the harbour?"
    by_hand = Document(page_content=DOCUMENTS["harbour"], metadata={"doc_id": "harbour", "segment_index": 0})
    meta = chat.invoke(prompt.invoke({"context": [by_hand], "question": question})).response_metadata
    assert meta["cached_documents"] == 1 and meta["doc_ids"] == ["harbour"]
    expected = index.answer("Answer from the context only.\n\nQuestion: " + question, targets=[("harbour", 0)],
                            max_new_tokens=4).text
    assert chat.invoke(prompt.invoke({"context": [by_hand], "question": question})).content == expected
    retrieved = KVzipRetriever(qa=index, k=2).invoke(question)
    text_only = "\n\n".join(d.page_content for d in retrieved)  # the Documents' identity is gone
    plain = chat.invoke(prompt.invoke({"context": text_only, "question": question})).response_metadata
    assert "cached_documents" not in plain and plain["cache_change"] == "new"
    elsewhere = Document(page_content="The moon is made of cheese.", metadata={"doc_id": "moon", "segment_index": 0})
    mixed = chat.invoke(prompt.invoke({"context": [elsewhere, *retrieved], "question": question})).response_metadata
    assert mixed["cached_documents"] == 2 and "moon" not in mixed["doc_ids"]


def test_answers_and_sources_carry_their_grounding(index):
    """``citations``/``abstained`` in every chat answer's response_metadata; the QA chain's sources carry their
    cited spans once an answer has evidence (a real answer given spans of the stored text) or abstained."""
    from kvzip_rag.answers import Citation
    from kvzip_rag.integrations.langchain._service import segment_documents, with_grounding

    question = "Who built the harbour?"
    meta = ChatKVzip(qa=index, max_new_tokens=3, evidence=False).invoke(question).response_metadata
    assert meta["citations"] == [] and meta["abstained"] is False
    chain_out = create_kvzip_qa_chain(index, k=2, max_new_tokens=3, evidence=False).invoke(question)
    assert all("citations" not in d.metadata for d in chain_out["sources"])  # no evidence recorded: unchanged
    result = index.answer(question, k=2, max_new_tokens=3)
    stored = index.store.get_document("harbour").segments[0].text
    start = stored.index("Ansel Brask")
    result.citations = [Citation("harbour", 0, start, start + 11, stored[start:start + 11], 0.9)]
    sources = with_grounding(segment_documents(index, result.targets), result)
    by_id = {d.id: d.metadata for d in sources}
    assert by_id["harbour:0"]["citations"] == [result.citations[0].as_dict()]
    assert by_id["harbour:0"]["citations"][0]["text"] == "Ansel Brask" and by_id["harbour:0"]["abstained"] is False
    assert all(m["citations"] == [] for i, m in by_id.items() if i != "harbour:0") and len(by_id) == 2
    result.citations, result.abstained = [], True
    assert all(d.metadata["abstained"] is True and d.metadata["citations"] == []
               for d in with_grounding(segment_documents(index, result.targets), result))


def test_grounding_options_reach_the_service(index):
    """answer_style / abstain_threshold set on the chat model or the chain are handed to the service (which checks
    them); bad sampling options still fail when the chain is built."""
    for run in (lambda: ChatKVzip(qa=index, max_new_tokens=3, answer_style="quote").invoke("Who built the harbour?"),
                lambda: create_kvzip_qa_chain(index, abstain_threshold=0.5, max_new_tokens=3).invoke("harbour")):
        try:
            run()
        except (ValueError, TypeError) as error:  # a service without the option refuses it by name
            assert "answer_style" in str(error) or "abstain_threshold" in str(error)
    assert "answer_style" not in ChatKVzip(qa=index)._options(None, {})[0]  # not set: the service's default
    with pytest.raises(ValueError, match="unknown answer option"):
        create_kvzip_qa_chain(index, max_new_tokens=3, temprature=0.1)


# -------------------------------------------------------------------------------- real model on SQuAD


def _normalize(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


@pytest.mark.slow
def test_lcel_chain_answers_squad_questions_with_the_default_model(default_model, squad, tmp_path):
    article = squad[0]
    paragraphs, text = [], ""
    for paragraph in article["paragraphs"]:  # whole paragraphs until about 1K tokens
        paragraphs.append(paragraph)
        text = "\n\n".join(p["context"] for p in paragraphs)
        if len(default_model.encode(text)) >= 1000:
            break
    index = build_index(default_model, {article["title"]: text}, tmp_path)
    qa = create_kvzip_qa_chain(index, k=1, max_new_tokens=32)
    chain = {"question": RunnablePassthrough()} | qa  # question string in, {"answer", "sources"} out

    questions = [p["qas"][0] for p in paragraphs[:6]]  # the first question of each of the first six paragraphs
    outputs = chain.batch([q["question"] for q in questions], config={"max_concurrency": 1})
    correct = 0
    for q, out in zip(questions, outputs):
        gold = [a["text"] for a in q["answers"]]
        ok = any(_normalize(g) in _normalize(out["answer"]) for g in gold)
        correct += ok
        print(f"{'OK ' if ok else 'MISS'} {q['question']!r} -> {out['answer']!r} (gold {gold[0]!r})")
        assert out["sources"] and out["sources"][0].metadata["doc_id"] == article["title"]
        assert out["sources"][0].page_content in text
    rate = correct / len(questions)
    print(f"gold-answer rate over {len(questions)} questions ({article['title']}, "
          f"{len(default_model.encode(text))} tokens): {rate:.2f}")
    assert rate >= 1 / 6  # loose floor: SmolLM2-135M is a small model

    answer_only = chain.pick("answer") | StrOutputParser()
    pieces = list(answer_only.stream(questions[0]["question"]))
    assert len(pieces) >= 3 and "".join(pieces) == outputs[0]["answer"]


@pytest.mark.slow
def test_a_chat_follows_its_topic_to_another_document_with_the_default_model(default_model, tmp_path):
    """Asked about the orchard, then about the bridge: the second answer comes from the bridge's document (the
    conversation's cache stayed on the orchard's, the model does not know the colour)."""
    import kvzip_rag

    index = build_index(default_model, {
        "apple": "Apples ripen in the orchard of Brindle Farm every September. The oldest tree of the orchard was "
                 "planted by Mara Venn.",
        "bridge": "The Tallow Bridge crosses the river Esk. The town council painted the Tallow Bridge green in 1990.",
    }, tmp_path)
    chat = ChatKVzip(qa=index, max_new_tokens=24)
    orchard, bridge = "Who planted the oldest tree of the orchard?", "What colour is the Tallow Bridge?"
    first = chat.invoke(orchard)
    assert "Venn" in first.content and first.response_metadata["doc_ids"] == ["apple"]
    second = chat.invoke([HumanMessage(orchard), first, HumanMessage(bridge)])
    print(f"{orchard!r} -> {first.content!r}; {bridge!r} -> {second.content!r}")
    assert "green" in second.content.lower()
    assert second.response_metadata["doc_ids"] == ["bridge", "apple"]
    assert second.response_metadata["cache_change"] == "recomposed"
    stayed = kvzip_rag.Conversation(default_model, index.load(("apple", 0))[0])
    stayed.add_turn(orchard, first.content)
    assert "green" not in stayed.ask(bridge, max_new_tokens=24).text.lower()


def test_quantized_store_serves_the_adapters(smol_tokenizer, tmp_path):
    """A store built with ``kv_bits=4``: the retriever reports the bits and fewer bytes than a 16-bit store, and the
    QA chain answers from the 4-bit caches exactly as the service does."""
    from kvzip_rag.qa import QAService
    from kvzip_rag.store import CacheStore

    model = tiny_model(smol_tokenizer)
    plain = build_index(model, DOCUMENTS, tmp_path / "plain")
    store = CacheStore(tmp_path / "q4")
    for doc_id, text in DOCUMENTS.items():
        store.add_document(model, text, doc_id=doc_id, metadata={"topic": doc_id}, ratio=0.3, kv_bits=4)
    qa = QAService(store, model, ratio=0.3)
    question = "Who built the harbour of Velmora?"
    quantized, = KVzipRetriever(qa=qa, k=1).invoke(question)
    unquantized, = KVzipRetriever(qa=plain, k=1).invoke(question)
    assert quantized.metadata["kv_bits"] == 4 and quantized.metadata["doc_id"] == "harbour"
    assert quantized.metadata["bytes"] < 0.5 * unquantized.metadata["bytes"]
    expected = qa.answer(question, max_new_tokens=6).text
    assert create_kvzip_qa_chain(qa, k=1, max_new_tokens=6).invoke(question)["answer"] == expected
