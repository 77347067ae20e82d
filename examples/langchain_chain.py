"""LangChain LCEL over KVzip-compressed KV caches, with no LlamaIndex involved.

    python examples/langchain_chain.py

The sample documents are compressed once into a store (a temporary folder here). Then:

1. The idiomatic RAG chain ``{"context": retriever, "question": RunnablePassthrough()} | prompt | chat_model``:
   ``ChatKVzip`` recognises the retrieved segments inside the prompt and answers from *their caches* (it does not
   re-read their text); ``response_metadata["cached_documents"]`` says so.
2. ``create_kvzip_qa_chain(qa)``: question in, ``{"answer", "sources"}`` out; ``.pick("answer") |
   StrOutputParser()`` streams the text; it composes with prompts, ``itemgetter``, ``batch``.
3. ``ChatKVzip`` as a chat model for follow-up turns (every message is routed; the history is replayed into the
   cache of the documents its messages were routed to, ``response_metadata["doc_ids"]`` names them).
"""

from __future__ import annotations

import tempfile
from operator import itemgetter
from pathlib import Path

from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate, PromptTemplate
from langchain_core.runnables import RunnablePassthrough

from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever, create_kvzip_qa_chain
from kvzip_rag.qa import QAService

DOCS = Path(__file__).resolve().parent / "docs"


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        qa = QAService(folder)  # the store; the default model loads on first use (threads: by load)
        for path in sorted(DOCS.iterdir()):
            if path.suffix in (".md", ".txt"):
                qa.store.add_document(qa.model, path.read_text(), doc_id=path.name, ratio=0.3)
        run(qa)


def run(qa: QAService) -> None:
    retriever = KVzipRetriever(qa=qa, k=2)
    chat = ChatKVzip(qa=qa, max_tokens=48)

    # 1. The idiomatic chain: retrieved Documents go into the prompt, the chat model answers from their caches.
    prompt = ChatPromptTemplate.from_template("Answer from the context only.\n\n{context}\n\nQuestion: {question}")
    rag = {"context": retriever, "question": RunnablePassthrough()} | prompt | chat
    message = rag.invoke("How long is the warranty of the Corvo S2?")
    print("A:", message.content)
    print("   answered from", message.response_metadata["cached_documents"], "cached segment(s);",
          message.usage_metadata["input_token_details"]["cache_read"], "input tokens served from caches")

    # 2. The ready QA chain, its answer streamed through StrOutputParser, and composition.
    chain = create_kvzip_qa_chain(qa, max_new_tokens=48)
    result = chain.invoke({"question": "Who was the engineer of the stone bridge over the River Alder?"})
    print("\nA:", result["answer"])
    print("   sources:", [doc.metadata["doc_id"] for doc in result["sources"]])
    print("streamed: ", end="", flush=True)
    for piece in (chain.pick("answer") | StrOutputParser()).stream("How much water does the Corvo S2 tank hold?"):
        print(piece, end="", flush=True)
    print()
    about = PromptTemplate.from_template("At what temperature are the {item} baked?")
    print("prompt | chain:", (about | chain | itemgetter("answer")).invoke({"item": "saffron buns"}))
    with_answer = RunnablePassthrough.assign(answer=chain | itemgetter("answer"))
    for row in with_answer.batch([{"question": "Who founded the town of Wrenfield?"},
                                  {"question": "How long does the lemon barley soup simmer?"}]):
        print(f"batch: {row}")

    # 3. A conversation: the history is replayed into the cache of the documents its messages were routed to.
    first = chat.invoke("How long is the warranty of the Corvo S2?")
    follow_up = chat.invoke([HumanMessage("How long is the warranty of the Corvo S2?"), AIMessage(first.content),
                             HumanMessage("Does the warranty cover damage caused by limescale?")])
    print(f"\nchat: {first.content}\nfollow-up: {follow_up.content}")


if __name__ == "__main__":
    main()
