"""``create_kvzip_qa_chain``: question in, ``{"answer", "sources"}`` out, as a langchain-core ``RunnableGenerator``."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from langchain_core.documents import Document
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import PromptValue
from langchain_core.runnables import Runnable, RunnableConfig, RunnableGenerator
from langchain_core.runnables.utils import AddableDict

from kvzip_rag.qa import Composer, QAResult, QAService, check_k, get_composer

from ..segments import answer_options
from ._service import build_service, segment_documents, target_of, with_grounding
from .chat_models import _text_of


def _question_of(value: Any) -> str:
    """The question in a chain input: a string, ``{"question": ...}``, a prompt value or a message."""
    if isinstance(value, dict):
        for key in ("question", "query", "input"):
            if key in value:
                return _question_of(value[key])
        raise ValueError('a KVzip QA chain input is a question string or a dict with a "question" key')
    if isinstance(value, PromptValue):
        return value.to_string()
    if isinstance(value, BaseMessage):
        return _text_of(value)
    if isinstance(value, str):
        return value
    raise ValueError(f'a KVzip QA chain input is a question string or a dict with a "question" key, got {value!r}')




def _closing(sources: list[Document], result: QAResult | None) -> AddableDict:
    """The last chunk: the sources with their grounding, ``abstained``, ``unsupported_numbers`` (the answer's
    numbers that none of its documents holds) and (abstained) the ``abstention`` that :class:`KVzipQAChain`'s
    ``invoke`` returns as the answer."""
    abstained = bool(result is not None and result.abstained)
    unsupported = list(result.unsupported_numbers) if result is not None else []
    return AddableDict(sources=_annotated(sources, result), abstained=abstained, unsupported_numbers=unsupported,
                       **({"abstention": result.text} if abstained else {}))


def _settled(output: dict) -> dict:
    """An invoked chain's output: when it abstained, the answer is the abstention and the streamed text, the
    candidate, is kept as ``candidate_answer``."""
    if not output.get("abstained"):
        return output
    output = dict(output)
    output["candidate_answer"], output["answer"] = output["answer"], output.pop("abstention")
    return output


class KVzipQAChain(RunnableGenerator):
    """The QA chain's Runnable: a generator (streams the candidate's pieces, then the sources) whose ``invoke``
    and ``ainvoke`` (hence ``batch``) return the abstention as the answer when the evidence was too weak."""

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return _settled(super().invoke(input, config, **kwargs))

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Any:
        return _settled(await super().ainvoke(input, config, **kwargs))


def _annotated(sources: list[Document], result: QAResult | None) -> list[Document]:
    """With several sources, what each one did for the answer (:meth:`QAResult.source_metadata`, as the LlamaIndex
    engine attaches it): ``composed`` True/False, or its own ``answer`` and ``chosen`` (best-of-k); then what the
    answer rests on (:func:`._service.with_grounding`: ``citations``, ``abstained``)."""
    if result is not None and len(sources) > 1:
        roles = result.source_metadata()
        sources = [doc if (role := roles.get(target_of(doc).node_id)) is None else
                   Document(page_content=doc.page_content, metadata={**doc.metadata, **role}, id=doc.id)
                   for doc in sources]
    return with_grounding(sources, result)


def _compose_of(config: RunnableConfig, default: Composer | None) -> Composer | None:
    """The call's ``config["configurable"]["compose"]`` if given, else the chain's."""
    name = (config or {}).get("configurable", {}).get("compose")
    return get_composer(name) if name is not None else default


def _merge(value: Any, chunk: Any) -> Any:
    if value is None:
        return chunk
    try:
        return value + chunk
    except TypeError:
        return chunk


def create_kvzip_qa_chain(qa: QAService | Any = None, k: int = 1, *, compose: str | Composer | None = None,
                          store: Any = None, model: Any = None, threads: int | None = None,
                          **options: Any) -> Runnable:
    """A ready question-answering Runnable over compressed caches.

    ``qa``: a :class:`kvzip_rag.qa.QAService` (shared with other adapters), or a store folder / ``CacheStore``
    (then ``model=`` and ``threads=`` build the service), or anything carrying ``.qa`` (a ``KVzipIndex``).
    Input: a question string, ``{"question": ...}`` (``"query"``/``"input"`` too), a prompt value or a message.
    Output: ``{"answer": str, "sources": list[Document], "abstained": bool, "unsupported_numbers": list[str]}``
    (the answer's numbers that none of its documents holds, in digits or words: check them); when the evidence was
    too weak, ``answer`` is the abstention and ``candidate_answer`` the generated text. ``sources`` are the ``k``
    routed segments (the Documents :class:`KVzipRetriever` returns), ``answer`` comes from their caches through
    the service. ``k > 1``: the caches make one answer by ``compose`` (default: the service's, ``"parallel"``:
    joined into one cache that answers once, each source then marked ``composed`` True, or False where the model's
    window could not take it; ``"best-of-k"``: each cache answers and each source carries its own ``answer``,
    ``mean_logprob``, ``refusal`` and ``chosen``);
    one call can pick another with ``config={"configurable": {"compose": "best-of-k"}}``. Once the answer has
    evidence (or abstained), every source carries ``citations`` (its cited spans as dicts: ``start``/``end`` in its
    text, ``text``, ``weight``; ``[]`` if not cited) and ``abstained``. ``options``: sampling (``max_new_tokens``
    or ``max_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``), and ``answer_style``,
    ``evidence``, ``abstain_threshold``, ``abstain_text`` passed to the service.

    ``stream``/``astream`` yield ``{"answer": piece}`` as tokens are generated (best-of-k with ``k > 1``: once the
    best answer is chosen: the candidate), then ``{"sources": [...], "abstained": bool, "unsupported_numbers":
    [...]}`` (and, abstained, the ``abstention``); ``invoke``/``batch``/``ainvoke`` return the dict. It
    composes like any Runnable: ``chain.pick("answer") | StrOutputParser()``,
    ``{"question": RunnablePassthrough()} | chain``.
    """
    if isinstance(qa, QAService) or hasattr(qa, "qa"):
        service = build_service({"qa": qa if isinstance(qa, QAService) else None,
                                 "index": None if isinstance(qa, QAService) else qa})
    else:
        service = build_service({"store": store if store is not None else qa, "model": model, "threads": threads})
    check_k(k)  # refused when the chain is built, by the service's rule (so are bad sampling options)
    options = answer_options(options)
    composer = get_composer(compose) if compose is not None else None

    def start(value: Any, config: RunnableConfig) -> tuple[list[Document], Any]:
        question = _question_of(value)
        routing = service.route(question, k)
        stream = service.stream(question, targets=routing.targets, compose=_compose_of(config, composer), **options)
        return segment_documents(service, routing.targets), stream

    def answer(inputs: Iterator[Any], config: RunnableConfig) -> Iterator[AddableDict]:
        value = None
        for chunk in inputs:  # one value, or the chunks of a streamed upstream value
            value = _merge(value, chunk)
        sources, stream = start(value, config)
        yield AddableDict(answer="")  # the answer key comes first, even for an empty answer
        for piece in stream:
            yield AddableDict(answer=piece)
        yield _closing(sources, stream.result)

    async def aanswer(inputs: AsyncIterator[Any], config: RunnableConfig) -> AsyncIterator[AddableDict]:
        from kvzip_rag.bridge import run_in_thread

        value = None
        async for chunk in inputs:
            value = _merge(value, chunk)
        sources, stream = await run_in_thread(lambda: start(value, config))
        yield AddableDict(answer="")
        async for piece in stream:
            yield AddableDict(answer=piece)
        yield _closing(sources, stream.result)

    return KVzipQAChain(answer, aanswer, name="KVzipQAChain")
