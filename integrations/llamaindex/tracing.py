"""Retrieval, LLM and synthesis events, emitted the way LlamaIndex's own retrievers, LLMs and synthesizers emit them.

Answering from a compressed cache is an LLM call whose "prompt" is the question (the document is already in the
cache), so tracing and cost tools see: the retrieval events of a retriever (:func:`retrieval`), instrumentation
``SynthesizeStartEvent``/``SynthesizeEndEvent`` and ``LLMCompletionStartEvent``/``LLMCompletionEndEvent``, and
``CallbackManager`` ``RETRIEVE``, ``SYNTHESIZE`` and ``LLM`` events
whose completion carries ``raw["usage"]`` (``prompt_tokens`` counts the cached document too, ``completion_tokens``
the answer), which ``TokenCountingHandler`` reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

from llama_index.core.base.llms.types import CompletionResponse
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.callbacks.schema import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.llm import LLMCompletionEndEvent, LLMCompletionStartEvent
from llama_index.core.instrumentation.events.retrieval import RetrievalEndEvent, RetrievalStartEvent
from llama_index.core.instrumentation.events.synthesis import SynthesizeEndEvent, SynthesizeStartEvent
from llama_index.core.instrumentation.span import active_span_id
from llama_index.core.schema import QueryBundle

dispatcher = get_dispatcher(__name__)


@contextmanager
def retrieval(callback_manager: CallbackManager, query: QueryBundle) -> Iterator[list]:
    """The events a LlamaIndex retriever emits around a retrieval (``RetrievalStart/EndEvent``, a ``RETRIEVE``
    callback event), for the query engine, which routes through the service itself; put the retrieved nodes into
    the yielded list."""
    dispatcher.event(RetrievalStartEvent(str_or_query_bundle=query))
    nodes: list = []
    with callback_manager.event(CBEventType.RETRIEVE, payload={EventPayload.QUERY_STR: query.query_str}) as event:
        yield nodes
        event.on_end(payload={EventPayload.NODES: nodes})
    dispatcher.event(RetrievalEndEvent(str_or_query_bundle=query, nodes=nodes))


def usage_of(result: Any) -> dict:
    """Token usage of a :class:`kvzip_rag.qa.QAResult`, summed over every cache that answered."""
    prompt = sum(a.answer.prompt_tokens + a.target_tokens for a in result.answers) if result else 0
    completion = sum(len(a.answer.token_ids) for a in result.answers) if result else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "cached_tokens": sum(a.target_tokens for a in result.answers) if result else 0}


class Trace:
    """One synthesis with one LLM step: ``start()`` before generating, ``end(text, result)`` after (or ``fail``)."""

    def __init__(self, callback_manager: Optional[CallbackManager], query: str, model: dict) -> None:
        self.callbacks = callback_manager or CallbackManager()
        self.query, self.model = query, model
        self.span_id = active_span_id.get()

    def start(self) -> "Trace":
        dispatcher.event(SynthesizeStartEvent(query=self.query, span_id=self.span_id))
        self.synth_id = self.callbacks.on_event_start(CBEventType.SYNTHESIZE,
                                                      payload={EventPayload.QUERY_STR: self.query})
        dispatcher.event(LLMCompletionStartEvent(model_dict=self.model, prompt=self.query, additional_kwargs={},
                                                 span_id=self.span_id))
        self.llm_id = self.callbacks.on_event_start(
            CBEventType.LLM, payload={EventPayload.PROMPT: self.query, EventPayload.SERIALIZED: self.model})
        return self

    def end(self, text: str, result: Any, response: Any) -> None:
        completion = CompletionResponse(text=text, raw={"usage": usage_of(result)})
        self.callbacks.on_event_end(CBEventType.LLM, payload={EventPayload.PROMPT: self.query,
                                                              EventPayload.COMPLETION: completion},
                                    event_id=self.llm_id)
        dispatcher.event(LLMCompletionEndEvent(prompt=self.query, response=completion, span_id=self.span_id))
        self.callbacks.on_event_end(CBEventType.SYNTHESIZE, payload={EventPayload.RESPONSE: response},
                                    event_id=self.synth_id)
        dispatcher.event(SynthesizeEndEvent(query=self.query, response=response, span_id=self.span_id))

    def fail(self, error: BaseException) -> None:
        self.callbacks.on_event_end(CBEventType.LLM, payload={EventPayload.EXCEPTION: error}, event_id=self.llm_id)
        self.callbacks.on_event_end(CBEventType.SYNTHESIZE, payload={EventPayload.EXCEPTION: error},
                                    event_id=self.synth_id)
