"""LlamaIndex integration: an index whose "embedding" of a document is its KVzip-compressed KV cache.

    >>> from llama_index.core import SimpleDirectoryReader
    >>> from kvzip_rag import KVzipIndex
    >>> documents = SimpleDirectoryReader("docs/").load_data()
    >>> index = KVzipIndex.from_documents(documents, ratio=0.3, threads=1)  # prefill + score + evict, once
    >>> index.as_query_engine().query("Who built the harbour?")             # answered from the compressed cache
    >>> index.persist("storage/")                                           # cache blobs travel with the folder
    >>> index = KVzipIndex.load("storage/")                                 # no recompression

Modules: :mod:`.index` (``KVzipIndex``), :mod:`.retriever`, :mod:`.query_engine`, :mod:`.chat_engine`,
:mod:`.llm` (``KVzipLLM``, a LlamaIndex LLM over the local model, for ``Settings.llm``), :mod:`.persistence`
(index struct, index store, temporary stores), :mod:`.nodes`, :mod:`.tracing`. Routing, loading, composition and
conversations are the core service's (:mod:`kvzip_rag.qa`, :mod:`kvzip_rag.dialogue`).

Importing this package registers the ``"kvzip"`` index struct type with LlamaIndex, so that
``load_index_from_storage`` can rebuild a persisted index. llama-index-core looks index struct types up in a plain
dict and offers no entry-point (plugin) mechanism, so a process must import this package (``from kvzip_rag import
KVzipIndex``) before ``load_index_from_storage``; otherwise llama-index-core raises ``KeyError: 'kvzip'``. Prefer
``KVzipIndex.load(dir)``, which needs nothing else (see the README).
Needs the ``llamaindex`` extra: ``pip install 'kvzip-rag[llamaindex]'``.
"""

from kvzip_rag.extras import require

require("llama_index.core", "llamaindex", "kvzip_rag.integrations.llamaindex")

from llama_index.core.data_structs.registry import INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS  # noqa: E402
from llama_index.core.indices.registry import INDEX_STRUCT_TYPE_TO_INDEX_CLASS  # noqa: E402

from kvzip_rag.qa import CacheAnswer, EmptyIndexError, QAResult, choose_best, is_refusal  # noqa: E402

from .chat_engine import KVzipChatEngine  # noqa: E402
from .index import KVzipIndex  # noqa: E402
from .persistence import STORE_DIRNAME, STRUCT_TYPE, KVzipIndexStore, KVzipIndexStruct  # noqa: E402
from .query_engine import KVzipQueryEngine  # noqa: E402
from .retriever import KVzipIndexRetriever  # noqa: E402

HitsAnswer = QAResult  # the name before the core service existed

__all__ = [
    "CacheAnswer", "EmptyIndexError", "HitsAnswer", "KVzipChatEngine", "KVzipIndex", "KVzipIndexRetriever",
    "KVzipIndexStore", "KVzipIndexStruct", "KVzipLLM", "KVzipQueryEngine", "QAResult", "STORE_DIRNAME",
    "choose_best", "is_refusal",
]


def __getattr__(name: str):
    if name == "KVzipLLM":
        from .llm import KVzipLLM

        return KVzipLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Let LlamaIndex's own loaders (load_index_from_storage, index stores) recognise the "kvzip" index struct.
INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS[STRUCT_TYPE] = KVzipIndexStruct  # type: ignore[index]
INDEX_STRUCT_TYPE_TO_INDEX_CLASS[STRUCT_TYPE] = KVzipIndex  # type: ignore[index]
