"""The LlamaIndex retriever of a KVzipIndex: the core service's routing, as the index's ``NodeWithScore`` s."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, QueryType

from kvzip_rag.bridge import run_in_thread
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import check_k

if TYPE_CHECKING:
    from .index import KVzipIndex


def checked_query(query: Any) -> QueryType:
    """A query as LlamaIndex takes it: a string or a ``QueryBundle``. Anything else is a one-line
    ``InvalidArgumentError`` here, before llama-index-core's instrumentation meets it (there: an ``AttributeError``
    for bytes, a pydantic ``ValidationError`` for a number or ``None``)."""
    if not isinstance(query, (str, QueryBundle)):
        raise InvalidArgumentError(f"a query is a string or a QueryBundle, got {type(query).__name__}")
    return query


class KVzipIndexRetriever(BaseRetriever):
    """Routes a query to this index's segments (``index.qa.route``: store full-text search, with the fallback) and
    returns their nodes (:meth:`KVzipIndex.nodes_for`)."""

    def __init__(self, index: "KVzipIndex", similarity_top_k: int = 1,
                 callback_manager: Optional[CallbackManager] = None, verbose: bool = False) -> None:
        self._index = index
        self.similarity_top_k = check_k(similarity_top_k, "similarity_top_k")  # refused when built, not when asked
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def index(self) -> "KVzipIndex":
        return self._index

    def retrieve(self, str_or_query_bundle: QueryType) -> List[NodeWithScore]:
        return super().retrieve(checked_query(str_or_query_bundle))

    async def aretrieve(self, str_or_query_bundle: QueryType) -> List[NodeWithScore]:
        return await super().aretrieve(checked_query(str_or_query_bundle))

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        routing = self._index.qa.route(query_bundle.query_str, self.similarity_top_k)
        return self._index.nodes_for(routing.targets)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await run_in_thread(lambda: self._retrieve(query_bundle))
