"""A client of a running ``kvzip-rag serve`` for ``kvzip-rag ask/chat --server URL`` (or ``$KVZIP_RAG_SERVER``): the
chat endpoint streamed over HTTP (httpx), so a question costs no model load. Failures are one-line
:class:`ServerError` s."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvzip_rag.errors import KVzipError

SERVER_ENV = "KVZIP_RAG_SERVER"


class ServerError(KVzipError):
    """The server could not be reached, or refused the request (its one-line reason)."""


@dataclass
class RemoteAnswer:
    """A streamed answer's ending: what the last chunk carried, and the first token's latency seen here."""

    text: str = ""
    finish_reason: str | None = None
    sources: list[dict] = field(default_factory=list)
    citations: list[dict] = field(default_factory=list)
    abstained: bool = False
    first_token_s: float | None = None
    total_s: float = 0.0


class Remote:
    """The server at ``url`` (``http://host:port``, with or without ``/v1``)."""

    def __init__(self, url: str, timeout: float | None = None) -> None:
        from kvzip_rag.extras import require

        require("httpx", "serve", "--server")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout

    def stream(self, messages: Sequence[tuple[str, str]], answer: RemoteAnswer,
               **fields: Any) -> Iterator[str]:
        """The answer's text pieces as the server streams them; ``answer`` is filled as they come and at the end."""
        import httpx

        body = {"model": "kvzip-rag", "stream": True, **{k: v for k, v in fields.items()},
                "messages": [{"role": role, "content": text} for role, text in messages]}
        start = time.perf_counter()
        try:
            # no TLS context for plain http (building one costs a third of a second)
            with httpx.Client(timeout=self.timeout, verify=self.url.startswith("https://")) as client, \
                    client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServerError(f"the server at {self.url} refused the question ({response.status_code}): "
                                      f"{_reason(response.text)}")
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    for piece in _read(json.loads(line[6:]), answer):
                        if answer.first_token_s is None:
                            answer.first_token_s = time.perf_counter() - start
                        answer.text += piece
                        yield piece
        except httpx.HTTPError as error:
            raise ServerError(f"cannot talk to the kvzip-rag server at {self.url}: {error} (is `kvzip-rag serve` "
                              "running there?)") from None
        answer.total_s = time.perf_counter() - start


def _reason(text: str) -> str:
    try:
        return str(json.loads(text)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return (text.strip().splitlines() or ["no reason given"])[0]


def _read(chunk: Mapping[str, Any], answer: RemoteAnswer) -> Iterator[str]:
    if "error" in chunk:
        raise ServerError(f"the server failed while answering: {_reason(json.dumps(chunk))}")
    for choice in chunk.get("choices") or []:
        text = (choice.get("delta") or {}).get("content")
        if text:
            yield text
        if choice.get("finish_reason"):
            answer.finish_reason = choice["finish_reason"]
            answer.sources = list(chunk.get("sources") or [])
            answer.citations = list(chunk.get("citations") or [])
            answer.abstained = bool(chunk.get("abstained"))
