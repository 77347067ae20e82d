"""The query engine of a KVzipIndex: route (``index.qa``), post-process the nodes, answer from the routed caches
(``index.qa`` again, with the routed Targets themselves), and show what the answer rests on."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, List, Optional

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.response.schema import RESPONSE_TYPE, AsyncStreamingResponse, Response, StreamingResponse
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.schema import NodeWithScore, QueryBundle, QueryType

from kvzip_rag.bridge import run_in_thread
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import Composer, QAResult, Target, get_composer

from ..segments import answer_options
from .nodes import source_nodes, targets_of
from .retriever import checked_query
from .tracing import Trace, retrieval

if TYPE_CHECKING:
    from .index import KVzipIndex
    from .retriever import KVzipIndexRetriever

# response_mode values that make sense without a synthesizer over text (the caches answer, not a prompt of text)
_ACCEPTED_MODES = (None, "no_text")  # compared by equality: any value gets the message below


def _mode_name(mode: Any) -> Optional[str]:
    return getattr(mode, "value", mode)


class KVzipQueryEngine(BaseQueryEngine):
    """Retrieve the segment(s), load their compressed caches and answer from them (``index.qa``).

    ``query``/``aquery`` return a ``Response`` (``StreamingResponse`` / ``AsyncStreamingResponse`` with
    ``streaming=True``) with ``source_nodes`` and metadata (``retrieve_s``, ``cache_load_s``, ``ttft_s``,
    ``decode_s``, ``bytes_loaded``, ``ratio``, ``kept_ratio``, token counts, ``answers``...; a streaming response's
    metadata is filled in when the stream ends).

    ``similarity_top_k > 1``: the routed caches make one answer by ``compose`` (default: the index service's,
    ``"parallel"``: joined into one cache that answers once; ``"sequential"``; ``"best-of-k"``: each cache answers and
    the best answer is kept). Every routed node stays in ``source_nodes``, marked by what it did (``composed``
    True/False, the latter for a node the model's window could not take; best-of-k: its own ``answer`` and
    ``chosen``); ``metadata`` names the strategy (``compose``, ``strategy``) and lists ``composed_node_ids`` and
    ``dropped_node_ids``.

    **Grounding**: ``metadata["citations"]`` lists the spans the answer rests on (dicts: ``doc_id``,
    ``segment_index``, ``start``, ``end``, ``text``, ``weight``; best first) and ``metadata["abstained"]`` says
    whether the evidence was too weak (the response is then the abstention). When there are citations,
    ``source_nodes`` are the cited spans, one node each, as llama-index's ``CitationQueryEngine`` gives chunk nodes:
    text = the span, score = its weight, the segment's metadata plus ``start``/``end``/``weight``/``citation``, and
    ``start_char_idx``/``end_char_idx`` into the segment's text; otherwise they are the routed segments.
    ``answer_style`` (``"quote"``) and ``abstain_threshold`` are handed to the service with the sampling options.

    ``node_postprocessors`` run on the routed nodes before any cache is loaded (a postprocessor that drops a node
    drops its cache). ``response_mode``: ``"no_text"`` returns the routed nodes without generating; the text
    synthesis modes (``compact``, ``refine``, ``tree_summarize``...) are refused: they pack retrieved text into an
    LLM prompt, and this engine never re-reads text (use ``index.as_query_engine(llm=...)`` for them).
    """

    def __init__(self, index: "KVzipIndex", similarity_top_k: int = 1, streaming: bool = False,
                 callback_manager: Optional[CallbackManager] = None,
                 node_postprocessors: Optional[Sequence[Any]] = None, response_mode: Any = None,
                 compose: "str | Composer | None" = None, **options: Any) -> None:
        mode = _mode_name(response_mode)
        if mode not in _ACCEPTED_MODES:
            raise InvalidArgumentError(
                f"response_mode={mode!r} does not apply to a KVzip query engine: that mode puts the retrieved text "
                "into an LLM prompt, while this engine answers from each routed segment's compressed KV cache "
                "(no text is re-read; similarity_top_k > 1 composes the routed caches). Drop response_mode (or use "
                "'no_text' for retrieval only), or pass llm= to get LlamaIndex's synthesizer over the segment texts"
            )
        self._index = index
        self._options = answer_options(options)
        self._compose = get_composer(compose) if compose is not None else None  # None: the index service's
        self._retriever = index.as_retriever(similarity_top_k=similarity_top_k)
        self._streaming = streaming
        self._no_text = mode == "no_text"
        self._postprocessors = list(node_postprocessors or [])
        super().__init__(callback_manager=callback_manager)

    @property
    def index(self) -> "KVzipIndex":
        return self._index

    @property
    def retriever(self) -> "KVzipIndexRetriever":
        return self._retriever

    def _get_prompt_modules(self) -> dict:
        return {}

    def retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self._postprocess(self._retriever.retrieve(query_bundle), query_bundle)

    def synthesize(self, query_bundle: QueryBundle, nodes: List[NodeWithScore],
                   additional_source_nodes: Optional[Sequence[NodeWithScore]] = None) -> RESPONSE_TYPE:
        """Answer from the caches of ``nodes`` (KVzipIndex nodes); additional source nodes are attached as is."""
        return self._respond(query_bundle.query_str, nodes, _targets(nodes), None, additional_source_nodes,
                             asynchronous=False)

    async def asynthesize(self, query_bundle: QueryBundle, nodes: List[NodeWithScore],
                          additional_source_nodes: Optional[Sequence[NodeWithScore]] = None) -> RESPONSE_TYPE:
        return await self._arespond(query_bundle.query_str, nodes, _targets(nodes), None, additional_source_nodes)

    def _route(self, query_bundle: QueryBundle) -> tuple[List[NodeWithScore], list[Target], float]:
        """The service's routing, the routed nodes after the postprocessors, the Targets of the nodes kept (the
        ones routed here as routed; any a postprocessor added read from their metadata), and the seconds taken."""
        start = time.perf_counter()
        with retrieval(self.callback_manager, query_bundle) as routed_nodes:
            targets = self._index.qa.route(query_bundle.query_str, self._retriever.similarity_top_k).targets
            routed_nodes += self._index.nodes_for(targets)
        nodes = self._postprocess(routed_nodes, query_bundle)
        routed = {t.node_id: t for t in targets}
        kept = [routed.get(n.node.node_id) or targets_of([n])[0] for n in nodes]
        return nodes, kept, time.perf_counter() - start

    def _postprocess(self, nodes: List[NodeWithScore], query_bundle: QueryBundle) -> List[NodeWithScore]:
        for postprocessor in self._postprocessors:
            nodes = postprocessor.postprocess_nodes(nodes, query_bundle=query_bundle)
        return nodes

    def query(self, str_or_query_bundle: QueryType) -> RESPONSE_TYPE:
        return super().query(checked_query(str_or_query_bundle))

    async def aquery(self, str_or_query_bundle: QueryType) -> RESPONSE_TYPE:
        return await super().aquery(checked_query(str_or_query_bundle))

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes, targets, retrieve_s = self._route(query_bundle)
        return self._respond(query_bundle.query_str, nodes, targets, retrieve_s, None, asynchronous=False)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        nodes, targets, retrieve_s = await run_in_thread(lambda: self._route(query_bundle))
        return await self._arespond(query_bundle.query_str, nodes, targets, retrieve_s, None)

    def _respond(self, question: str, nodes: List[NodeWithScore], targets: list[Target],
                 retrieve_s: Optional[float], extra: Optional[Sequence[NodeWithScore]],
                 asynchronous: bool) -> RESPONSE_TYPE:
        extra = list(extra or [])
        if self._no_text or not nodes:
            return Response(None if self._no_text else "Empty Response", source_nodes=list(nodes) + extra,
                            metadata={"retrieve_s": retrieve_s})
        qa = self._index.qa
        model = {"model_name": qa.model.name, "class_name": "KVzipQueryEngine"}
        trace = Trace(self.callback_manager, question, model).start()
        if not self._streaming:
            try:
                result = qa.answer(question, targets=targets, compose=self._compose, **self._options)
            except BaseException as error:
                trace.fail(error)
                raise
            response = Response(result.text, source_nodes=source_nodes(result, nodes) + extra,
                                metadata=result.metadata(retrieve_s))
            trace.end(result.text, result, response)
            return response
        stream = qa.stream(question, targets=targets, compose=self._compose, **self._options)
        metadata: dict = {"retrieve_s": retrieve_s, "ratio": self._index.ratio, "level": self._index.level}
        sources: list = list(nodes) + extra

        def finish(response) -> None:
            if stream.result is not None:
                metadata.update(stream.result.metadata(retrieve_s))
                sources[:] = source_nodes(stream.result, nodes) + extra
                trace.end(stream.result.text, stream.result, response)

        if asynchronous:
            async def agen():
                async for piece in stream:
                    yield piece
                finish(response)

            response = AsyncStreamingResponse(response_gen=agen(), source_nodes=sources, metadata=metadata)
            return response

        def gen():
            yield from stream
            finish(response)

        response = StreamingResponse(response_gen=gen(), source_nodes=sources, metadata=metadata)
        return response

    async def _arespond(self, question: str, nodes: List[NodeWithScore], targets: list[Target],
                        retrieve_s: Optional[float], extra: Optional[Sequence[NodeWithScore]]) -> RESPONSE_TYPE:
        if self._streaming:
            return self._respond(question, nodes, targets, retrieve_s, extra, asynchronous=True)
        return await run_in_thread(lambda: self._respond(question, nodes, targets, retrieve_s, extra, False))


def _targets(nodes: Sequence[NodeWithScore]) -> list[Target]:
    """Targets of nodes handed to ``synthesize`` from outside (none when there are none: nothing is answered)."""
    return targets_of(nodes) if nodes else []

