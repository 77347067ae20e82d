"""LangChain LCEL: a question-answering chain whose "LLM context" is a KVzip-compressed KV cache.

    python examples/langchain_chain.py

The sample documents are compressed once into a ``KVzipIndex`` (temporary store). Then:

1. ``create_kvzip_qa_chain(index)`` is a Runnable: question in, ``{"answer", "sources"}`` out; ``.pick("answer")
   | StrOutputParser()`` streams just the text.
2. It composes with other Runnables: a prompt template rewrites a topic into a question before it reaches the chain.
3. ``KVzipRetriever`` and ``ChatKVzip`` are a plain LangChain retriever and chat model, here wired by hand.
"""

from __future__ import annotations

from operator import itemgetter
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import PromptTemplate
from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
from llama_index.core import Document

from kvzip_rag import KVzipIndex
from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever, create_kvzip_qa_chain

DOCS = Path(__file__).resolve().parent / "docs"


def load_index() -> KVzipIndex:
    documents = [
        Document(text=path.read_text(), doc_id=path.name, metadata={"file_name": path.name})
        for path in sorted(DOCS.iterdir()) if path.suffix in (".md", ".txt")
    ]
    return KVzipIndex.from_documents(documents, ratio=0.3)


def main() -> None:
    index = load_index()

    # 1. The ready QA chain, and its answer streamed through StrOutputParser.
    qa = create_kvzip_qa_chain(index, max_new_tokens=48)
    result = qa.invoke({"question": "Who was the engineer of the stone bridge over the River Alder?"})
    print("A:", result["answer"])
    print("   sources:", [doc.metadata["doc_id"] for doc in result["sources"]])

    answer_text = qa.pick("answer") | StrOutputParser()
    print("\nstreamed: ", end="", flush=True)
    for piece in answer_text.stream("How much water does the tank of the Corvo S2 hold?"):
        print(piece, end="", flush=True)
    print()

    # 2. Composition: a prompt template feeds the chain, itemgetter keeps the answer; batch runs several inputs.
    about = PromptTemplate.from_template("At what temperature are the {item} baked?")
    chain = about | qa | itemgetter("answer")
    print("\nprompt | chain:", chain.invoke({"item": "saffron buns"}))
    # RunnablePassthrough keeps the input next to the answer.
    with_answer = RunnablePassthrough.assign(answer=qa | itemgetter("answer"))
    for row in with_answer.batch([{"question": "Who founded the town of Wrenfield?"},
                                  {"question": "How long does the lemon barley soup simmer?"}]):
        print(f"batch: {row}")

    # 3. The retriever and the chat model as separate LCEL pieces.
    retriever = KVzipRetriever(index=index, k=2)
    chat = ChatKVzip(index=index, max_tokens=48)
    to_messages = RunnableLambda(lambda x: [HumanMessage(x["question"])])
    rag = RunnableParallel(
        sources=itemgetter("question") | retriever,
        answer=to_messages | chat | StrOutputParser(),
    )
    out = rag.invoke({"question": "How long is the warranty of the Corvo S2?"})
    print(f"\nchat model: {out['answer']}")
    print("   retrieved:", [(doc.metadata["doc_id"], round(doc.metadata["score"], 2)) for doc in out["sources"]])

    # A follow-up turn: the history is replayed after the same compressed document.
    follow_up = chat.invoke([
        HumanMessage("How long is the warranty of the Corvo S2?"),
        AIMessage(out["answer"]),
        HumanMessage("Does the warranty cover damage caused by limescale?"),
    ])
    print(f"follow-up: {follow_up.content}")


if __name__ == "__main__":
    main()
