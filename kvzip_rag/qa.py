"""The question-answering service every interface uses: route, load, answer (CLI, LlamaIndex, LangChain).

    >>> from kvzip_rag.qa import QAService
    >>> qa = QAService("my-store", model="smollm2", threads=1)       # a CacheStore or a folder; model lazily
    >>> result = qa.answer("Who founded Wrenfield?", k=3)            # one answer from the 3 routed caches joined
    >>> result.text, [t.doc_id for t in result.used], result.metadata()["dropped_node_ids"]
    >>> for piece in qa.stream("When was the bridge built?"): ...    # tokens as generated (worker thread)

One place for each rule:

* **Routing** (:meth:`QAService.route`): BM25 full-text search in the store over the service's documents (its
  ``scope``), best first; when no word matches, the first ``k`` segments with score 0 and ``routing="fallback"``.
* **Loading** (:meth:`QAService.load`): through the store's LRU, at the service's ``ratio``/``level`` (a lower
  ratio than stored reads only the slices it keeps; ``None`` = as stored).
* **Composition** (:mod:`kvzip_rag.composers`, chosen by name with ``compose=``): how routed caches make one answer.
  ``"parallel"`` (default) and ``"sequential"``: the routed caches joined into one cache that answers once
  (:mod:`kvzip_rag.compose`; documents that do not fit the window are dropped and reported); ``"best-of-k"``: every
  cache answers on its own, refusals rank below real answers, then the highest mean token log-probability, then
  the better retrieval rank. One routed cache answers as it is. New strategies subclass :class:`Composer` and call
  :func:`register_composer`.
* **One model lock** (``service.lock``, an ``RLock``) around every use of the model, and **one bridge** to worker
  threads (:mod:`kvzip_rag.bridge`) for streaming and async.
* **Argument checks**: :func:`check_question`, :func:`check_k`, :func:`check_sampling`; the conversation window
  and chat-history folding live in :mod:`kvzip_rag.dialogue`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .abstain import DEFAULT_ABSTAIN_TEXT, DEFAULT_THRESHOLD, Grounding
from .answers import CacheAnswer, QAResult, Target, choose_best, is_refusal
from .composers import COMPOSERS, DEFAULT_COMPOSE, BestOfK, Composer, get_composer, register_composer
from .errors import InvalidArgumentError, KVzipError, ModelMismatchError
from .paths import default_store_path

__all__ = [
    "COMPOSERS", "DEFAULT_COMPOSE", "BestOfK", "CacheAnswer", "Composer", "EmptyIndexError", "QAResult",
    "QAService", "QAStream", "Routing", "Target", "as_target", "check_k", "check_question", "check_sampling",
    "choose_best", "default_store_path", "get_composer", "is_refusal", "matching_cache", "open_store",
    "register_composer",
]

if TYPE_CHECKING:  # the engine and the store import torch: only when a service is built
    from .models import KVzipModel
    from .store import CacheStore

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")
GROUNDING_KEYS = ("evidence", "abstain_threshold", "abstain_text")  # see kvzip_rag.abstain.Grounding
DEFAULT_RATIO = 0.3
DEFAULT_LEVEL = "pair"


class EmptyIndexError(KVzipError, ValueError):
    """A question was asked of a store or index that holds no document yet."""


# ------------------------------------------------------------------------------------------------ checks


def check_question(question: Any, what: str = "question") -> str:
    """The question, stripped; an empty or non-string one is refused."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidArgumentError(f"the {what} is empty")
    return question.strip()


def check_k(k: Any, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"{name} must be a positive integer, got {k!r}")
    return k


def check_sampling(sampling: dict) -> dict:
    """Sampling options as the engine takes them (``max_tokens`` is accepted for ``max_new_tokens``); bad names
    and values fail here, before any model work."""
    from .generate import SamplingOptions

    sampling = dict(sampling)
    if "max_tokens" in sampling:
        sampling["max_new_tokens"] = sampling.pop("max_tokens")
    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise InvalidArgumentError(f"unknown answer option(s) {', '.join(unknown)}; use {', '.join(SAMPLING_KEYS)}")
    if "stop" in sampling:
        sampling["stop"] = tuple(s for s in (sampling["stop"] or ()) if s)
    SamplingOptions(**sampling)
    return sampling


def open_store(store: CacheStore | str | os.PathLike | None) -> CacheStore:
    """A ``CacheStore`` from itself, a folder, or ``None`` (the default store)."""
    from .store import CacheStore

    if isinstance(store, CacheStore):
        return store
    if store is not None and not isinstance(store, (str, os.PathLike)):
        raise InvalidArgumentError(f"store must be a kvzip_rag.store.CacheStore or a folder, got {type(store).__name__}")
    return CacheStore(default_store_path() if store is None else store)


def matching_cache(records: Iterable[Any], *, fingerprint: str | None = None, template_digest: str | None = None,
                   ratio: float | None = None, level: str | None = None) -> Any | None:
    """The stored cache record a model answers from: same model and template, the wanted level, the smallest ratio
    at or above the wanted one (a lower ratio loads from it); else any of that model's. None if there is none."""
    from .budget import ratio_covers

    mine = [c for c in records if fingerprint is None
            or (c.model_fingerprint == fingerprint and c.template_digest == template_digest)]
    usable = [c for c in mine if (ratio is None or ratio_covers(c.ratio, ratio)) and (level is None or c.level == level)]
    if not usable:
        usable = mine
    if not usable:
        return None
    return min(usable, key=lambda c: (level is not None and c.level != level, c.ratio, -c.id))


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
        lock: share a lock with other users of the same model (default: a new ``RLock``).
    """

    def __init__(self, store: CacheStore | str | os.PathLike | None = None,
                 model: KVzipModel | str | os.PathLike | None = None, *, ratio: float | None = None,
                 level: str | None = None, threads: int | None = None, device: str | None = None,
                 compose: str | Composer = DEFAULT_COMPOSE, scope: Callable[[], list[str]] | None = None,
                 lock: threading.RLock | None = None,
                 model_loader: Callable[[], KVzipModel] | None = None) -> None:
        from .budget import check_ratio_level
        from .models import KVzipModel
        from .runtime import resolve_threads

        if ratio is not None or level is not None:
            check_ratio_level(ratio if ratio is not None else 1.0, level or DEFAULT_LEVEL)
        if model is not None and not isinstance(model, (KVzipModel, str, os.PathLike)):
            raise InvalidArgumentError(
                "model must be a kvzip_rag.KVzipModel (see kvzip_rag.load_model / wrap_model) or a model name/path, "
                f"got {type(model).__name__}"
            )
        self.store = open_store(store)
        self.ratio, self.level = (float(ratio) if ratio is not None else None), level
        self.threads = resolve_threads(threads) if threads is not None else None
        self.device = device
        self.composer = get_composer(compose)
        self.scope = scope
        self.lock = lock or threading.RLock()
        self._model = model if isinstance(model, KVzipModel) else None
        self._model_spec = None if isinstance(model, KVzipModel) else model
        self._model_loader = model_loader
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
    def model_loaded(self) -> bool:
        return self._model is not None

    # -------------------------------------------------------------------------------------- routing

    def _scope(self, doc_ids: Sequence[str] | str | None) -> list[str] | None:
        allowed = self.scope() if self.scope is not None else None
        if doc_ids is None:
            return allowed
        doc_ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
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
        """The ``k`` best-matching segments (full-text search, best first), else the fallback (see the module)."""
        question = check_question(question)
        check_k(k)
        scope = self._scope(doc_ids)
        start = time.perf_counter()
        if scope == [] or (scope is None and len(self.store) == 0):
            raise EmptyIndexError(f"{self.describe()} holds no documents: index some first "
                                  "(kvzip-rag index PATH, KVzipIndex.from_documents or CacheStore.add_document)")
        hits = self.store.search(question, k=k, doc_ids=scope)
        if hits:
            targets = [Target(h.document_id, h.segment_index, float(h.score), h.text, dict(h.metadata)) for h in hits]
            return Routing(targets, False, time.perf_counter() - start)
        fallback: list[Target] = []
        records = ([self.store.get_document(d) for d in scope] if scope is not None
                   else self.store.list_documents(limit=k))
        for record in records:
            for segment in (record.segments if record is not None else []):
                if len(fallback) < k:
                    fallback.append(Target(record.id, segment.index, 0.0, segment.text, dict(record.metadata),
                                           "fallback"))
        return Routing(fallback, True, time.perf_counter() - start)

    # -------------------------------------------------------------------------------------- loading

    def load(self, target: Target | tuple[str, int]):
        """``(PackedCache, seconds, bytes read)``: a fresh cache object (its own empty tail). Use it with the model
        under ``self.lock``."""
        doc_id, segment = (target.doc_id, target.segment_index) if isinstance(target, Target) else target
        model = self.model
        start = time.perf_counter()
        cache = self.store.load_cache(doc_id, model, segment=segment, ratio=self.ratio, level=self.level)
        return cache, time.perf_counter() - start, self.store.last_read_nbytes

    # -------------------------------------------------------------------------------------- answering

    def generate(self, cache, question: str, sampling: dict,
                 emit: Callable[[str], None] | None = None) -> tuple[Any, list[str]]:
        """``(Answer, its text pieces)`` from ``cache``, each piece passed to ``emit`` as it comes; takes the lock."""
        from .evidence import is_recording
        from .generate import stream_answer

        with self.lock:
            stream = stream_answer(self.model, cache, question, evidence=is_recording(), **sampling)
            pieces = []
            for piece in stream:
                pieces.append(piece)
                if emit is not None:
                    emit(piece)
        return stream.result, pieces

    def answer_one(self, question: str, target: Target, sampling: dict,
                   emit: Callable[[str], None] | None = None) -> CacheAnswer:
        """One cache's answer (a composer's building block); takes the lock."""
        with self.lock:
            cache, load_s, nbytes = self.load(target)
            result, pieces = self.generate(cache, question, sampling, emit)
        return CacheAnswer(target, result, pieces, is_refusal(result.text), load_s, nbytes, cache.nbytes,
                           cache.full_nbytes, cache.kept_ratio, cache.info.base_length,
                           cache.info.ratio, cache.info.level)

    def _plan(self, question: str, k: int, doc_ids, targets) -> tuple[str, list[Target], float | None]:
        question = check_question(question)
        if targets is None:
            routing = self.route(question, k, doc_ids)
            return question, routing.targets, routing.seconds
        targets = list(dict.fromkeys(as_target(t) for t in targets))
        if not targets:
            raise InvalidArgumentError("no targets to answer from")
        return question, targets, None

    def answer(self, question: str, k: int = 1, *, doc_ids: Sequence[str] | str | None = None,
               targets: Iterable[Any] | None = None, compose: str | Composer | None = None,
               evidence: bool = True, abstain_threshold: Any = DEFAULT_THRESHOLD,
               abstain_text: str = DEFAULT_ABSTAIN_TEXT,
               _emit: Callable[[str], None] | None = None, **sampling: Any) -> QAResult:
        """Route (or take ``targets``), load and answer with the composition strategy; runs in this thread.
        ``evidence``, ``abstain_threshold`` and ``abstain_text``: citations and abstention
        (:mod:`kvzip_rag.abstain`)."""
        grounding = Grounding(evidence, abstain_threshold, abstain_text)
        sampling = check_sampling(sampling)
        question, planned, retrieve_s = self._plan(question, k, doc_ids, targets)
        return self.compose_answer(compose, question, planned, sampling, _emit, retrieve_s, grounding)

    def compose_answer(self, compose: str | Composer | None, question: str, targets: list[Target], sampling: dict,
                       emit: Callable[[str], None] | None, retrieve_s: float | None,
                       grounding: Grounding | None = None) -> QAResult:
        """The chosen strategy's answer (``None``: the service's) from checked targets, with its evidence and
        abstention (``grounding``, default :class:`~kvzip_rag.abstain.Grounding`); takes the lock."""
        from .abstain import ground
        from .evidence import recording

        grounding = grounding or Grounding()
        composer = get_composer(compose) if compose is not None else self.composer
        with self.lock, recording(grounding.evidence):
            result = composer.answer(self, question, targets, sampling, emit)
            result.retrieve_s, result.compose = retrieve_s, composer.name
            return ground(self, result, grounding)

    def stream(self, question: str, k: int = 1, **options: Any) -> QAStream:
        """:meth:`answer` as text pieces (``for`` or ``async for``); the model runs in a worker thread. Arguments
        are checked and routing is done here, before any piece."""
        options["sampling"] = check_sampling({k_: options.pop(k_) for k_ in list(options) if k_ in SAMPLING_KEYS
                                              or k_ == "max_tokens"})
        options["grounding"] = Grounding(**{name: options.pop(name) for name in GROUNDING_KEYS if name in options})
        question, planned, retrieve_s = self._plan(question, k, options.pop("doc_ids", None),
                                                   options.pop("targets", None))
        return QAStream(self, question, planned, retrieve_s, **options)

    async def aanswer(self, question: str, k: int = 1, **options: Any) -> QAResult:
        from .bridge import run_in_thread

        return await run_in_thread(lambda: self.answer(question, k, **options))


def as_target(item: Any) -> Target:
    """A :class:`Target` from a Target, a store ``SearchHit`` or a ``(doc_id, segment_index)`` pair."""
    if isinstance(item, Target):
        return item
    if hasattr(item, "document_id") and hasattr(item, "segment_index"):
        return Target(item.document_id, item.segment_index, float(item.score), item.text, dict(item.metadata))
    if isinstance(item, tuple) and len(item) == 2:
        return Target(str(item[0]), int(item[1]))
    raise InvalidArgumentError(f"cannot answer from a {type(item).__name__}: give Targets, SearchHits or "
                               "(doc_id, segment_index) pairs")


class QAStream:
    """Text pieces of a :class:`QAService` answer as produced (iterate once, sync or async); ``result`` afterwards."""

    def __init__(self, service: QAService, question: str, targets: list[Target], retrieve_s: float | None,
                 sampling: dict, compose: str | Composer | None = None, grounding: Grounding | None = None) -> None:
        self._service, self.question, self.targets = service, question, targets
        self._retrieve_s, self._sampling, self._grounding = retrieve_s, sampling, grounding
        self._compose = get_composer(compose) if compose is not None else None  # checked before any piece
        self.result: QAResult | None = None
        self._started = False

    def _work(self, emit: Callable[[str], None]) -> None:
        self.result = self._service.compose_answer(self._compose, self.question, self.targets, self._sampling, emit,
                                                   self._retrieve_s, self._grounding)

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
