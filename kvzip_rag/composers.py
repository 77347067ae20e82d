"""Composition strategies: how the caches routed for one question make one answer, chosen by name.

``"parallel"`` is the default for every interface (``QAService``, ``kvzip-rag ask --k``, LlamaIndex
``similarity_top_k``, LangChain ``k``): on HotpotQA it keeps the gold answer far likelier than best-of-k
(BENCHMARKS.md, multi-document questions). One routed cache is answered as it is, whatever the strategy.

A new strategy subclasses :class:`Composer`, sets ``name`` and is registered with :func:`register_composer`;
``QAService(compose=name)`` or ``service.answer(..., compose=name)`` then uses it, and every interface (CLI,
LlamaIndex, LangChain) gets it through the service.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from .answers import CacheAnswer, QAResult, Target, choose_best, is_refusal
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .generate import SamplingOptions
    from .qa import QAService



class Composer:
    """How routed caches make one answer. ``answer`` runs in the calling thread; it takes the service's lock where it
    uses the model itself (loading, composing: ``service.load`` needs it) and answers through
    ``service.start`` (in the same hold as the loading) and ``service.collect``, which lets it go while a batch
    decodes (``service.answer_one`` does all three for one cache). It
    calls ``emit(piece)`` with the text pieces of the answer it returns, as early as it can."""

    name: ClassVar[str]

    def answer(self, service: QAService, question: str, targets: list[Target], sampling: SamplingOptions,
               emit: Callable[[str], None] | None) -> QAResult:
        raise NotImplementedError


class BestOfK(Composer):
    """Each cache answers on its own (caches are never concatenated); the best answer is kept (:func:`choose_best`).
    One target streams live; several stream the winner's pieces once all are generated."""

    name = "best-of-k"

    def answer(self, service, question, targets, sampling, emit):
        start = time.perf_counter()
        live = emit if len(targets) == 1 else None
        answers = [service.answer_one(question, target, sampling, live) for target in targets]
        chosen = choose_best(answers) if len(answers) > 1 else 0
        if emit is not None and live is None:
            for piece in answers[chosen].pieces:
                emit(piece)
        return QAResult(question, answers, chosen, "best-mean-logprob", service.ratio, service.level,
                        time.perf_counter() - start)


class Composed(Composer):
    """One answer from the routed caches joined into one cache (:func:`kvzip_rag.compose.compose`), so evidence
    spread over several documents or segments is seen together. Nothing is re-prefilled. Caches that do not fit the
    model's window are dropped, lowest-routed first, and reported as ``dropped``."""

    layout: ClassVar[str]

    def answer(self, service, question, targets, sampling, emit):
        from .compose import compose

        if len(targets) == 1:  # nothing to join: the cache answers as it is (k == 1 is the same in every strategy)
            return BestOfK().answer(service, question, targets, sampling, emit)
        start = time.perf_counter()
        with service.lock:
            loaded = [service.load(target) for target in targets]
            composed = compose(service.model, [cache for cache, _, _ in loaded], layout=self.layout)
            stream, source = service.start(composed, question, sampling)
        pieces = service.collect(source, emit)
        result = stream.result
        used = [targets[i] for i in composed.composition.used]
        first = loaded[composed.composition.used[0]][0].info
        answer = CacheAnswer(
            used[0], result, pieces, is_refusal(result.text),
            sum(seconds for _, seconds, _ in loaded), sum(nbytes for _, _, nbytes in loaded), composed.nbytes,
            sum(loaded[i][0].full_nbytes for i in composed.composition.used), composed.kept_ratio,
            sum(part.length for part in composed.composition.parts), first.ratio, first.level,
            also=tuple(used[1:]), dropped=tuple(targets[i] for i in composed.composition.dropped),
        )
        return QAResult(question, [answer], 0, f"composed-{self.layout}", service.ratio, service.level,
                        time.perf_counter() - start)


class Parallel(Composed):
    """Every document keeps the positions it was encoded at (APE-style); measured best on HotpotQA (BENCHMARKS.md)."""

    name = layout = "parallel"


class Sequential(Composed):
    """Documents one after another, keys re-rotated by their offset."""

    name = layout = "sequential"


COMPOSERS: dict[str, type[Composer]] = {c.name: c for c in (BestOfK, Parallel, Sequential)}
DEFAULT_COMPOSE = Parallel.name


def register_composer(cls: type[Composer]) -> type[Composer]:
    """Make a composition strategy available as ``compose=cls.name`` (usable as a class decorator)."""
    COMPOSERS[cls.name] = cls
    return cls


def get_composer(compose: str | Composer) -> Composer:
    if isinstance(compose, Composer):
        return compose
    if not isinstance(compose, str) or compose not in COMPOSERS:
        raise InvalidArgumentError(f"unknown compose={compose!r}; choose one of {', '.join(sorted(COMPOSERS))}")
    return COMPOSERS[compose]()
