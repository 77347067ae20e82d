"""Evidence recorded by the engine reaches every adapter unchanged: LlamaIndex source nodes are the cited spans of
the stored text, LangChain sources and chat metadata carry the same citations, and an abstention is said in both
(the service's own answer is the reference; tiny random model, real store)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("llama_index.core")
pytest.importorskip("langchain_core")

from test_evidence import DOCS, service, stored, tiny_model_dir  # noqa: E402,F401  (fixtures)


@pytest.fixture(scope="module")
def index(service, tmp_path_factory):  # noqa: F811
    """A LlamaIndex index of the same documents with the same model; ``index.qa`` is the service both adapters use."""
    from llama_index.core import Document

    from kvzip_rag.integrations.llamaindex import KVzipIndex

    documents = [Document(text=text, id_=doc_id) for doc_id, text in DOCS.items()]
    return KVzipIndex.from_documents(documents, model=service.model, ratio=0.5,
                                     store=tmp_path_factory.mktemp("grounded-adapters"))

QUESTION = "Who built the harbour of the town?"
OPTIONS = {"max_new_tokens": 4, "abstain_threshold": None}


def test_llamaindex_source_nodes_are_the_recorded_citations(index):
    expected = index.qa.answer(QUESTION, k=2, **OPTIONS)
    assert expected.citations  # the engine recorded evidence: the adapter has something to show
    response = index.as_query_engine(similarity_top_k=2, **OPTIONS).query(QUESTION)
    assert response.response.strip() == expected.text
    assert response.metadata["citations"] == [c.as_dict() for c in expected.citations]
    assert [n.node.text for n in response.source_nodes] == [c.text for c in expected.citations]
    for node, citation in zip(response.source_nodes, expected.citations):
        assert stored(index.qa, citation)[node.node.start_char_idx:node.node.end_char_idx] == node.node.text
        assert node.score == pytest.approx(citation.weight)


def test_langchain_sources_and_chat_carry_the_recorded_citations(index):
    from kvzip_rag.integrations.langchain import ChatKVzip, create_kvzip_qa_chain

    expected = index.qa.answer(QUESTION, k=2, **OPTIONS)
    out = create_kvzip_qa_chain(index, k=2, **OPTIONS).invoke(QUESTION)
    assert out["answer"].strip() == expected.text
    cited = [c for d in out["sources"] for c in d.metadata["citations"]]
    assert sorted(c["text"] for c in cited) == sorted(c.text for c in expected.citations)
    meta = ChatKVzip(index=index, **OPTIONS).invoke(QUESTION).response_metadata
    assert meta["citations"] and all(stored(index.qa, SimpleNamespace(**c))[c["start"]:c["end"]] == c["text"]
                                     for c in meta["citations"])


def test_an_abstention_is_said_in_both_adapters(index):
    from kvzip_rag.integrations.langchain import create_kvzip_qa_chain

    strict = {"max_new_tokens": 4, "abstain_threshold": 1.0, "abstain_text": "Not in my files."}
    response = index.as_query_engine(**strict).query(QUESTION)
    assert response.response.strip() == "Not in my files." and response.metadata["abstained"] is True
    assert response.metadata["candidate_answer"] == index.qa.answer(QUESTION, **OPTIONS).text
    out = create_kvzip_qa_chain(index, **strict).invoke(QUESTION)
    assert out["answer"].strip() == "Not in my files."
    assert all(d.metadata["abstained"] is True for d in out["sources"])
