"""Continuous batching: answers asked from any thread decode together, one token of every running answer per pass.

A request is an :class:`~kvzip_rag.generate.AnswerStream` prepared as for one answer (checked, clamped to the
window, with its quote constraint and evidence flag; :func:`~kvzip_rag.generate.stream_answer`). It waits in a
bounded queue; at every step the scheduler first admits waiting requests up to ``max_batch`` (each question is
prefilled over its own cache, batch size 1), then every running answer takes its token (:class:`~kvzip_rag.generate.
Decoding`, the one per-token rule: sampling options, stop strings, clean ends are per request), and those that go on
are decoded together in one forward pass (:func:`~kvzip_rag.batch.batched_forward`). Finished answers leave at once;
so does a closed one (``BatchRequest.close``, or a consumer that stops iterating), its cache reset.

Locking: every step runs under the model's one lock (``QAService.lock``), so routing, loading, composing and the
unbatched paths (conversations, indexing) interleave with steps; a request waits for its pieces with that lock let
go (:func:`released`), so a caller that holds it (the composers do) never blocks the batch, and pieces reach it
without taking the lock. The lock is a :class:`FairRLock`: between two steps every thread already waiting for it
gets its turn.

Memory: a request's cache is loaded before it is queued (loading is per request, under the lock, so one at a time);
at most ``max_batch`` running and ``max_queue`` waiting requests hold caches, and a request beyond that is refused at
once with :class:`~kvzip_rag.errors.QueueFullError` (never a hang).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .batch import batched_forward
from .errors import InvalidArgumentError, KVzipError, QueueFullError
from .evidence import EvidenceRecorder
from .generate import Answer, AnswerStream, packed_forward
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
        self.logits: torch.Tensor | None = None
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
    def _prefill(self) -> None:
        stream = self.stream
        self.recorder = EvidenceRecorder(stream.cache) if stream.evidence else None
        self.logits = packed_forward(stream.model, stream.cache, stream.prompt_ids)

    def _end(self, error: BaseException | None, done: bool = False) -> None:
        """Finish (``done``: with its ``Answer``), fail (``error``) or drop it; the cache is reset either way."""
        evidence = self.recorder.finish() if self.recorder is not None else None
        end = time.perf_counter()
        self.stream.cache.reset()
        if done:
            self.stream.result = self.decoding.result(len(self.stream.prompt_ids), end, evidence)
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
        self.condition = threading.Condition(lock)
        self._waiting: deque[BatchRequest] = deque()
        self._running: list[BatchRequest] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        self.steps = 0  # batched forward passes so far
        self.decoded = 0  # tokens decoded by them (decoded / steps: the mean batch)
        self.peak_batch = 0  # most answers decoded in one pass

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, stream: AnswerStream) -> BatchRequest:
        """Queue one answer; it joins the batch at the next step. ``QueueFullError`` when ``max_queue`` wait."""
        if stream.keep:
            raise InvalidArgumentError("conversations keep their turns in the cache: they answer on their own loop")
        if stream.model is not self.model:
            raise InvalidArgumentError("this scheduler decodes another model's answers")
        with self.condition:
            if self._closed:
                raise KVzipError("the batch scheduler is closed")
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
        """Fail waiting and running answers, and stop the decoding thread."""
        with self.condition:
            self._closed = True
            for request in [*self._waiting, *self._running]:
                self._remove(request)
                request._end(KVzipError("the batch scheduler was closed"))
            self.condition.notify_all()

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

    def _step(self) -> None:
        """Admit, one token each, then one forward pass for those that go on; a failure fails only its own."""
        while self._waiting and len(self._running) < self.max_batch:
            request = self._waiting.popleft()
            try:
                request._prefill()
            except Exception as error:  # noqa: BLE001 - handed to its consumer
                request._end(error)
                continue
            self._running.append(request)
        for request in list(self._running):
            try:
                piece = request.decoding.step(request.logits)
            except Exception as error:  # noqa: BLE001 - handed to its consumer
                self._running.remove(request)
                request._end(error)
                continue
            if piece:
                request._post(piece)
            if request.decoding.feed is None or request.decoding.done:
                self._running.remove(request)
                request._end(None, done=True)
        if not self._running:
            return
        self.peak_batch = max(self.peak_batch, len(self._running))
        self.steps += 1
        self.decoded += len(self._running)
        try:
            logits = batched_forward(self.model, [r.stream.cache for r in self._running],
                                     [r.decoding.feed for r in self._running])
        except Exception as error:  # noqa: BLE001 - every answer of the pass failed
            for request in list(self._running):
                self._running.remove(request)
                request._end(error)
            return
        for request, row in zip(self._running, logits):
            request.logits = row
