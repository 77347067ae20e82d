"""LlamaIndex quickstart: compress the sample documents once, then query, stream and chat from their KV caches.

    python examples/llamaindex_quickstart.py

Each document read by ``SimpleDirectoryReader`` is prefilled, scored and compressed to 30% of its KV pairs (no
chunking: a document is split only where it does not fit the model window). Questions are routed to a document by
full-text search and answered from its compressed cache, so nothing is re-read. The caches live in a temporary
store that disappears with the index; pass ``store="my-store/"`` to keep them, or ``index.persist(dir)``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from llama_index.core import SimpleDirectoryReader

from kvzip_rag import KVzipIndex

DOCS = Path(__file__).resolve().parent / "docs"


def main() -> None:
    # 1. Read the documents and compress each one into a KV cache (the slow part, done once).
    documents = SimpleDirectoryReader(str(DOCS), required_exts=[".md", ".txt"], filename_as_id=True).load_data()
    index = KVzipIndex.from_documents(documents, ratio=0.3, show_progress=True)
    print(f"indexed {len(index.doc_ids)} documents at ratio {index.ratio}")

    # 2. A query engine: retrieval routes the question, the answer comes from the compressed cache.
    query_engine = index.as_query_engine(max_new_tokens=48)
    response = query_engine.query("Who founded the town of Wrenfield?")
    print("\nQ: Who founded the town of Wrenfield?")
    print("A:", response.response)
    for source in response.source_nodes:
        meta = source.metadata
        print(f"   source {meta['file_name']} (score {source.score:.2f}, ratio {meta['ratio']}, "
              f"{meta['bytes'] / 1e6:.1f} MB kept of {meta['full_bytes'] / 1e6:.1f} MB)")
    timings = response.metadata
    print(f"   retrieval {timings['retrieve_s'] * 1000:.0f} ms, cache load {timings['cache_load_s'] * 1000:.0f} ms, "
          f"first token {timings['ttft_s'] * 1000:.0f} ms")

    # 3. Streaming: tokens arrive as they are generated; sources are known before the first token.
    streaming_engine = index.as_query_engine(streaming=True, max_new_tokens=48)
    stream = streaming_engine.query("How much water does the tank of the Corvo S2 hold?")
    print("\nQ: How much water does the tank of the Corvo S2 hold?\nA: ", end="", flush=True)
    for piece in stream.response_gen:
        print(piece, end="", flush=True)
    print(f"\n   source {stream.source_nodes[0].metadata['file_name']}")

    # 4. Chat: every message is routed; follow-ups on the same topic continue in the conversation's cache, another
    #    topic brings its document in (composed beside the earlier ones). source_nodes: the documents a turn used.
    chat_engine = index.as_chat_engine(max_new_tokens=48)
    for message in ("How long is the warranty of the Corvo S2?", "Does it cover damage caused by limescale?"):
        print(f"\nyou:   {message}")
        reply = chat_engine.chat(message)
        sources = ", ".join(n.metadata["file_name"] for n in reply.source_nodes)
        print(f"kvzip: {reply.response}\n       (from {sources})")
    chat_engine.reset()

    # 5. Persist and load in a fresh index object: no recompression.
    with tempfile.TemporaryDirectory() as folder:
        index.persist(folder)
        again = KVzipIndex.load(folder, model=index.kvzip_model)
        answer = again.as_query_engine(max_new_tokens=32).query("At what temperature are the saffron buns baked?")
        print(f"\nafter reload -> {answer.response}")


if __name__ == "__main__":
    main()
