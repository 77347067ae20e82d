"""The OpenAI wire format: completion objects, streamed chunks (Server-Sent Events) and error bodies, for the chat
(``chat.completion``) and the legacy text (``text_completion``) endpoints."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from .answers import Outcome

DONE = "data: [DONE]\n\n"


def sse(payload: dict) -> str:
    """One Server-Sent Event as OpenAI clients read it."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def error_body(message: str, status: int) -> dict:
    """OpenAI's error object (clients show ``message``)."""
    kinds = {400: "invalid_request_error", 404: "not_found_error", 504: "timeout", 503: "server_unavailable"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"), "param": None,
                      "code": status}}


@dataclass
class Completion:
    """One response's identity and shape: ``chat`` (messages, deltas) or text completions."""

    model: str
    chat: bool
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, streamed: bool) -> dict:
        if self.chat:
            kind = "chat.completion.chunk" if streamed else "chat.completion"
            return {"id": f"chatcmpl-{self.id}", "object": kind, "created": self.created, "model": self.model}
        return {"id": f"cmpl-{self.id}", "object": "text_completion", "created": self.created, "model": self.model}

    def whole(self, outcome: Outcome) -> dict:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": outcome.text},
                      "finish_reason": outcome.finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": outcome.text, "finish_reason": outcome.finish_reason, "logprobs": None}
        return {**self._head(False), "choices": [choice], "usage": outcome.usage(), **outcome.extras()}

    def _choice(self, text: str | None, reason: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}

    def first(self) -> str:
        """The opening chunk (chat: the assistant role, no text yet)."""
        return sse({**self._head(True), "choices": [self._choice("", None, first=True)]})

    def piece(self, text: str) -> str:
        return sse({**self._head(True), "choices": [self._choice(text, None)]})

    def last(self, outcome: Outcome, include_usage: bool) -> str:
        """The closing chunk with the finish reason and our fields, the usage chunk when asked, then ``[DONE]``."""
        events = sse({**self._head(True), "choices": [self._choice(None, outcome.finish_reason)],
                      **outcome.extras()})
        if include_usage:
            events += sse({**self._head(True), "choices": [], "usage": outcome.usage()})
        return events + DONE

    def failed(self, message: str, status: int) -> str:
        """A failure after the stream began (the status line is sent): an error event, as OpenAI streams do."""
        return sse(error_body(message, status)) + DONE
