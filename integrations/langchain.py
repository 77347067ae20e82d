"""LangChain adapters: a retriever, a chat model and a ready question-answering Runnable over a ``KVzipIndex``.

    >>> from kvzip_rag.integrations.langchain import ChatKVzip, KVzipRetriever, create_kvzip_qa_chain
    >>> retriever = KVzipRetriever(index=index, k=4)          # Documents for the segments that match a query
    >>> chat = ChatKVzip(index=index)                         # a chat model answering from compressed caches
    >>> chain = create_kvzip_qa_chain(index)                  # question in, {"answer", "sources"} out
    >>> chain.invoke("Who built the harbour?")["answer"]

Nothing here re-implements retrieval or generation. Segments are routed by the index (``retrieve_nodes``: the
store's full-text search, with its fallback), caches are loaded with ``index.load_hit_cache``, the QA chain answers
with ``index.stream_hits`` (best-of-k like the LlamaIndex query engine) and the chat model with
``kvzip_rag.Conversation``, token by token. The model is only used under ``index.lock``; async methods run the
blocking work in a worker thread and never block the event loop.

Requires ``langchain-core`` (a dependency of kvzip-rag). ``KVzipRetriever`` and ``ChatKVzip`` pass the
``langchain-tests`` standard suites (see ``tests/test_langchain_standard.py`` for what is declared absent).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.prompt_values import PromptValue
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.runnables.config import patch_config
from langchain_core.runnables.utils import AddableDict
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from kvzip_rag.errors import ContextTooLongError, InvalidArgumentError
from kvzip_rag.generate import Conversation, SamplingOptions

__all__ = ["ChatKVzip", "KVzipQAChain", "KVzipRetriever", "create_kvzip_qa_chain"]

_SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop")


# --------------------------------------------------------------------------------------- access to the index
#
# Everything this module needs from a KVzipIndex (integrations/llamaindex.py) goes through the functions below:
# ``kvzip_model``, ``lock``, ``store``, ``doc_ids``, ``index_struct``, ``ratio``/``level``, ``retrieve_nodes``,
# ``load_hit_cache`` and ``stream_hits``.


@dataclass(frozen=True)
class _Route:
    """A segment chosen for a query: its text, score and metadata (as the index's LlamaIndex nodes carry it)."""

    doc_id: str
    segment_index: int
    text: str
    score: float
    metadata: dict  # the document's metadata + doc_id, segment_index, cache_id, ratio, level, bytes, ...
    routing: str  # "search" (full-text match) or "fallback" (nothing matched: the first segments)

    def document(self) -> Document:
        metadata = {**self.metadata, "score": self.score, "routing": self.routing}
        return Document(page_content=self.text, metadata=metadata, id=f"{self.doc_id}:{self.segment_index}")


def _model(index):
    return index.kvzip_model


def _node_route(item) -> _Route:
    node, meta = item.node, item.node.metadata
    return _Route(str(meta["doc_id"]), int(meta["segment_index"]), node.get_content(), float(item.score or 0.0),
                  dict(meta), meta.get("routing") or "search")


def _routes(index, query: str, k: int, doc_ids: Sequence[str] | None = None) -> list[_Route]:
    """The ``k`` segments that best match ``query``, best first, as the index routes them (full-text search; when
    nothing matches, its first segments, marked ``routing="fallback"``). ``doc_ids`` restricts the search."""
    return [_node_route(item) for item in index.retrieve_nodes(query, k, doc_ids=doc_ids)]


# --------------------------------------------------------------------------------------------------- helpers


async def _aiter_in_thread(factory: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in one dedicated worker thread and yield its items on the event loop.

    One thread for the whole iteration (not one per item), so a lock taken inside the iterator is released by the
    thread that took it. If the consumer stops early, the iterator is closed at its next item.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    context = contextvars.copy_context()

    def post(kind: str, value: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone: nobody is listening any more
            cancelled.set()

    def work() -> None:
        try:
            iterator = factory()
            try:
                for item in iterator:
                    if cancelled.is_set():
                        break
                    post("item", item)
            finally:
                close = getattr(iterator, "close", None)
                if close is not None:
                    close()
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            post("error", error)
        else:
            post("done", None)

    thread = threading.Thread(target=context.run, args=(work,), name="kvzip-langchain", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = await queue.get()
            if kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        cancelled.set()


def _text_of(message: BaseMessage) -> str:
    """The text of a message; refuses images, audio and files (this model reads text only)."""
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") in ("text", "text-plain"):
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in ("reasoning", "thinking"):
            continue
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise NotImplementedError(
                f"ChatKVzip reads text only; a {kind!r} content block was given (images, audio and files are not "
                "supported)"
            )
    return "".join(parts)


def _check_no_tools(message: BaseMessage) -> None:
    if message.type == "tool" or getattr(message, "tool_calls", None) or getattr(message, "invalid_tool_calls", None):
        raise NotImplementedError(
            "ChatKVzip does not support tool calling: it answers questions from compressed document caches; "
            "remove tool calls and tool messages from the conversation"
        )


@dataclass
class _Dialogue:
    """A conversation reduced to what the cache layout can hold: answered turns, then the question to answer."""

    route_query: str  # the first human message, which picks the document segment
    turns: list[tuple[str, str]]
    question: str


def _dialogue(messages: Sequence[BaseMessage]) -> _Dialogue:
    """Fold LangChain messages into (question, answer) turns.

    - System messages: their text is put before the next human message (the system prompt of the model's template
      is part of the compressed cache's fixed prefix and cannot be replaced). A system message after the last human
      message is put before that question too.
    - Consecutive human (or AI) messages are joined with a blank line.
    - AI messages before the first human message are put before the first question.
    - The conversation must end with a human (or system) message.
    """
    pending_system: list[str] = []
    leading_ai: list[str] = []
    turns: list[list[str]] = []  # [question, answer | None]
    first_human: str | None = None
    last_role = None
    for message in messages:
        _check_no_tools(message)
        text = _text_of(message).strip()
        role = message.type
        if isinstance(message, ChatMessage):
            role = {"user": "human", "assistant": "ai"}.get(message.role, message.role)
        if role == "system" or role == "developer":
            if text:
                pending_system.append(text)
            continue
        if role == "human":
            if first_human is None:
                first_human = text
            if leading_ai and not turns:
                text = "\n\n".join([*leading_ai, text])
                leading_ai = []
            if pending_system:
                text = "\n\n".join([*pending_system, text])
                pending_system = []
            if last_role == "human" and turns and turns[-1][1] is None:
                turns[-1][0] = "\n\n".join(filter(None, [turns[-1][0], text]))
            else:
                turns.append([text, None])
            last_role = "human"
        elif role == "ai":
            if not turns:
                if text:
                    leading_ai.append(text)
                continue
            if turns[-1][1] is None:
                turns[-1][1] = text
            else:
                turns[-1][1] = "\n\n".join(filter(None, [turns[-1][1], text]))
            last_role = "ai"
        else:
            raise ValueError(f"ChatKVzip cannot read a {message.type!r} message")
    if not turns or turns[-1][1] is not None:
        raise ValueError("the conversation must end with a human message (the question to answer)")
    if pending_system:  # trailing system message(s): instructions for the question being asked
        turns[-1][0] = "\n\n".join([*pending_system, turns[-1][0]])
    if not turns[-1][0].strip():
        raise ValueError("the last human message is empty: there is no question to answer")
    return _Dialogue(
        route_query=first_human or turns[0][0],
        turns=[(q, a) for q, a in turns[:-1]],
        question=turns[-1][0],
    )


# ------------------------------------------------------------------------------------------------- retriever


class KVzipRetriever(BaseRetriever):
    """Documents for the segments of a ``KVzipIndex`` whose compressed caches answer a query.

    Routing is the index's own (what its LlamaIndex retriever returns): segments ranked by the store's full-text
    search (BM25 on SQLite), best first. A query that matches fewer than ``k`` segments returns fewer Documents;
    one that matches nothing returns the index's first ``k`` segments with ``score`` 0.0 and
    ``metadata["routing"] == "fallback"``, so that a chain still has a cache to answer from (check that key when
    you need only real matches).

    ``page_content`` is the segment text; ``id`` is ``"{doc_id}:{segment_index}"`` (the index's node id);
    ``metadata`` holds the document's own metadata plus ``doc_id``, ``segment_index``, ``cache_id``, ``ratio``
    (fraction of the KV pairs kept), ``level``, ``bytes`` (compressed keys and values), ``full_bytes`` (the same
    tokens uncompressed), ``model``, ``score`` (higher is better) and ``routing`` (``"search"`` or
    ``"fallback"``). ``k`` and ``doc_ids`` (search only these documents of the index) can also be given per call:
    ``retriever.invoke(query, k=1)``.
    """

    index: Any = Field(exclude=True, repr=False)
    k: int = 4
    doc_ids: list[str] | None = None

    model_config = ConfigDict(arbitrary_types_allowed=True)

    def _get_relevant_documents(
        self,
        query: str,
        *,
        run_manager: CallbackManagerForRetrieverRun,
        k: int | None = None,
        doc_ids: Sequence[str] | None = None,
    ) -> list[Document]:
        k = self.k if k is None else k
        doc_ids = self.doc_ids if doc_ids is None else doc_ids
        return [route.document() for route in _routes(self.index, query, k, doc_ids)]

    async def _aget_relevant_documents(
        self,
        query: str,
        *,
        run_manager: AsyncCallbackManagerForRetrieverRun,
        **kwargs: Any,
    ) -> list[Document]:
        return await asyncio.to_thread(
            self._get_relevant_documents, query, run_manager=run_manager.get_sync(), **kwargs
        )


# ------------------------------------------------------------------------------------------------ chat model


class ChatKVzip(BaseChatModel):
    """A chat model that answers from the compressed KV cache of a document segment in a ``KVzipIndex``.

    The conversation is appended after the compressed document, as the engine's follow-up turns are. The segment is
    chosen by the *first* human message with the index's routing (full-text search; restricted to ``doc_ids`` when
    bound; when nothing matches, the first segment, with ``response_metadata["routing"] == "fallback"``), so every
    call with the same conversation uses the same cache. Earlier turns are replayed into a
    ``kvzip_rag.Conversation``; when the history is exactly a conversation this instance just answered, that
    conversation's cache is reused instead (``reuse_conversations`` most recent ones are kept; nothing recomputed).

    Messages: system messages are folded into the next human message as a leading paragraph (the model's own system
    prompt is part of the cache's fixed prefix and cannot change); consecutive messages of one role are joined with
    a blank line; message ``name`` fields are ignored. Text only: tool calling, structured output and image, audio
    or file inputs are not supported (``bind_tools`` and ``with_structured_output`` raise ``NotImplementedError``,
    so do tool messages and non-text content blocks).

    ``stream``/``astream`` yield tokens as they are generated. Every answer carries ``usage_metadata``
    (``input_tokens`` = document tokens + earlier turns + question, of which the tokens served from a cache are
    ``input_token_details["cache_read"]``) and ``response_metadata``: ``model_name``, ``finish_reason``,
    ``doc_ids``, ``cache_ids``, ``segment_index``, ``routing``, ``route_score``, ``ratio``, ``level``,
    ``kept_ratio``, ``cache_bytes``, ``full_cache_bytes``, ``bytes_loaded`` (read from disk), ``document_tokens``,
    ``reused_conversation`` and timings ``retrieve_s``, ``cache_load_s``, ``replay_s``, ``ttft_s``, ``decode_s``.

    Sampling: greedy when ``temperature=0`` (default); ``max_new_tokens`` (alias ``max_tokens``), ``top_k``,
    ``top_p``, ``seed`` and ``stop`` as in ``kvzip_rag.answer``; each can also be given per call, as can
    ``doc_ids``. A ``model`` argument naming another model is refused (the caches belong to the index's model).
    """

    index: Any = Field(exclude=True, repr=False)
    doc_ids: list[str] | None = None
    max_new_tokens: int = Field(default=128, alias="max_tokens", ge=1)
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    streaming: bool = False
    """Use the streaming path even for ``invoke`` (callbacks then receive tokens)."""
    reuse_conversations: int = 4
    """How many finished conversations to keep (with their caches) for follow-up calls; 0 disables reuse."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    _sessions: OrderedDict = PrivateAttr(default_factory=OrderedDict)

    # ------------------------------------------------------------------------------------------ identity

    @property
    def model_name(self) -> str:
        return _model(self.index).name

    @property
    def _llm_type(self) -> str:
        return "kvzip"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "doc_ids": self.doc_ids,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "top_p": self.top_p,
            "seed": self.seed,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="kvzip",
            ls_model_name=kwargs["model"] if isinstance(kwargs.get("model"), str) else self.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
        )
        max_tokens = kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens))
        if isinstance(max_tokens, int):
            params["ls_max_tokens"] = max_tokens
        if stop or self.stop:
            params["ls_stop"] = list(stop or self.stop)
        return params

    # ------------------------------------------------------------------------------------- unsupported

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Runnable[LanguageModelInput, AIMessage]:
        """Not supported: ChatKVzip answers from compressed document caches and cannot call tools."""
        raise NotImplementedError(
            "ChatKVzip does not support tool calling: it answers questions from compressed document caches with a "
            "small local model that has no tool-calling format. Use KVzipRetriever or create_kvzip_qa_chain as a tool "
            "of another chat model instead."
        )

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Runnable:
        """Not supported: ChatKVzip has no constrained decoding or tool calling to produce structured output."""
        raise NotImplementedError(
            "ChatKVzip does not support structured output (no tool calling, JSON mode or constrained decoding); "
            "parse its text answer with an output parser instead"
        )

    # ------------------------------------------------------------------------------------------ options

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
        """(sampling options for the engine, bound doc_ids) from the fields and the call's kwargs."""
        kwargs = dict(kwargs)
        for key in ("tools", "tool_choice", "functions", "function_call", "response_format"):
            if kwargs.get(key):
                raise NotImplementedError(
                    f"ChatKVzip does not support {key!r}: no tool calling or structured output (see bind_tools)"
                )
            kwargs.pop(key, None)
        requested = kwargs.pop("model", None)
        if requested is not None and requested != self.model_name:
            raise InvalidArgumentError(
                f"ChatKVzip answers with the index's model {self.model_name!r}; its caches cannot be used by model "
                f"{requested!r} (build an index with that model instead)"
            )
        if "max_tokens" in kwargs:
            kwargs["max_new_tokens"] = kwargs.pop("max_tokens")
        options = {
            "max_new_tokens": kwargs.pop("max_new_tokens", self.max_new_tokens),
            "temperature": kwargs.pop("temperature", self.temperature),
            "top_k": kwargs.pop("top_k", self.top_k),
            "top_p": kwargs.pop("top_p", self.top_p),
            "seed": kwargs.pop("seed", self.seed),
        }
        stops = [s for s in (stop if stop is not None else (self.stop or [])) if s]
        options["stop"] = tuple(stops)
        doc_ids = kwargs.pop("doc_ids", self.doc_ids)
        for ignored in ("stream", "ls_structured_output_format", "structured_output_format"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"ChatKVzip got unexpected arguments: {', '.join(sorted(kwargs))}")
        return options, doc_ids

    # -------------------------------------------------------------------------------------- answering

    def _session_key(self, route: _Route, turns: Sequence[tuple[str, str]]) -> tuple:
        return (route.doc_id, route.segment_index, tuple((q.strip(), a.strip()) for q, a in turns))

    def _chunks(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict
    ) -> Iterator[ChatGenerationChunk]:
        """The answer's text pieces as generated, then one empty chunk with usage and response metadata."""
        dialogue = _dialogue(messages)
        options, doc_ids = self._options(stop, kwargs)
        index = self.index
        start = time.perf_counter()
        route = _routes(index, dialogue.route_query, 1, doc_ids)[0]
        model = _model(index)
        with index.lock:
            routed = time.perf_counter()
            key = self._session_key(route, dialogue.turns)
            conversation = self._sessions.pop(key, None) if self.reuse_conversations else None
            reused = conversation is not None
            bytes_loaded = replayed = 0
            if conversation is None:
                cache, _, bytes_loaded = index.load_hit_cache((route.doc_id, route.segment_index))
                conversation = Conversation(model, cache)
            loaded = time.perf_counter()
            cache = conversation.cache
            cached_tail = cache.tail_length if reused else 0
            for question, answer in ([] if reused else dialogue.turns):
                replayed += conversation.add_turn(question, answer)
            replay_done = time.perf_counter()
            prompt_tokens = len(model.encode(model.template.question_text(dialogue.question,
                                                                          first_turn=not conversation.turns)))
            needed = cache.get_seq_length() + prompt_tokens + options["max_new_tokens"]
            if needed > model.max_positions:
                raise ContextTooLongError(
                    f"this conversation needs {needed} positions (document {cache.info.base_length}, earlier turns "
                    f"{cache.tail_length}, question {prompt_tokens}, answer up to {options['max_new_tokens']}) but "
                    f"model {model.name!r} takes at most {model.max_positions}; start a new conversation or lower "
                    "max_tokens"
                )
            stream = conversation.stream(dialogue.question, **options)
            for piece in stream:  # the engine streams no leading whitespace
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece))
            result = stream.result
            if self.reuse_conversations and (not options["stop"] or result.finish_reason == "length"):
                # The cache tail holds exactly this conversation (no stop string cut the answer): keep it for a
                # follow-up call whose history is this conversation.
                self._sessions[self._session_key(route, conversation.turns)] = conversation
                while len(self._sessions) > self.reuse_conversations:
                    self._sessions.popitem(last=False)
        document_tokens = cache.info.base_length
        input_tokens = document_tokens + cached_tail + replayed + result.prompt_tokens
        output_tokens = len(result.token_ids)
        usage = UsageMetadata(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
            input_token_details={"cache_read": document_tokens + cached_tail},
        )
        metadata = {
            "model_name": model.name,
            "model_provider": "kvzip",
            "finish_reason": result.finish_reason,
            "doc_ids": [route.doc_id],
            "cache_ids": [route.metadata.get("cache_id")],
            "segment_index": route.segment_index,
            "routing": route.routing,
            "route_score": route.score,
            "ratio": cache.info.ratio,
            "level": cache.info.level,
            "kept_ratio": cache.kept_ratio,
            "cache_bytes": cache.nbytes,
            "full_cache_bytes": cache.full_nbytes,
            "bytes_loaded": bytes_loaded,
            "document_tokens": document_tokens,
            "reused_conversation": reused,
            "retrieve_s": routed - start,
            "cache_load_s": loaded - routed,
            "replay_s": replay_done - loaded,
            "ttft_s": result.time_to_first_token_s,
            "decode_s": result.decode_s,
        }
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=metadata,
                                   chunk_position="last"),
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        text, usage, metadata = "", None, {}
        for chunk in self._chunks(messages, stop, kwargs):
            text += chunk.message.content
            usage = chunk.message.usage_metadata or usage
            metadata.update(chunk.message.response_metadata)
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return await asyncio.to_thread(self._generate, messages, stop, None, **kwargs)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        yield from self._chunks(messages, stop, kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in _aiter_in_thread(lambda: self._chunks(messages, stop, kwargs)):
            yield chunk


# ------------------------------------------------------------------------------------------------- QA chain


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


def _annotated(sources: list[Document], result: Any) -> list[Document]:
    """With several sources, each one's own answer and whether it was chosen (as the LlamaIndex engine does)."""
    if result is None or len(result.answers) < 2:
        return sources
    by_key = {(a.doc_id, a.segment_index): a for a in result.answers}
    out = []
    for doc in sources:
        found = by_key.get((doc.metadata["doc_id"], doc.metadata["segment_index"]))
        if found is None:
            out.append(doc)
            continue
        extra = {"answer": found.text, "mean_logprob": found.mean_logprob, "refusal": found.refusal,
                 "chosen": found is result.best}
        out.append(Document(page_content=doc.page_content, metadata={**doc.metadata, **extra}, id=doc.id))
    return out


class KVzipQAChain(Runnable[Any, dict]):
    """Question in, ``{"answer": str, "sources": list[Document]}`` out; built by :func:`create_kvzip_qa_chain`."""

    def __init__(self, index: Any, k: int = 1, **sampling: Any):
        if "max_tokens" in sampling:
            sampling["max_new_tokens"] = sampling.pop("max_tokens")
        unknown = set(sampling) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling options: {', '.join(sorted(unknown))}; use {', '.join(_SAMPLING_KEYS)}")
        if "stop" in sampling:
            sampling["stop"] = tuple(sampling["stop"] or ())
        SamplingOptions(**sampling)  # bad values fail here, not at the first question
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {k!r}")
        self.index = index
        self.k = k
        self.sampling = sampling
        self.retriever = KVzipRetriever(index=index, k=k)
        self.name = "KVzipQAChain"

    @property
    def InputType(self) -> Any:  # noqa: N802 - LangChain's name
        return str | dict

    @property
    def OutputType(self) -> Any:  # noqa: N802
        return dict

    def get_input_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        class KVzipQAInput(BaseModel):
            question: str

        return KVzipQAInput

    def get_output_schema(self, config: RunnableConfig | None = None) -> type[BaseModel]:
        class KVzipQAOutput(BaseModel):
            answer: str
            sources: list[Document]

        return KVzipQAOutput

    def _question(self, value: Any) -> str:
        question = _question_of(value).strip()
        if not question:
            raise InvalidArgumentError("the question is empty")
        return question

    def _answer_stream(self, question: str, sources: list[Document]):
        targets = [(d.metadata["doc_id"], d.metadata["segment_index"]) for d in sources]
        return self.index.stream_hits(question, targets, **self.sampling)

    # The answer comes from the index (KVzipIndex.stream_hits): the model runs in its worker thread, behind
    # index.lock; with k > 1 every source's cache answers and the best answer is kept (pieces then arrive after the
    # choice), with k = 1 pieces arrive as they are generated.

    def _transform(self, inputs: Iterator[Any], run_manager, config: RunnableConfig) -> Iterator[AddableDict]:
        value = None
        for chunk in inputs:  # one value, or the chunks of a streamed upstream value
            value = chunk if value is None else _add(value, chunk)
        question = self._question(value)
        sources = self.retriever.invoke(question, patch_config(config, callbacks=run_manager.get_child()))
        stream = self._answer_stream(question, sources)
        yield AddableDict(answer="")  # the answer key comes first, even for an empty answer
        for piece in stream:  # the engine streams no leading whitespace
            yield AddableDict(answer=piece)
        yield AddableDict(sources=_annotated(sources, stream.result))

    async def _atransform(self, inputs: AsyncIterator[Any], run_manager, config: RunnableConfig):
        value = None
        async for chunk in inputs:
            value = chunk if value is None else _add(value, chunk)
        question = self._question(value)
        sources = await self.retriever.ainvoke(question, patch_config(config, callbacks=run_manager.get_child()))
        stream = self._answer_stream(question, sources)
        yield AddableDict(answer="")  # the answer key comes first, even for an empty answer
        async for piece in stream:  # the engine streams no leading whitespace
            yield AddableDict(answer=piece)
        yield AddableDict(sources=_annotated(sources, stream.result))

    def invoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        final = None
        for chunk in self.stream(input, config, **kwargs):
            final = chunk if final is None else final + chunk
        return dict(final)

    def stream(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> Iterator[AddableDict]:
        yield from self.transform(iter([input]), config, **kwargs)

    def transform(self, input: Iterator[Any], config: RunnableConfig | None = None,
                  **kwargs: Any) -> Iterator[AddableDict]:
        yield from self._transform_stream_with_config(input, self._transform, config, **kwargs)

    async def ainvoke(self, input: Any, config: RunnableConfig | None = None, **kwargs: Any) -> dict:
        final = None
        async for chunk in self.astream(input, config, **kwargs):
            final = chunk if final is None else final + chunk
        return dict(final)

    async def astream(self, input: Any, config: RunnableConfig | None = None,
                      **kwargs: Any) -> AsyncIterator[AddableDict]:
        async def one() -> AsyncIterator[Any]:
            yield input

        async for chunk in self.atransform(one(), config, **kwargs):
            yield chunk

    async def atransform(self, input: AsyncIterator[Any], config: RunnableConfig | None = None,
                         **kwargs: Any) -> AsyncIterator[AddableDict]:
        async for chunk in self._atransform_stream_with_config(input, self._atransform, config, **kwargs):
            yield chunk


def _add(a: Any, b: Any) -> Any:
    try:
        return a + b
    except TypeError:
        return b


def create_kvzip_qa_chain(index: Any, k: int = 1, **sampling: Any) -> KVzipQAChain:
    """A ready question-answering Runnable over a ``KVzipIndex``.

    Input: a question string, or ``{"question": ...}`` (``"query"``/``"input"`` keys are accepted too), or a prompt
    value or message (its text is the question). Output: ``{"answer": str, "sources": list[Document]}``, where
    ``sources`` are the ``k`` segments :class:`KVzipRetriever` returns (best first, same metadata) and ``answer`` is
    generated from their compressed caches by the index (``KVzipIndex.stream_hits``): with ``k=1`` from the best
    segment's cache; with ``k > 1`` every cache answers and the best answer is kept (each source then also carries
    its own ``answer``, ``mean_logprob``, ``refusal`` and ``chosen`` in its metadata). ``sampling``:
    ``max_new_tokens`` (or ``max_tokens``), ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``.

    ``invoke``/``batch``/``ainvoke``/``abatch`` return the dict. ``stream``/``astream`` yield ``{"answer": piece}``
    dicts as tokens are generated (with ``k > 1``, once the best answer is chosen), then one
    ``{"sources": [...]}``; the chunks add up to the full output. It composes like any Runnable::

        chain = create_kvzip_qa_chain(index)
        text = chain.pick("answer") | StrOutputParser()             # streams the answer text
        text = chain | itemgetter("answer")                         # the answer text (no streaming)
        chain = {"question": RunnablePassthrough()} | chain
        chain = PromptTemplate.from_template("Who founded {place}?") | chain
    """
    return KVzipQAChain(index, k=k, **sampling)
