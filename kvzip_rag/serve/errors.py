"""Errors as HTTP answers, one rule: a mistake in the request is a 4xx with the library's one-line reason
(``InvalidArgumentError``, a context too long, a parameter of the wrong type: 400; an unknown document or
model: 404), a request past the server's
timeout 504, a store that cannot answer, a full answer queue or a closed service 503 (retry later or elsewhere),
anything else 500 with its first line (never a traceback to the client)."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kvzip_rag.errors import (
    ContextTooLongError,
    DocumentNotFoundError,
    EmptyDocumentError,
    InvalidArgumentError,
    KVzipError,
    ModelNotFoundError,
    QueueFullError,
    ServiceClosedError,
    StoreError,
)

from .wire import error_body


def one_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines() or [type(error).__name__])[0]


def status_of(error: BaseException) -> int:
    from kvzip_rag.qa import EmptyIndexError

    if isinstance(error, (DocumentNotFoundError, ModelNotFoundError)):
        return 404
    if isinstance(error, (InvalidArgumentError, ContextTooLongError, EmptyDocumentError, EmptyIndexError,
                          RequestValidationError)):
        return 400
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):  # one class from Python 3.11 on
        return 504
    if isinstance(error, (StoreError, QueueFullError, ServiceClosedError)):
        return 503
    return 500


def describe(error: BaseException, timeout: float | None = None) -> tuple[str, int]:
    """``(one-line message, status)`` of an error."""
    status = status_of(error)
    if status == 504:
        return f"the request took longer than the server's timeout ({timeout:g} s)", 504
    if isinstance(error, RequestValidationError):  # a query or path parameter of the wrong type
        first = error.errors()[0]
        return f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid')}", 400
    if status == 500 and not isinstance(error, KVzipError):
        return f"internal error: {type(error).__name__}: {one_line(error)}", 500
    return one_line(error), status


def install(app, timeout: float | None) -> None:
    """Register the rule above on a FastAPI app."""

    async def handle(_: Request, error: Exception) -> JSONResponse:
        message, status = describe(error, timeout)
        return JSONResponse(error_body(message, status), status_code=status)

    for kind in (KVzipError, TimeoutError, asyncio.TimeoutError, RequestValidationError, Exception):
        app.add_exception_handler(kind, handle)
