"""The core QA service and what every interface gets from it: the same routing and answers through the CLI,
LlamaIndex and LangChain; composition strategies by name; the thread policy through every entry point; tracing
events; query-engine options; the idiomatic LangChain RAG chain answered from the caches (tiny model)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import kvzip_rag
from kvzip_rag.cli import app
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import COMPOSERS, DEFAULT_COMPOSE, BestOfK, Composer, QAService, get_composer, register_composer
from kvzip_rag.store import CacheStore
from test_cli import WIDE, tiny_model_dir  # noqa: F401  (fixture)

DOCS = {
    "harbour.txt": "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. Ferries leave the harbour "
                   "for the island of Tessin every morning at seven.",
    "lighthouse.txt": "The lighthouse beside the harbour is painted red and white. Its keeper, Ida Holm, wrote a "
                      "ledger every night and watched the harbour lights.",
    "regatta.txt": "Every August the town holds a regatta in which fishing boats race around the harbour; the "
                   "winner receives a silver anchor.",
    "bakery.txt": "The bakery on Mill Street opens at six and sells rye bread and cinnamon buns.",
}
QUESTION = "Who watched the harbour lights of Velmora?"


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):  # noqa: F811
    return kvzip_rag.load_model(str(tiny_model_dir), threads=1)


@pytest.fixture(scope="module")
def filled(tmp_path_factory, tiny_model_dir):  # noqa: F811
    """A store filled through the CLI (the way a user would), and its folder of documents."""
    folder = tmp_path_factory.mktemp("qa-docs")
    for name, text in DOCS.items():
        (folder / name).write_text(text)
    store = tmp_path_factory.mktemp("qa-store")
    result = CliRunner(env=WIDE).invoke(app, ["--store", str(store), "--model", str(tiny_model_dir), "index",
                                              str(folder)])
    assert result.exit_code == 0, result.output
    return store, folder


def _cli_sources(stderr: str) -> list[str]:
    block = stderr.split("sources", 1)[1].split("timings", 1)[0]
    return re.findall(r"^(\S+) segment \d+", block, flags=re.M)


@pytest.mark.parametrize("compose", [None, "best-of-k"])
def test_cli_llamaindex_and_langchain_give_the_same_answer_and_sources(filled, tiny, tiny_model_dir,  # noqa: F811
                                                                     compose):
    """k=3 through every interface: by default one answer from the 3 caches composed (parallel), every routed
    segment a source marked composed; best-of-k stays selectable by name in each, the kept answer marked. (Evidence
    off: with it, sources are the cited spans, compared in test_evidence.)"""
    from llama_index.core import Document

    from kvzip_rag.integrations.langchain import create_kvzip_qa_chain
    from kvzip_rag.integrations.llamaindex import KVzipIndex

    store, _ = filled
    chosen_by = ["--compose", compose] if compose else []
    cli = CliRunner(env=WIDE).invoke(app, ["--store", str(store), "--model", str(tiny_model_dir), "ask", QUESTION,
                                           "--k", "3", "--max-tokens", "6", "--no-evidence", *chosen_by])
    assert cli.exit_code == 0, cli.output
    cli_answer, cli_sources = cli.stdout.strip(), _cli_sources(cli.stderr)

    index = KVzipIndex.from_documents([Document(text=t, id_=d) for d, t in DOCS.items()], model=tiny,
                                      store=CacheStore(store))
    options = {"compose": compose, "evidence": False} if compose else {"evidence": False}
    response = index.as_query_engine(similarity_top_k=3, max_new_tokens=6, **options).query(QUESTION)
    chain = create_kvzip_qa_chain(str(store), k=3, model=tiny, max_new_tokens=6, **options)
    out = chain.invoke(QUESTION)

    li_sources = [n.node.metadata["doc_id"] for n in response.source_nodes]
    lc_sources = [d.metadata["doc_id"] for d in out["sources"]]
    assert len(cli_sources) == 3 and cli_sources == li_sources == lc_sources
    assert cli_answer == response.response.strip() == out["answer"].strip()
    meta = response.metadata
    if compose is None:  # the default: the 3 caches joined, one answer, no winner to mark
        service = QAService(str(store), tiny)
        assert service.composer.name == meta["compose"] == "parallel" and meta["strategy"] == "composed-parallel"
        assert response.response == service.answer(QUESTION, k=3, max_new_tokens=6).text
        assert meta["composed_node_ids"] == [n.node.node_id for n in response.source_nodes]
        assert meta["dropped_node_ids"] == [] and len(meta["answers"]) == 1
        assert all(n.node.metadata["composed"] and "chosen" not in n.node.metadata for n in response.source_nodes)
        assert all(d.metadata["composed"] and "chosen" not in d.metadata for d in out["sources"])
        assert "(parallel: one answer from 3 caches joined)" in cli.stderr and "← answer" not in cli.stderr
    else:
        assert meta["compose"] == "best-of-k" and meta["strategy"] == "best-mean-logprob"
        assert len(meta["answers"]) == 3 and "← answer" in cli.stderr  # best of 3, the winner marked
        chosen = meta["chosen_node_id"].split(":")[0]
        assert next(d for d in out["sources"] if d.metadata["chosen"]).metadata["doc_id"] == chosen
        assert [n.node.metadata["chosen"] for n in response.source_nodes] == [d == chosen for d in li_sources]
        winner = next(line for line in cli.stderr.splitlines() if "← answer" in line)
        assert winner.startswith(f"{chosen} segment")


def test_best_of_k_is_one_strategy_among_others(filled, tiny):
    store, _ = filled
    qa = QAService(str(store), tiny)
    assert isinstance(get_composer("best-of-k"), BestOfK)
    with pytest.raises(InvalidArgumentError, match="best-of-k"):
        QAService(str(store), tiny, compose="diagonal")

    @register_composer
    class FirstOnly(Composer):  # a composition strategy plugs in by name, without touching the service
        name = "first-only-test"

        def answer(self, service, question, targets, sampling, emit):
            return BestOfK().answer(service, question, targets[:1], sampling, emit)

    first = qa.answer(QUESTION, k=3, compose="first-only-test", max_new_tokens=4)
    alone = qa.answer(QUESTION, k=1, max_new_tokens=4)
    assert len(first.answers) == 1 and first.text == alone.text and first.best.doc_id == alone.best.doc_id
    best = qa.answer(QUESTION, k=3, compose="best-of-k", max_new_tokens=4)
    assert len(best.answers) == 3 and best.metadata()["strategy"] == "best-mean-logprob"
    assert best.metadata()["compose"] == "best-of-k"
    composed = qa.answer(QUESTION, k=3, max_new_tokens=4)  # the default strategy
    assert DEFAULT_COMPOSE == "parallel" and composed.metadata()["strategy"] == "composed-parallel"
    assert len(composed.answers) == 1 and len(composed.used) == 3
    for name in COMPOSERS:  # k == 1: one cache answers as it is, whatever the strategy
        one = qa.answer(QUESTION, k=1, compose=name, max_new_tokens=4)
        assert (one.text, one.metadata()["strategy"]) == (alone.text, "single")
        assert one.best.also == () and one.best.dropped == () and one.compose == name
    with pytest.raises(InvalidArgumentError, match="empty"):
        qa.answer("   ")
    with pytest.raises(InvalidArgumentError, match="unknown answer option"):
        qa.answer(QUESTION, temprature=1.0)
    with pytest.raises(kvzip_rag.DocumentNotFoundError):
        qa.answer(QUESTION, doc_ids=["nope"])
    name = next(iter(DOCS))
    for wrong, reason in (({"doc_ids": 3}, "doc_ids is a document id"), ({"doc_ids": [name, None]}, "is a string"),
                          ({"targets": 3}, "targets is a list"), ({"targets": [(name, 2**63)]}, "segment index"),
                          ({"targets": [(3, 0)]}, "document id")):  # one line each, never a TypeError or SQL error
        with pytest.raises(InvalidArgumentError, match=reason):
            qa.answer(QUESTION, max_new_tokens=2, **wrong)
    assert qa.answer(QUESTION, targets=[(name, 0)], max_new_tokens=2).used[0].doc_id == name


def test_stream_stopped_early_releases_the_lock(filled, tiny):
    store, _ = filled
    qa = QAService(str(store), tiny)
    stream = iter(qa.stream(QUESTION, max_new_tokens=40))
    next(stream)
    stream.close()
    assert qa.lock.acquire(timeout=10)  # the worker saw the consumer leave and unwound
    qa.lock.release()


# ------------------------------------------------------------------------------------------------ threads


def test_thread_policy_applies_through_every_interface(filled, tiny, tiny_model_dir, monkeypatch):  # noqa: F811
    from llama_index.core import Document

    from kvzip_rag.integrations.langchain import ChatKVzip
    from kvzip_rag.integrations.llamaindex import KVzipIndex

    store, _ = filled
    monkeypatch.delenv("KVZIP_RAG_THREADS", raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine: nothing lowers the count

    def check(build, expected=1):
        torch.set_num_threads(2)
        build()
        assert torch.get_num_threads() == expected, build

    check(lambda: QAService(str(store), str(tiny_model_dir), threads=1).model)
    check(lambda: QAService(str(store), tiny, threads=1))
    check(lambda: KVzipIndex.from_documents([Document(text=DOCS["bakery.txt"], id_="bakery.txt")], model=tiny,
                                            store=CacheStore(store), threads=1))
    check(lambda: ChatKVzip(store=str(store), model=str(tiny_model_dir), threads=1, max_tokens=2).invoke("bakery"))
    check(lambda: CliRunner(env=WIDE).invoke(app, ["--store", str(store), "--model", str(tiny_model_dir),
                                                   "--threads", "1", "ask", "bakery bread?", "--max-tokens", "2"]))
    monkeypatch.setenv("KVZIP_RAG_THREADS", "1")
    check(lambda: QAService(str(store), str(tiny_model_dir)).model)
    check(lambda: ChatKVzip(store=str(store), model=str(tiny_model_dir), max_tokens=2).invoke("bakery"))
    torch.set_num_threads(1)
    for wrong in (0, 2**63, 1.5):  # 2**63 overflowed torch's 32-bit count with a ValueError from inside
        with pytest.raises(InvalidArgumentError, match="threads must be a whole number from 1 to 1024"):
            kvzip_rag.load_model(str(tiny_model_dir), threads=wrong)
    huge = CliRunner(env=WIDE).invoke(app, ["--store", str(store), "--model", str(tiny_model_dir), "--threads",
                                            str(2**63), "ask", "bakery bread?"])
    assert huge.exit_code != 0 and "threads must be" in huge.output and "Traceback" not in huge.output


# ------------------------------------------------------------------------------------------------ LlamaIndex


@pytest.fixture(scope="module")
def index(filled, tiny):
    from llama_index.core import Document

    from kvzip_rag.integrations.llamaindex import KVzipIndex

    store, _ = filled
    return KVzipIndex.from_documents([Document(text=t, id_=d) for d, t in DOCS.items()], model=tiny,
                                     store=CacheStore(store))


def test_response_mode_and_node_postprocessors(index):
    from llama_index.core.postprocessor.types import BaseNodePostprocessor

    for mode in ("compact", ["compact"]):  # any value, hashable or not, gets the reason
        with pytest.raises(InvalidArgumentError, match="compressed KV cache"):
            index.as_query_engine(response_mode=mode)
    only_nodes = index.as_query_engine(response_mode="no_text", similarity_top_k=2).query(QUESTION)
    assert only_nodes.response is None and len(only_nodes.source_nodes) == 2

    class DropLighthouse(BaseNodePostprocessor):
        def _postprocess_nodes(self, nodes, query_bundle=None):
            return [n for n in nodes if n.node.metadata["doc_id"] != "lighthouse.txt"]

    plain = index.as_query_engine(similarity_top_k=3, max_new_tokens=4, evidence=False).query(QUESTION)
    assert "lighthouse.txt" in [n.node.metadata["doc_id"] for n in plain.source_nodes]
    filtered = index.as_query_engine(similarity_top_k=3, max_new_tokens=4, evidence=False,
                                     node_postprocessors=[DropLighthouse()]).query(QUESTION)
    kept = [n.node.metadata["doc_id"] for n in filtered.source_nodes]
    assert "lighthouse.txt" not in kept and len(kept) == 2
    assert [i.split(":")[0] for i in filtered.metadata["composed_node_ids"]] == kept  # only the kept caches answer


def test_tracing_sees_llm_and_synthesis_events_with_token_counts(index):
    from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
    from llama_index.core.instrumentation import get_dispatcher
    from llama_index.core.instrumentation.event_handlers import BaseEventHandler

    seen: list = []

    class Recorder(BaseEventHandler):
        def handle(self, event, **kwargs):
            seen.append(event)

    recorder = Recorder()
    root = get_dispatcher()
    root.add_event_handler(recorder)
    debug, counter = LlamaDebugHandler(), TokenCountingHandler(tokenizer=index.kvzip_model.tokenizer.encode)
    try:
        engine = index.as_query_engine(max_new_tokens=5, callback_manager=CallbackManager([debug, counter]))
        response = engine.query(QUESTION)
    finally:
        root.event_handlers.remove(recorder)
    names = {type(e).__name__ for e in seen}
    assert {"SynthesizeStartEvent", "SynthesizeEndEvent", "LLMCompletionStartEvent", "LLMCompletionEndEvent"} <= names
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 1 and debug.get_event_pairs(CBEventType.SYNTHESIZE)
    assert counter.completion_llm_token_count == response.metadata["answer_tokens"]
    assert counter.prompt_llm_token_count > response.metadata["prompt_tokens"]  # the cached document counts too


# ------------------------------------------------------------------------------------------------ LangChain


def test_idiomatic_langchain_rag_chain_answers_from_the_caches(filled, tiny):
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough

    from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever

    store, _ = filled
    qa = QAService(str(store), tiny)
    retriever = KVzipRetriever(qa=qa, k=2)
    chat = ChatKVzip(qa=qa, max_tokens=5)
    prompt = ChatPromptTemplate.from_template("Answer from this context only:\n{context}\n\nQuestion: {question}")
    usage: list = []

    class Usage(BaseCallbackHandler):
        def on_llm_end(self, response, **kwargs):
            usage.append(response.generations[0][0].message.usage_metadata)

    chain = {"context": retriever, "question": RunnablePassthrough()} | prompt | chat
    message = chain.invoke(QUESTION, config={"callbacks": [Usage()]})
    meta = message.response_metadata
    assert meta["cached_documents"] == 2  # both retrieved segments were recognised and answered from their caches
    routed = [d.id for d in retriever.invoke(QUESTION)]
    assert meta["compose"] == "parallel" and meta["strategy"] == "composed-parallel"  # the default: one answer
    assert sorted(meta["composed_node_ids"]) == sorted(routed) and len(meta["doc_ids"]) == 2  # from both, joined
    best = ({"context": retriever, "question": RunnablePassthrough()} | prompt
            | chat.bind(compose="best-of-k")).invoke(QUESTION).response_metadata
    assert best["compose"] == "best-of-k" and best["strategy"] == "best-mean-logprob" and len(best["doc_ids"]) == 1
    assert ChatKVzip(qa=qa, max_tokens=5, compose="best-of-k").invoke(
        prompt.invoke({"context": retriever.invoke(QUESTION), "question": QUESTION})
    ).response_metadata["strategy"] == "best-mean-logprob"
    with pytest.raises(ValueError, match="unknown compose='bogus'"):
        ChatKVzip(qa=qa, compose="bogus")
    with pytest.raises(InvalidArgumentError, match="unknown compose='bogus'"):
        chat.invoke(QUESTION, compose="bogus")
    cached = message.usage_metadata["input_token_details"]["cache_read"]
    assert cached > 0 and usage and usage[0]["input_tokens"] == message.usage_metadata["input_tokens"]
    prompt_text = prompt.invoke({"context": retriever.invoke(QUESTION), "question": QUESTION}).to_string()
    assert message.usage_metadata["input_tokens"] - cached < len(tiny.encode(prompt_text))  # text not re-read


def test_langchain_runs_without_llamaindex_installed(filled, tiny_model_dir):  # noqa: F811
    store, _ = filled
    script = textwrap.dedent(f"""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "llama_index" or name.startswith("llama_index."):
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)")

        sys.meta_path.insert(0, Block())
        from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever, create_kvzip_qa_chain
        from kvzip_rag.qa import QAService
        qa = QAService({str(store)!r}, {str(tiny_model_dir)!r}, threads=1)
        docs = KVzipRetriever(qa=qa, k=2).invoke("harbour")
        reply = ChatKVzip(qa=qa, max_tokens=3).invoke("Who built the harbour?")
        out = create_kvzip_qa_chain(qa, k=1, max_new_tokens=3).invoke("bakery")
        assert docs and reply.response_metadata["doc_ids"] and out["sources"]
        loaded = sorted(m for m in sys.modules if m.startswith("llama_index"))
        assert not loaded, loaded
        print("OK")
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "KVZIP_RAG_THREADS": "1"})
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]


def test_missing_extra_names_it():
    script = textwrap.dedent("""
        import sys
        sys.modules["langchain_core"] = None  # not installed
        try:
            import kvzip_rag.integrations.langchain
        except ImportError as error:
            print(error)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "pip install 'kvzip-rag[langchain]'" in run.stdout, run.stdout + run.stderr


def test_progress_shows_names_and_calls_prefill_chunks_chunks():
    from llama_index.core import Document

    from kvzip_rag.cli.progress import IndexProgress
    from kvzip_rag.integrations.llamaindex.index import STAGE_LABELS, document_label

    read = Document(text="x", metadata={"file_name": "manual.md"})  # SimpleDirectoryReader: a UUID as doc_id
    assert document_label(read) == "manual.md" and read.doc_id not in document_label(read)
    assert document_label(Document(text="x", id_="\x1b[2Jid")) == "\\x1b[2Jid"
    assert STAGE_LABELS["prefill"] == IndexProgress.STAGES["prefill"] == "prefill chunks"
    assert IndexProgress.STAGES["compress"] == "segments"


def test_composed_strategy_answers_once_from_all_routed_caches(filled, tiny):  # noqa: F811
    """compose="parallel" joins the k routed caches into one: one answer, every routed segment its source, and the
    same text as composing the loaded caches by hand."""
    from kvzip_rag import answer
    from kvzip_rag.compose import compose
    from kvzip_rag.qa import QAService

    store, _ = filled
    service = QAService(store, tiny, compose="parallel")
    result = service.answer(QUESTION, k=3, max_new_tokens=6)
    routed = service.route(QUESTION, 3).targets
    assert len(result.answers) == 1 and result.targets == routed
    meta = result.metadata()
    assert meta["strategy"] == "composed-parallel" and len(meta["composed_node_ids"]) == 3
    by_hand = compose(tiny, [service.load(t)[0] for t in routed], layout="parallel")
    assert result.text == answer(tiny, by_hand, QUESTION, max_new_tokens=6).text


def test_cli_ask_compose_sequential_answers_once_from_all_k(filled, tiny, tiny_model_dir):  # noqa: F811
    """``ask --k 3 --compose sequential`` lists the 3 routed segments as the sources of one answer, the service's; an
    unknown strategy is one clear error naming the strategies."""
    from kvzip_rag.qa import QAService

    store, _ = filled
    base = ["--store", str(store), "--model", str(tiny_model_dir), "ask", QUESTION, "--k", "3", "--max-tokens", "6"]
    cli = CliRunner(env=WIDE).invoke(app, [*base, "--compose", "sequential"])
    assert cli.exit_code == 0, cli.output
    expected = QAService(store, tiny, compose="sequential").answer(QUESTION, k=3, max_new_tokens=6)
    assert _cli_sources(cli.stderr) == [t.doc_id for t in expected.targets] and len(expected.targets) == 3
    assert "← answer" not in cli.stderr and cli.stdout.strip() == expected.text.strip()
    assert "(sequential: one answer from 3 caches joined)" in cli.stderr
    bad = CliRunner(env=WIDE).invoke(app, [*base, "--compose", "bogus"])
    assert bad.exit_code == 1 and "unknown compose='bogus'" in bad.output and "Traceback" not in bad.output
    assert "best-of-k" in bad.output and "parallel" in bad.output and "sequential" in bad.output
