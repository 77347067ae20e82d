"""A request answered by the QA service: text pieces as generated, then one :class:`Outcome` (sources, citations,
abstention, token counts). The model runs in a worker thread (:mod:`kvzip_rag.bridge`): the event loop only
awaits, and a consumer that stops (a client gone, a timeout) stops the worker at its next token."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .requests import AnswerRequest

if TYPE_CHECKING:
    from kvzip_rag.answers import Citation, Target
    from kvzip_rag.qa import QAService


@dataclass
class Outcome:
    """What the response carries besides the text: the answer's sources and grounding, and its token counts."""

    text: str  # the answer (the abstention when ``abstained``; streamed pieces are the candidate)
    finish_reason: str  # OpenAI's: "stop" or "length"
    sources: list[dict]
    citations: list[dict]
    abstained: bool
    unsupported_numbers: list[str]  # the answer's numbers that none of its documents holds
    prompt_tokens: int
    completion_tokens: int

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def extras(self) -> dict:
        """Our top-level fields of a completion object (and of the last streamed chunk)."""
        return {"sources": self.sources, "citations": self.citations, "abstained": self.abstained,
                "unsupported_numbers": self.unsupported_numbers}


def source(target: Target) -> dict:
    """A routed segment as the response names it."""
    return {"node_id": target.node_id, "doc_id": target.doc_id, "segment_index": target.segment_index,
            "score": target.score, "routing": target.routing, "text": target.text, "metadata": dict(target.metadata)}


def finish_reason(engine_reason: str) -> str:
    """The engine's reason in OpenAI's words: an answer cut by the window was cut for length."""
    return "stop" if engine_reason == "stop" else "length"


def _citations(citations: list[Citation]) -> list[dict]:
    return [c.as_dict() for c in citations]


class Answering:
    """The server's answers over one service (and services sharing its store, model and lock at other ratios)."""

    def __init__(self, service: QAService) -> None:
        self.service = service
        self._by_ratio: dict[float, QAService] = {}
        self._guard = threading.Lock()

    def service_for(self, ratio: float | None) -> QAService:
        """The service that loads caches at ``ratio`` (``None``: the server's own)."""
        from kvzip_rag.qa import QAService

        base = self.service
        if ratio is None or ratio == base.ratio:
            return base
        with self._guard:
            if ratio not in self._by_ratio:
                self._by_ratio[ratio] = QAService(base.store, base.model, ratio=ratio, level=base.level,
                                                  compose=base.composer, scope=base.scope, lock=base.lock)
            return self._by_ratio[ratio]

    async def pieces(self, request: AnswerRequest) -> AsyncIterator[str | Outcome]:
        """The answer's text pieces as generated, then its :class:`Outcome`; errors (unknown document, context
        too long) come before any piece."""
        if request.turns:
            from kvzip_rag.bridge import apush_in_thread

            async for item in apush_in_thread(lambda emit: self._chat(request, emit), name="kvzip-serve-chat"):
                yield item
            return
        service = self.service_for(request.ratio)
        stream = await asyncio.to_thread(
            service.stream, request.question, request.k, doc_ids=request.doc_ids, compose=request.compose,
            **request.grounding, **request.sampling)
        async for piece in stream:
            yield piece
        result = stream.result
        best = result.best
        yield Outcome(result.text, finish_reason(result.finish_reason), [source(t) for t in result.used],
                      _citations(result.citations), result.abstained, list(result.unsupported_numbers),
                      best.answer.prompt_tokens + best.target_tokens,
                      len(best.answer.token_ids))

    def _chat(self, request: AnswerRequest, emit: Any) -> None:
        """A conversation's last turn: earlier turns replayed into the routed caches
        (:class:`kvzip_rag.dialogue.ChatSession`), then graded as ``ask`` grades them."""
        from kvzip_rag.dialogue import ChatSession

        service = self.service_for(request.ratio)
        session = ChatSession(service, k=request.k, doc_ids=request.doc_ids,
                              sampling={**request.sampling, **request.grounding}, compose=request.compose)
        turn = session.ask(request.question, history=request.turns, emit=emit)  # records and grades its evidence
        emit(Outcome(turn.text, finish_reason(turn.answer.finish_reason), [source(t) for t in turn.documents],
                     _citations(turn.citations), turn.abstained, list(turn.unsupported_numbers),
                     turn.cached_tokens + turn.replayed_tokens + turn.answer.prompt_tokens,
                     len(turn.answer.token_ids)))
