"""A client of a running ``kvzip-rag serve`` for ``kvzip-rag ask/chat --server URL`` (or ``$KVZIP_RAG_SERVER``): the
chat endpoint streamed over HTTP, so a question costs no model load. Failures are one-line
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
    unsupported_numbers: list[str] = field(default_factory=list)
    first_token_s: float | None = None
    total_s: float = 0.0


class Remote:
    """The server at ``url`` (``http://host:port``, with or without ``/v1``). The standard library's HTTP client:
    a ``--server`` command imports nothing more, so its first token comes soon after it starts."""

    def __init__(self, url: str, timeout: float | None = None) -> None:
        self.url = url.rstrip("/").removesuffix("/v1")
        self.timeout = timeout

    def stream(self, messages: Sequence[tuple[str, str]], answer: RemoteAnswer,
               **fields: Any) -> Iterator[str]:
        """The answer's text pieces as the server streams them; ``answer`` is filled as they come and at the end."""
        import http.client
        from urllib.parse import urlsplit

        body = {"model": "kvzip-rag", "stream": True, **fields,
                "messages": [{"role": role, "content": text} for role, text in messages]}
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ServerError(f"the server URL must be http://HOST:PORT or https://..., got {self.url!r}")
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        start = time.perf_counter()
        connection = kind(parts.hostname, parts.port, timeout=self.timeout)
        try:
            connection.request("POST", f"{parts.path}/v1/chat/completions", body=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
            response = connection.getresponse()
            if response.status >= 400:
                raise ServerError(f"the server at {self.url} refused the question ({response.status}): "
                                  f"{_reason(response.read().decode('utf-8', 'replace'))}")
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for piece in _read(json.loads(line[6:]), answer):
                    if answer.first_token_s is None:
                        answer.first_token_s = time.perf_counter() - start
                    answer.text += piece
                    yield piece
        except (OSError, http.client.HTTPException) as error:
            raise ServerError(f"cannot talk to the kvzip-rag server at {self.url}: {error} (is `kvzip-rag serve` "
                              "running there?)") from None
        finally:
            connection.close()
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
            answer.unsupported_numbers = [str(n) for n in chunk.get("unsupported_numbers") or []]
