"""Continuous batching: answers asked from any thread decode together, one token of every running answer per pass.

A request is an :class:`~kvzip_rag.generate.AnswerStream` prepared as for one answer (checked, clamped to the
window, with its evidence flag; :func:`~kvzip_rag.generate.stream_answer`), or a conversation's
turn (:meth:`~kvzip_rag.generate.Conversation.stream`, its cache keeping the turn). It waits in a bounded queue. At
every step waiting requests are admitted to the free places (up to ``max_batch``), one forward pass
(:func:`~kvzip_rag.batch.batched_forward`) appends each running answer's last token and each admitted question's
whole prompt, every sequence to its own cache (questions arriving together are prefilled together, beside the
answers already decoding), and then every answer takes its next token from the pass's logits
(:class:`~kvzip_rag.generate.Decoding`, the one per-token rule: sampling options, stop strings, clean ends are per
request), its piece posted at once; those that end leave. A closed request (``BatchRequest.close``, or a consumer
that stops iterating) leaves at once, its cache reset.

Locking: every step runs under the model's one lock (``QAService.lock``), so routing, loading, composing and the
unbatched paths (indexing) interleave with steps; a request waits for its pieces with that lock let go
(:func:`released`), so a caller that holds it (a chat session does) never blocks the batch, and pieces reach it
without taking the lock. A service's answer holds the lock only to load its cache and submit it
(``QAService.start``) and finishes without it (its evidence, its result), so its client's next question can join
one step sooner than if the answer had to take the lock back. The lock is a :class:`FairRLock`: between two steps
every thread already waiting for it gets its turn.

Memory: a request's cache is loaded before it is queued (loading is per request, under the lock, so one at a time);
at most ``max_batch`` running and ``max_queue`` waiting requests hold caches, and a request beyond that is refused at
once with :class:`~kvzip_rag.errors.QueueFullError` (never a hang). So the caches held at once are at most
``max_batch + max_queue`` (plus the one being loaded by the caller that holds the lock), each the cache that answers
its question (the routed caches at the service's ratio, composed when ``k`` > 1: ``QAResult.cache_bytes``) and its
question's and answer's tail.
:meth:`BatchScheduler.close` fails every request held and stops the thread.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .batch import batched_forward
from .errors import InvalidArgumentError, QueueFullError, ServiceClosedError
from .evidence import EvidenceRecorder
from .generate import Answer, AnswerStream
from .models import KVzipModel

DEFAULT_MAX_BATCH = 8
DEFAULT_MAX_QUEUE = 64


class FairRLock:
    """A reentrant lock handed to its waiters in arrival order, usable with ``threading.Condition``.

    ``threading.RLock`` lets the thread that releases it take it straight back; the batch scheduler releases and
    retakes the lock at every step, so on a busy CPU the threads waiting to route, load or receive pieces would
    rarely get it and the batch would stay small. Here a release hands the lock to the longest waiter."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._count = 0
        self._waiters: deque[tuple[int, threading.Lock]] = deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._count += 1
                return True
            if self._owner is None and not self._waiters:
                self._owner, self._count = me, 1
                return True
            if not blocking:
                return False
            baton = threading.Lock()
            baton.acquire()
            self._waiters.append((me, baton))
        if baton.acquire(timeout=timeout):  # released by the thread that hands the lock over
            return True
        with self._mutex:
            if (me, baton) in self._waiters:
                self._waiters.remove((me, baton))
                return False
        return True  # handed over while the wait timed out

    def release(self) -> None:
        with self._mutex:
            if self._owner != threading.get_ident():
                raise RuntimeError("cannot release un-acquired lock")
            self._count -= 1
            if not self._count:
                self._hand_over()

    def _hand_over(self) -> None:
        """To the longest waiter, or free (under ``_mutex``)."""
        if self._waiters:
            owner, baton = self._waiters.popleft()
            self._owner, self._count = owner, 1
            baton.release()
        else:
            self._owner = None

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # what threading.Condition uses to release a reentrant lock fully while it waits
    def _is_owned(self) -> bool:
        return self._owner == threading.get_ident()

    def _release_save(self) -> int:
        with self._mutex:
            count, self._count = self._count, 0
            self._hand_over()
        return count

    def _acquire_restore(self, count: int) -> None:
        self.acquire()
        self._count = count


@contextmanager
def released(lock: threading.RLock | FairRLock) -> Iterator[None]:
    """Let go of the calling thread's hold on ``lock`` (however many times it took it) meanwhile: a request waits for
    its pieces this way, so the batch steps while its caller (e.g. a composer) holds the lock."""
    if not lock._is_owned():
        yield
        return
    state = lock._release_save()
    try:
        yield
    finally:
        lock._acquire_restore(state)


def check_sizes(max_batch: int, max_queue: int) -> None:
    """Both must be positive integers (a one-line ``InvalidArgumentError``)."""
    for name, value in (("max_batch", max_batch), ("max_queue", max_queue)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise InvalidArgumentError(f"{name} must be a positive integer, got {value!r}")


class BatchRequest:
    """One answer in the scheduler: iterate its text pieces (in any thread); ``stream.result`` holds the ``Answer``
    afterwards. ``close()``, or leaving the loop early, takes it out of the batch at once."""

    def __init__(self, scheduler: BatchScheduler, stream: AnswerStream) -> None:
        self.scheduler, self.stream = scheduler, stream
        self.ready = threading.Condition()  # its own: a consumer waits for pieces without the model's lock
        self.decoding = stream.decoding()  # its clock starts at submission: queueing counts in time to first token
        self.recorder: EvidenceRecorder | None = None
        self.pieces: deque[str] = deque()
        self.finished = False
        self.error: BaseException | None = None

    @property
    def result(self) -> Answer | None:
        return self.stream.result

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                with self.ready:
                    self.ready.wait_for(lambda: self.pieces or self.finished)
                    if self.pieces:
                        piece = self.pieces.popleft()
                    elif self.error is not None:
                        raise self.error
                    else:
                        return
                yield piece
        finally:
            self.close()

    def close(self) -> None:
        """Leave the queue or the batch now (its cache back to the document); no effect once finished."""
        with self.scheduler.condition:
            if not self.finished:
                self.scheduler._remove(self)
                self._end(None)

    # -- called by the scheduler, under the lock -----------------------------------------------------------------
    def _admit(self) -> list[int]:
        """What it appends in its first pass: its prompt (recording its evidence from there on)."""
        self.recorder = self.stream.recorder()
        self.stream.reserve_room()
        return self.stream.prompt_ids

    def _end(self, error: BaseException | None, done: bool = False) -> None:
        """Finish (``done``: with its ``Answer``), fail (``error``) or drop it (:meth:`AnswerStream.finish`)."""
        # its arena slots go to the next request that joins (the cache, e.g. a conversation's, keeps a copy)
        self.stream.cache.leave_arena()
        self.stream.finish(self.decoding, self.recorder, done)
        with self.ready:
            self.error, self.finished = error, True
            self.ready.notify_all()

    def _post(self, piece: str) -> None:
        with self.ready:
            self.pieces.append(piece)
            self.ready.notify_all()


class BatchScheduler:
    """Continuous batching of one model's answers (see the module). ``lock``: the model's one lock (a
    :class:`FairRLock`, so that waiting threads get it between steps)."""

    def __init__(self, model: KVzipModel, lock: threading.RLock | FairRLock, max_batch: int = DEFAULT_MAX_BATCH,
                 max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        check_sizes(max_batch, max_queue)
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.lock = lock
        self.condition = threading.Condition(lock)
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # batched forward passes so far
        self.decoded = 0  # sequences advanced by them (decoded / steps: the mean batch)
        self.peak_batch = 0  # most sequences in one pass
        self.peak_prefill = 0  # most questions prefilled in one pass

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def alive(self) -> bool:
        """Whether its decoding thread runs (it starts with the first request and ends at :meth:`close`)."""
        return self._thread is not None and self._thread.is_alive()

    def submit(self, stream: AnswerStream) -> BatchRequest:
        """Queue one answer (independent, or a conversation's turn: ``stream.keep``); it joins the batch at the
        next step. ``QueueFullError`` when ``max_queue`` wait; ``ServiceClosedError`` after :meth:`close`."""
        if stream.model is not self.model:
            raise InvalidArgumentError("this scheduler decodes another model's answers")
        with self.condition:
            if self._closed:
                raise ServiceClosedError("the service was closed: it answers no more questions; open a new one")
            if len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"{self.max_queue} answers already wait for a place in the batch of "
                                     f"{self.max_batch}; retry later or raise max_queue / max_batch")
            request = BatchRequest(self, stream)
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="kvzip-batch", daemon=True)
                self._thread.start()
            self.condition.notify_all()
        return request

    def close(self) -> None:
        """Fail waiting and running answers (``ServiceClosedError``), stop the decoding thread and wait for it to
        end; later submissions are refused. Idempotent; callable while holding the model's lock."""
        with self.condition:
            self._closed = True
            for request in [*self._waiting, *self._running]:
                state = "waited in the queue" if request in self._waiting else "was being decoded"
                self._remove(request)
                request._end(ServiceClosedError(f"the service was closed while this answer {state}"))
            self.condition.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            with released(self.lock):  # the thread takes the lock to see that it is closed
                self._thread.join()

    def _remove(self, request: BatchRequest) -> None:
        if request in self._waiting:
            self._waiting.remove(request)
        elif request in self._running:
            self._running.remove(request)

    def _loop(self) -> None:
        while True:
            with self.condition:
                self.condition.wait_for(lambda: self._waiting or self._running or self._closed)
                if self._closed:
                    return
                with torch.inference_mode():
                    self._step()

    def _leave(self, request: BatchRequest, error: BaseException | None = None, done: bool = False) -> None:
        self._running.remove(request)
        request._end(error, done)

    def _step(self) -> None:
        """Waiting requests are admitted to the free places; one forward pass appends every running answer's token
        and every admitted question's prompt, each to its own cache; then every answer takes its next token from
        the pass's logits (its piece posted at once) and those that end leave. A failure fails only its own answer
        (a failed pass, every answer in it)."""
        joining = []
        while self._waiting and len(self._running) + len(joining) < self.max_batch:
            joining.append(self._waiting.popleft())
        tokens = [[r.decoding.feed] for r in self._running] + [r._admit() for r in joining]
        self._running += joining
        if not self._running:
            return
        self.peak_batch = max(self.peak_batch, len(self._running))
        self.peak_prefill = max(self.peak_prefill, len(joining))
        self.steps += 1
        self.decoded += len(self._running)
        try:
            logits = batched_forward(self.model, [r.stream.cache for r in self._running], tokens)
        except Exception as error:  # noqa: BLE001 - every answer of the pass failed
            for request in list(self._running):
                self._leave(request, error)
            return
        for request, row in zip(list(self._running), logits):
            if request.decoding.done:  # a kept turn's last token: now in its cache
                self._leave(request, done=True)
                continue
            try:
                piece = request.decoding.step(row)
            except Exception as error:  # noqa: BLE001 - handed to its consumer
                self._leave(request, error)
                continue
            if piece:
                request._post(piece)
            if not request.stream.goes_on(request.decoding):
                self._leave(request, done=True)
