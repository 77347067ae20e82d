"""LangChain integration, built on the core QA service alone (no LlamaIndex): a retriever, a chat model and a QA chain.

    >>> from kvzip_rag.qa import QAService
    >>> from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever, create_kvzip_qa_chain
    >>> qa = QAService("my-store", model="smollm2", threads=1)  # one store, one model, shared by the adapters
    >>> chain = create_kvzip_qa_chain(qa, k=3)                  # question in, {"answer", "sources"} out
    >>> retriever = KVzipRetriever(qa=qa, k=4)                  # Documents for the segments that match a query
    >>> chat = ChatKVzip(qa=qa)                                 # a chat model answering from compressed caches

Modules (as a LangChain partner package): :mod:`.retrievers`, :mod:`.chat_models`, :mod:`.chains`. Needs the
``langchain`` extra: ``pip install 'kvzip-rag[langchain]'``. ``KVzipRetriever`` and ``ChatKVzip`` pass the
``langchain-tests`` standard suites (see ``tests/test_langchain_standard.py`` for what is declared absent).
"""

from kvzip_rag.extras import require

require("langchain_core", "langchain", "kvzip_rag.integrations.langchain")

from .chains import create_kvzip_qa_chain  # noqa: E402
from .chat_models import ChatKVzip  # noqa: E402
from .retrievers import KVzipRetriever  # noqa: E402

__all__ = ["ChatKVzip", "KVzipRetriever", "create_kvzip_qa_chain"]
