"""The FastAPI app: OpenAI-compatible completions over a :class:`~kvzip_rag.qa.QAService`, documents, health.

Answers go through the service's public ``stream`` (and :class:`~kvzip_rag.dialogue.ChatSession` for a chat with
history), so a scheduler inside the service serves the server unchanged. ``timeout``: the most seconds a request
may take (504 before the first byte; an error event in a stream already begun); a client that leaves a stream
stops its answer at the next token.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

from kvzip_rag.extras import require

for _module in ("fastapi", "uvicorn"):
    require(_module, "serve", "kvzip-rag serve")

from fastapi import FastAPI, Request  # noqa: E402  (after the extra check)
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402

from kvzip_rag.errors import InvalidArgumentError, ModelNotFoundError  # noqa: E402

from . import errors  # noqa: E402
from .answers import Answering, Outcome  # noqa: E402
from .documents import router as documents_router  # noqa: E402
from .requests import AnswerRequest, chat_request, completion_request  # noqa: E402
from .wire import Completion  # noqa: E402

if TYPE_CHECKING:
    from kvzip_rag.qa import QAService

T = TypeVar("T")
ALIAS = "kvzip-rag"  # a model name that always means the served model (for clients that need one fixed name)


async def read_body(request: Request) -> Any:
    """The JSON body; 400 when it is not JSON."""
    try:
        return json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidArgumentError(f"the request body is not valid JSON: {error}") from None


def create_app(service: QAService, *, timeout: float | None = None) -> FastAPI:
    """The server's app over ``service`` (its model is loaded here: the first request finds it warm)."""
    if timeout is not None and not timeout > 0:
        raise InvalidArgumentError(f"timeout must be a positive number of seconds, got {timeout!r}")
    model = service.model
    answering = Answering(service)
    app = FastAPI(title="kvzip-rag", summary="Answers from KVzip-compressed KV caches (OpenAI-compatible)")
    errors.install(app, timeout)
    app.include_router(documents_router(service, read_body))

    def check_model(request: AnswerRequest) -> None:
        if request.model not in (model.name, ALIAS):
            raise ModelNotFoundError(f"model {request.model!r} is not served here; use {model.name!r} (or "
                                     f"{ALIAS!r})")

    async def within(step: Awaitable[T], deadline: float | None) -> T:
        if deadline is None:
            return await step
        return await asyncio.wait_for(step, max(deadline - time.monotonic(), 0.0))

    async def respond(request: AnswerRequest, chat: bool) -> Any:
        check_model(request)
        completion = Completion(model.name, chat)
        deadline = time.monotonic() + timeout if timeout is not None else None
        items = answering.pieces(request)
        if not request.stream:
            async def collect() -> Outcome:
                async for item in items:
                    if isinstance(item, Outcome):
                        return item
                raise RuntimeError("the answer ended without its outcome")

            return JSONResponse(completion.whole(await within(collect(), deadline)))
        first = await within(anext(items), deadline)  # errors before the first token are HTTP errors
        return StreamingResponse(events(completion, request, items, first, deadline),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def events(completion: Completion, request: AnswerRequest, items: AsyncIterator[str | Outcome],
                     item: str | Outcome, deadline: float | None) -> AsyncIterator[str]:
        """The SSE stream; closing it (the client left) closes ``items``, which stops the answer."""
        try:
            yield completion.first()
            while not isinstance(item, Outcome):
                yield completion.piece(item)
                item = await within(anext(items), deadline)
            yield completion.last(item, request.include_usage)
        except Exception as error:  # noqa: BLE001 - the status line is sent: the error travels as an event
            yield completion.failed(*errors.describe(error, timeout))
        finally:
            await items.aclose()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await respond(chat_request(await read_body(request)), chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await respond(completion_request(await read_body(request)), chat=False)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model", "created": 0,
                                            "owned_by": "kvzip-rag"}]}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model.name, "documents": await asyncio.to_thread(len, service.store),
                "batching": service.batching, "matmul": model.matmul}

    return app
