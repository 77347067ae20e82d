"""The question-answering service every interface uses: route, load, answer (CLI, LlamaIndex, LangChain).

    >>> from kvzip_rag.qa import QAService
    >>> qa = QAService("my-store", model="smollm2", threads=1)       # a CacheStore or a folder; model lazily
    >>> result = qa.answer("Who founded Wrenfield?", k=3)            # one answer from the 3 routed caches joined
    >>> result.text, [t.doc_id for t in result.used], result.metadata()["dropped_node_ids"]
    >>> for piece in qa.stream("When was the bridge built?"): ...    # tokens as generated (worker thread)

One place for each rule:

* **Routing** (:meth:`QAService.route`): BM25 full-text search in the store over the service's documents (its
  ``scope``), best first; when no word matches, the first ``k`` segments with score 0 and ``routing="fallback"``.
* **Which cache serves** (:func:`kvzip_rag.budget.select_cache`, the one rule for routing, loading, composition
  and every adapter's metadata): a cache of the answering model's kind (:class:`~kvzip_rag.budget.CacheKind`) that
  serves the service's :class:`~kvzip_rag.budget.Budget`, its own level first, then the smallest stored ratio.
  Routing ranks only segments that have one (a store may hold caches of several models), and each ``Target``
  carries the cache it chose (``Target.cache``).
* **Loading** (:meth:`QAService.load`): through the store's LRU, at the service's ``ratio``/``level`` (a lower
  ratio than stored reads only the slices it keeps; ``None`` = as stored), from the very cache routing chose: when
  its document was replaced since, the question is routed once more (sources and cache from one snapshot).
* **Composition** (:mod:`kvzip_rag.composers`, chosen by name with ``compose=``): how routed caches make one answer.
  ``"parallel"`` (default) and ``"sequential"``: the routed caches joined into one cache that answers once
  (:mod:`kvzip_rag.compose`; documents that do not fit the window are dropped and reported); ``"best-of-k"``: every
  cache answers on its own, refusals rank below real answers, then the highest mean token log-probability, then
  the better retrieval rank. One routed cache answers as it is. New strategies subclass :class:`Composer` and call
  :func:`register_composer`.
* **One model lock** (``service.lock``, an ``RLock``) around every use of the model, and **one bridge** to worker
  threads (:mod:`kvzip_rag.bridge`) for streaming and async. With ``batching=True`` the answers of concurrent calls
  and chat turns (:class:`~kvzip_rag.dialogue.ChatSession`) decode together (:mod:`kvzip_rag.scheduler`, its steps
  under the same lock; :meth:`QAService.produce`); a call waits for its pieces without holding the lock.
  :meth:`QAService.close` (or ``with``) fails what is queued and stops the batching thread.
* **Argument checks, once, at the boundary**: the public methods take the question (:func:`check_question`), ``k``
  (:func:`check_k`) and answer options (:meth:`~kvzip_rag.generate.SamplingOptions.from_options`); inner layers take
  ``Target``, ``Budget`` and ``SamplingOptions``. A question that alone exceeds the model's window raises
  ``ContextTooLongError`` before any cache is loaded; an answer is clamped to the window left
  (``finish_reason="window"``). The conversation window and chat-history folding live in :mod:`kvzip_rag.dialogue`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .abstain import DEFAULT_ABSTAIN_TEXT, DEFAULT_THRESHOLD, Grounding
from .answers import CacheAnswer, Citation, QAResult, Target, choose_best, is_refusal
from .budget import DEFAULT_BUDGET, Budget, CacheKind, select_cache
from .checks import as_list, check_index
from .composers import COMPOSERS, DEFAULT_COMPOSE, BestOfK, Composer, get_composer, register_composer
from .errors import CacheChangedError, InvalidArgumentError, KVzipError, ModelMismatchError
from .paths import default_store_path
from .store.validate import check_doc_id, check_k, check_query, doc_id_list

__all__ = [
    "COMPOSERS", "DEFAULT_COMPOSE", "BestOfK", "CacheAnswer", "Composer", "EmptyIndexError", "QAResult",
    "Plan", "QAService", "QAStream", "Routing", "Target", "as_target", "check_k", "check_question", "check_sampling",
    "choose_best", "default_store_path", "get_composer", "is_refusal", "open_store",
    "register_composer",
]

if TYPE_CHECKING:  # the engine and the store import torch: only when a service is built
    from .generate import AnswerStream, SamplingOptions
    from .models import KVzipModel
    from .store import CacheStore
    from .scheduler import BatchScheduler

DEFAULT_RATIO, DEFAULT_LEVEL = DEFAULT_BUDGET.ratio, DEFAULT_BUDGET.level
_TEXTS_READ: ContextVar[dict | None] = ContextVar("kvzip_rag_stored_texts", default=None)


@contextmanager
def _reading_once() -> Iterator[None]:
    """Within this block (one answer: citations, evidence, the quote), each segment's stored text is read
    from the store once (per cache routing chose, so a replaced document is read anew)."""
    token = _TEXTS_READ.set({})
    try:
        yield
    finally:
        _TEXTS_READ.reset(token)


class EmptyIndexError(KVzipError, ValueError):
    """A question was asked of a store or index that holds no document yet."""


# ------------------------------------------------------------------------------------------------ checks


def check_question(question: Any, what: str = "question") -> str:
    """The question, stripped; an empty or non-string one, or one with a lone surrogate or NUL, is refused."""
    if question is not None and not isinstance(question, str):
        raise InvalidArgumentError(f"the {what} is a string, got {type(question).__name__}")
    if not question or not question.strip():
        raise InvalidArgumentError(f"the {what} is empty")
    if "\x00" in question:  # the tokenizer would refuse it with its own exception
        raise InvalidArgumentError(f"the {what} contains a NUL character (at position {question.index(chr(0))})")
    return check_query(question.strip())


def sampling_options(options: Mapping[str, Any]) -> SamplingOptions:
    """Answer options given by name as the engine takes them (:meth:`SamplingOptions.from_options`)."""
    from .generate import SamplingOptions

    return SamplingOptions.from_options(options)


def batch_sizes(max_batch: int | None, max_queue: int | None) -> tuple[int, int]:
    """``(max_batch, max_queue)`` of a batching service, defaults filled in, checked (:mod:`kvzip_rag.scheduler`)."""
    from .scheduler import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, check_sizes

    sizes = (DEFAULT_MAX_BATCH if max_batch is None else max_batch,
             DEFAULT_MAX_QUEUE if max_queue is None else max_queue)
    check_sizes(*sizes)
    return sizes


def fair_lock():
    """The lock a batching service takes by default (:class:`kvzip_rag.scheduler.FairRLock`)."""
    from .scheduler import FairRLock

    return FairRLock()


def check_sampling(sampling: Mapping[str, Any]) -> dict:
    """The given answer options checked and normalised by :meth:`SamplingOptions.from_options`, by name again (for
    callers that pass them on as keywords; only the names given, ``max_tokens`` as ``max_new_tokens``)."""
    from .generate import SamplingOptions

    options = sampling_options(sampling)
    return {name: getattr(options, name) for name in map(SamplingOptions.canonical, sampling)}


def open_store(store: CacheStore | str | os.PathLike | None) -> CacheStore:
    """A ``CacheStore`` from itself, a folder, or ``None`` (the default store)."""
    from .store import CacheStore

    if isinstance(store, CacheStore):
        return store
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise InvalidArgumentError(f"store must be a kvzip_rag.store.CacheStore or a folder, got {type(store).__name__}")
    return CacheStore(default_store_path() if store is None else store)


# ------------------------------------------------------------------------------------------------ the service


@dataclass
class Routing:
    targets: list[Target]
    fallback: bool
    seconds: float


class QAService:
    """Route, load and answer over one store with one model (see the module docstring).

    Args:
        store: a :class:`~kvzip_rag.store.CacheStore`, a folder, or ``None`` for the default store.
        model: a :class:`~kvzip_rag.KVzipModel`, or an alias / folder / ``.gguf`` / hub id loaded on first use.
        ratio, level: what caches are loaded at (``None``: as stored; a lower ratio reads fewer bytes).
        threads: CPU threads for a model loaded here (:mod:`kvzip_rag.runtime`; default ``$KVZIP_RAG_THREADS``,
            else by load average).
        compose: the composition strategy's name (default ``"parallel"``) or a :class:`Composer`; each call can
            override it with ``compose=``.
        scope: a callable giving the document ids this service may route to (``None``: the whole store).
        lock: share a lock with other users of the same model (default: a new ``RLock``; with ``batching``, a
            :class:`~kvzip_rag.scheduler.FairRLock`, handed to waiting threads between decoding steps).
        batching: decode the answers of concurrent calls together (:mod:`kvzip_rag.scheduler`, continuous
            batching; off by default); ``max_batch`` answers per forward pass (default 8) and ``max_queue`` waiting
            (default 64; beyond, ``QueueFullError``). Routing, loading and composing stay per call. ``close()``
            (or ``with QAService(...) as qa``) fails queued and running answers and stops the batching thread.
    """

    def __init__(self, store: CacheStore | str | os.PathLike | None = None,
                 model: KVzipModel | str | os.PathLike | None = None, *, ratio: float | None = None,
                 level: str | None = None, threads: int | None = None, device: str | None = None,
                 compose: str | Composer = DEFAULT_COMPOSE, scope: Callable[[], list[str]] | None = None,
                 lock: threading.RLock | None = None,
                 model_loader: Callable[[], KVzipModel] | None = None, batching: bool = False,
                 max_batch: int | None = None, max_queue: int | None = None) -> None:
        from .models import KVzipModel, check_model_arg
        from .runtime import resolve_threads

        budget = Budget(ratio, level)
        check_model_arg(model)
        self.store = open_store(store)
        self.budget = budget
        self.threads = resolve_threads(threads) if threads is not None else None
        self.device = device
        self.composer = get_composer(compose)
        self.scope = scope
        self._batch_sizes = batch_sizes(max_batch, max_queue) if batching else None
        self.lock = lock or (fair_lock() if batching else threading.RLock())
        self._model = model if isinstance(model, KVzipModel) else None
        self._model_spec = None if isinstance(model, KVzipModel) else model
        self._model_loader = model_loader
        self._scheduler = None
        self._closed = False
        if self._model is not None and self.threads is not None:
            from .runtime import apply_thread_policy

            apply_thread_policy(self._model.device, self.threads)

    # -------------------------------------------------------------------------------------- the model

    @property
    def model(self) -> KVzipModel:
        """The model, loaded on first use with the service's thread policy."""
        if self._model is None:
            with self.lock:
                if self._model is None:
                    if self._model_loader is not None:
                        self._model = self._model_loader()
                    else:
                        from .models import load_model

                        spec = os.fspath(self._model_spec) if self._model_spec is not None else None
                        self._model = load_model(spec, device=self.device, threads=self.threads)
        return self._model

    @property
    def batching(self) -> bool:
        return self._batch_sizes is not None

    @property
    def scheduler(self) -> BatchScheduler | None:
        """The :class:`~kvzip_rag.scheduler.BatchScheduler` decoding this service's answers together (``batching=True``;
        started on first use), else ``None``."""
        if self._scheduler is None and self._batch_sizes is not None:
            from .scheduler import BatchScheduler

            with self.lock:
                if self._scheduler is None:
                    self._scheduler = BatchScheduler(self.model, self.lock, *self._batch_sizes)
        return self._scheduler

    @property
    def model_loaded(self) -> bool:
        return self._model is not None

    @property
    def kind(self) -> CacheKind:
        """The kind of cache the service's model answers from (loads the model)."""
        return CacheKind.of_model(self.model)

    ratio = property(lambda self: self.budget.ratio, doc="the ratio caches are loaded at (None: as stored)")
    level = property(lambda self: self.budget.level, doc="the level caches are loaded at (None: as stored)")

    def check_fits(self, question: str) -> None:
        """``ContextTooLongError`` for a question that alone exceeds the model's window (before any cache is read)."""
        from .generate import prompt_ids

        prompt_ids(self.model, question, True)

    # -------------------------------------------------------------------------------------- routing

    def _scope(self, doc_ids: Sequence[str] | str | None) -> list[str] | None:
        allowed = self.scope() if self.scope is not None else None
        if doc_ids is None:
            return allowed
        doc_ids = doc_id_list(doc_ids)
        known = set(allowed) if allowed is not None else {d for d in doc_ids if d in self.store}
        missing = [d for d in doc_ids if d not in known]
        if missing or not doc_ids:
            from .errors import DocumentNotFoundError

            raise DocumentNotFoundError(f"no document {', '.join(map(repr, missing or doc_ids))} to answer from "
                                        f"in {self.describe()}")
        return doc_ids

    def describe(self) -> str:
        """Where the documents are, for messages (never with a password)."""
        if self.store.path is not None:
            return f"the store at {self.store.path}"
        return f"the store at {self.store.engine.url.render_as_string(hide_password=True)}"

    def route(self, question: str, k: int = 1, doc_ids: Sequence[str] | str | None = None) -> Routing:
        """The ``k`` best-matching segments (full-text search, best first) that have a cache the service's model
        answers from, else the fallback (see the module); each target names that cache."""
        question = check_question(question)
        check_k(k)
        scope = self._scope(doc_ids)
        start = time.perf_counter()
        if scope == [] or (scope is None and len(self.store) == 0):
            raise EmptyIndexError(f"{self.describe()} holds no documents: index some first "
                                  "(kvzip-rag index PATH, KVzipIndex.from_documents or CacheStore.add_document)")
        kind = self.kind
        hits = self.store.search(question, k=k, doc_ids=scope, kind=kind, budget=self.budget)
        if hits:
            return Routing([as_target(h) for h in hits], False, time.perf_counter() - start)
        from .store import CacheRef

        fallback: list[Target] = []
        records = ([self.store.get_document(d) for d in scope] if scope is not None
                   else self.store.list_documents(limit=k))
        for record in records:
            for segment in (record.segments if record is not None else []):
                caches = [c for c in record.caches if c.segment_index == segment.index and kind.holds(c)]
                cache = select_cache(caches, kind, self.budget)
                if len(fallback) < k and caches:
                    fallback.append(Target(record.id, segment.index, 0.0, segment.text, dict(record.metadata),
                                           "fallback", CacheRef(cache.id, cache.payload_sha256) if cache else None))
        return Routing(fallback, True, time.perf_counter() - start)

    # -------------------------------------------------------------------------------------- loading

    def load(self, target: Target | tuple[str, int]):
        """``(PackedCache, seconds, bytes read)``: a fresh cache object (its own empty tail), the one routing chose
        when the target names it (``CacheChangedError`` when that one is gone). Use it with the model under
        ``self.lock``."""
        doc_id, segment = (target.doc_id, target.segment_index) if isinstance(target, Target) else target
        chosen = target.cache if isinstance(target, Target) else None
        model = self.model
        start = time.perf_counter()
        cache = self.store.load_cache(chosen if chosen is not None else doc_id, model, segment=segment,
                                      ratio=self.ratio, level=self.level)
        return cache, time.perf_counter() - start, self.store.last_read_nbytes

    # -------------------------------------------------------------------------------------- answering

    def stored_text(self, target: Target) -> str | None:
        """The segment's text as the store holds it now (``None`` if the document or segment is gone): what quotes
        are taken from and citations are checked against; read once per answer."""
        read, key = _TEXTS_READ.get(), (target.node_id, target.cache)
        if read is not None and key in read:
            return read[key]
        record = self.store.get_document(target.doc_id)
        segment = next((s for s in record.segments if s.index == target.segment_index), None) if record else None
        text = segment.text if segment is not None else None
        if read is not None:
            read[key] = text
        return text

    def quote(self, question: str, answer: str, used: Sequence[Target],
              evidence: Sequence[Citation] = ()) -> Citation | None:
        """Quote mode: the ``answer`` to ``question`` snapped to a span of the ``used`` segments' stored text, as its
        exact citation (:func:`kvzip_rag.quote.quote_answer`; ``evidence``: the answer's citations, the fallback);
        ``None`` when they hold no text."""
        from .quote import quote_answer

        return quote_answer(answer, question, used, [self.stored_text(t) for t in used], evidence)

    def quote_result(self, result: QAResult) -> QAResult:
        """``result`` (a free answer, grounded) in quote mode: ``result.quote`` set, and unless it abstained the
        quote its only citation."""
        result.quote = self.quote(result.question, result.best.text, result.used, result.citations)
        if result.quote is not None:
            result.unsupported_numbers = ()  # what is shown is the documents' own text
            if not result.abstained:
                result.citations = [result.quote]
        return result

    def start(self, cache, question: str, sampling: SamplingOptions) -> tuple[AnswerStream, Iterable[str]]:
        """The answer to ``question`` from ``cache``, prepared and submitted (:meth:`submit`), and where its text
        pieces come from (:meth:`collect`). Call it holding the lock, in the same hold as the cache's loading: a
        batched answer then joins the next step. Evidence is recorded inside :func:`kvzip_rag.evidence.recording`."""
        from .evidence import is_recording
        from .generate import stream_answer

        stream = stream_answer(self.model, cache, question, sampling, evidence=is_recording())
        return stream, self.submit(stream)

    def submit(self, stream: AnswerStream) -> Iterable[str]:
        """Where a prepared answer's pieces come from: with ``batching``, queued in the scheduler's batch now; else
        the stream itself (decoded as :meth:`collect` iterates it). ``ServiceClosedError`` after :meth:`close`."""
        self.check_open()
        return self.scheduler.submit(stream) if self.batching else stream

    def collect(self, source: Iterable[str], emit: Callable[[str], None] | None = None) -> list[str]:
        """A submitted answer's text pieces to its end, each passed to ``emit``. The one place answers are
        decoded: with ``batching`` in the scheduler's batch, waited for with the lock let go (a caller that holds
        it, a chat session, lets it go meanwhile; one that does not never waits for it again once its answer ends,
        so its place in the batch is free sooner); else here, under the lock."""
        if self.batching:
            from .scheduler import released

            waiting = released(self.lock)
        else:
            waiting = self.lock
        pieces = []
        with waiting, closing(iter(source)) as produced:
            for piece in produced:
                pieces.append(piece)
                if emit is not None:
                    emit(piece)
        return pieces

    def produce(self, stream: AnswerStream, emit: Callable[[str], None] | None = None) -> list[str]:
        """Run a prepared answer (a conversation's turn) to its end: :meth:`submit`, then :meth:`collect`; its
        ``Answer`` is ``stream.result``."""
        return self.collect(self.submit(stream), emit)

    # -------------------------------------------------------------------------------------- closing

    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        """``ServiceClosedError`` once the service is closed (before any model work)."""
        if self._closed:
            from .errors import ServiceClosedError

            raise ServiceClosedError("this QAService was closed: it answers no more questions; open a new one")

    def close(self) -> None:
        """Answer no more: answers waiting in the batch queue or decoding fail with ``ServiceClosedError``, the
        batching thread stops (it has ended when this returns), and every later question is refused with the same
        error. The store and the model stay open (they may be shared). Idempotent; ``with QAService(...) as qa:``
        closes on exit."""
        with self.lock:
            self._closed = True
            scheduler = self._scheduler
        if scheduler is not None:
            scheduler.close()

    def __enter__(self) -> QAService:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def answer_one(self, question: str, target: Target, sampling: SamplingOptions,
                   emit: Callable[[str], None] | None = None) -> CacheAnswer:
        """One cache's answer (a composer's building block); takes the lock to load and :meth:`start` the answer,
        then :meth:`collect` s it."""
        with self.lock:
            cache, load_s, nbytes = self.load(target)
            stream, source = self.start(cache, question, sampling)
        pieces = self.collect(source, emit)
        result = stream.result
        return CacheAnswer(target, result, pieces, is_refusal(result.text), load_s, nbytes, cache.nbytes,
                           cache.full_nbytes, cache.kept_ratio, cache.info.base_length,
                           cache.info.ratio, cache.info.level)

    def _plan(self, question: str, k: int, doc_ids, targets) -> Plan:
        """The checked question and what answers it: routed here, or the given targets (then routing again means
        within their documents)."""
        self.check_open()
        question = check_question(question)
        self.check_fits(question)  # before routing: a 1 MB question is refused on its length, not searched
        if targets is None:
            check_k(k)
            routing = self.route(question, k, doc_ids)
            plan = Plan(question, routing.targets, routing.seconds, k, doc_ids)
        else:
            targets = as_list(targets, "targets is a list of Targets, SearchHits or (doc_id, segment_index) pairs")
            given = list(dict.fromkeys(as_target(t) for t in targets))
            if not given:
                raise InvalidArgumentError("no targets to answer from")
            plan = Plan(question, given, None, len(given), list(dict.fromkeys(t.doc_id for t in given)))
        return plan

    def answer(self, question: str, k: int = 1, *, doc_ids: Sequence[str] | str | None = None,
               targets: Iterable[Any] | None = None, compose: str | Composer | None = None,
               evidence: bool = True, abstain_threshold: Any = DEFAULT_THRESHOLD,
               abstain_text: str = DEFAULT_ABSTAIN_TEXT,
               _emit: Callable[[str], None] | None = None, **sampling: Any) -> QAResult:
        """Route (or take ``targets``), load and answer with the composition strategy; runs in this thread.
        ``evidence``, ``abstain_threshold`` and ``abstain_text``: citations and abstention
        (:mod:`kvzip_rag.abstain`)."""
        grounding = Grounding(evidence, abstain_threshold, abstain_text)
        options = sampling_options(sampling)
        composer = get_composer(compose) if compose is not None else None
        return self.compose_answer(composer, self._plan(question, k, doc_ids, targets), options, _emit, grounding)

    def compose_answer(self, composer: Composer | None, plan: Plan, sampling: SamplingOptions,
                       emit: Callable[[str], None] | None, grounding: Grounding | None = None) -> QAResult:
        """The strategy's answer (``None``: the service's) to a checked plan, with its evidence and abstention
        (``grounding``, default :class:`~kvzip_rag.abstain.Grounding`); the composer takes the lock where it needs the
        model, and the evidence is read without it (so a batched answer's place is free once it ends). When a routed
        cache changed since routing (its document was replaced), routes once more and answers from the new caches.
        Quote mode (:meth:`quote_result`) emits the quote once, when the answer is complete."""
        from .abstain import ground
        from .evidence import recording

        grounding = grounding or Grounding()
        composer = composer or self.composer
        quoting = sampling.answer_style == "quote"
        pieces = None if quoting else emit
        with recording(grounding.evidence), _reading_once():
            try:
                result = composer.answer(self, plan.question, plan.targets, sampling, pieces)
            except CacheChangedError:
                plan.targets = self.route(plan.question, plan.k, plan.doc_ids).targets
                result = composer.answer(self, plan.question, plan.targets, sampling, pieces)
            result.retrieve_s, result.compose = plan.retrieve_s, composer.name
            result = ground(self, result, grounding)
            if quoting:
                result = self.quote_result(result)
                if emit is not None and result.candidate:
                    emit(result.candidate)
        return result

    def stream(self, question: str, k: int = 1, *, doc_ids: Sequence[str] | str | None = None,
               targets: Iterable[Any] | None = None, compose: str | Composer | None = None,
               evidence: bool = True, abstain_threshold: Any = DEFAULT_THRESHOLD,
               abstain_text: str = DEFAULT_ABSTAIN_TEXT, **sampling: Any) -> QAStream:
        """:meth:`answer` as text pieces (``for`` or ``async for``); the model runs in a worker thread. Arguments
        are checked and routing is done here, before any piece."""
        grounding = Grounding(evidence, abstain_threshold, abstain_text)
        options = sampling_options(sampling)
        composer = get_composer(compose) if compose is not None else None
        return QAStream(self, self._plan(question, k, doc_ids, targets), options, composer, grounding)

    async def aanswer(self, question: str, k: int = 1, **options: Any) -> QAResult:
        from .bridge import run_in_thread

        return await run_in_thread(lambda: self.answer(question, k, **options))


@dataclass
class Plan:
    """A checked question, the targets that answer it, and how to route again (``k`` within ``doc_ids``)."""

    question: str
    targets: list[Target]
    retrieve_s: float | None
    k: int
    doc_ids: Sequence[str] | str | None


def as_target(item: Any) -> Target:
    """A :class:`Target` from a Target, a store ``SearchHit`` (with the cache it was routed to, if any) or a
    ``(doc_id, segment_index)`` pair."""
    if isinstance(item, Target):
        return item
    if hasattr(item, "document_id") and hasattr(item, "segment_index"):
        from .store import CacheRef

        cache = getattr(item, "cache", None)
        return Target(item.document_id, item.segment_index, float(item.score), item.text, dict(item.metadata),
                      cache=CacheRef(cache.id, cache.payload_sha256) if cache is not None else None)
    if isinstance(item, tuple) and len(item) == 2:
        return Target(check_doc_id(item[0]), check_index(item[1], "a segment index"))
    raise InvalidArgumentError(f"cannot answer from a {type(item).__name__}: give Targets, SearchHits or "
                               "(doc_id, segment_index) pairs")


class QAStream:
    """Text pieces of a :class:`QAService` answer as produced (iterate once, sync or async); ``result`` afterwards."""

    def __init__(self, service: QAService, plan: Plan, sampling: SamplingOptions,
                 composer: Composer | None = None, grounding: Grounding | None = None) -> None:
        self._service, self._plan, self._sampling, self._composer = service, plan, sampling, composer
        self._grounding = grounding
        self.question, self.targets = plan.question, list(plan.targets)  # the sources, before any piece
        self.result: QAResult | None = None
        self._started = False

    def _work(self, emit: Callable[[str], None]) -> None:
        self.result = self._service.compose_answer(self._composer, self._plan, self._sampling, emit, self._grounding)

    def _claim(self) -> None:
        if self._started:
            raise InvalidArgumentError("an answer stream can be iterated only once")
        self._started = True

    def __iter__(self) -> Iterator[str]:
        from .bridge import push_in_thread

        self._claim()
        return push_in_thread(self._work, name="kvzip-answer")

    def __aiter__(self) -> AsyncIterator[str]:
        from .bridge import apush_in_thread

        self._claim()
        return apush_in_thread(self._work, name="kvzip-answer")


def check_model_matches(model: KVzipModel, fingerprint: str | None, template_digest: str | None,
                        name: str | None = None) -> None:
    """Refuse a model other than the one that built an index's caches."""
    if fingerprint and (model.fingerprint, model.template.digest) != (fingerprint, template_digest):
        raise ModelMismatchError(
            f"this index was built by model {name!r} (fingerprint {fingerprint}) but the given model is "
            f"{model.name!r} (fingerprint {model.fingerprint}); load that model or rebuild the index"
        )
