"""One way to run blocking model work off the caller's thread: a worker thread feeding a queue.

Every interface (query engines, chat engines, LangChain runnables, async methods) streams through these two
functions, so they all behave alike: one dedicated thread per iteration (a lock taken inside the work is released by
the thread that took it), items delivered as they are produced, errors re-raised in the consumer, and a consumer
that stops early (``break``, ``close()``, task cancellation) stops the work at its next item.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

_ITEM, _ERROR, _DONE = "item", "error", "done"


class _Cancelled(BaseException):
    """Raised inside the work by ``emit`` once the consumer has gone: unwinds it (releasing its locks)."""


def _run(work: Callable[[Callable[[Any], None]], None], post: Callable[[str, Any], None],
         cancelled: threading.Event) -> None:
    def emit(item: Any) -> None:
        if cancelled.is_set():
            raise _Cancelled
        post(_ITEM, item)

    try:
        work(emit)
    except _Cancelled:
        return
    except BaseException as error:  # noqa: BLE001 - handed to the consumer
        post(_ERROR, error)
    else:
        post(_DONE, None)


def _is_item(message: tuple[str, Any]) -> bool:
    """What the consumer does with one message from the worker, sync or async alike: an item is yielded (True),
    the end stops (False), an error is raised here, in the consumer's thread."""
    kind, value = message
    if kind == _ERROR:
        raise value
    return kind == _ITEM


def _pushing(factory: Callable[[], Iterator[T]]) -> Callable[[Callable[[Any], None]], None]:
    def work(emit: Callable[[Any], None]) -> None:
        iterator = factory()
        try:
            for item in iterator:
                emit(item)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    return work


def push_in_thread(work: Callable[[Callable[[Any], None]], None], name: str = "kvzip-worker") -> Iterator[Any]:
    """Run ``work(emit)`` in a worker thread (started at the first ``next``); yield what it emits, as it emits."""
    pipe: queue.Queue = queue.Queue()
    cancelled = threading.Event()
    context = contextvars.copy_context()
    thread = threading.Thread(target=context.run, args=(_run, work, lambda k, v: pipe.put((k, v)), cancelled),
                              name=name, daemon=True)
    thread.start()
    try:
        while _is_item(message := pipe.get()):
            yield message[1]
    finally:
        cancelled.set()


async def apush_in_thread(work: Callable[[Callable[[Any], None]], None],
                          name: str = "kvzip-worker") -> AsyncIterator[Any]:
    """:func:`push_in_thread` for asyncio: the event loop only awaits a queue, never the model."""
    loop = asyncio.get_running_loop()
    pipe: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    context = contextvars.copy_context()

    def post(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(pipe.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone: nobody listens any more
            cancelled.set()

    threading.Thread(target=context.run, args=(_run, work, post, cancelled), name=name, daemon=True).start()
    try:
        while _is_item(message := await pipe.get()):
            yield message[1]
    finally:
        cancelled.set()


def aiterate_in_thread(factory: Callable[[], Iterator[T]], name: str = "kvzip-worker") -> AsyncIterator[T]:
    """Items of ``factory()`` produced in a worker thread, yielded on the event loop."""
    return apush_in_thread(_pushing(factory), name)


async def run_in_thread(function: Callable[[], T], name: str = "kvzip-worker") -> T:
    """``await`` one blocking call through the same bridge (so cancellation and errors behave the same)."""
    result: list[T] = []
    async for value in aiterate_in_thread(lambda: iter([function()]), name=name):
        result.append(value)
    return result[0]
