"""``ChatKVzip``: a LangChain chat model answering from compressed document caches (core service + dialogue)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, ChatMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from kvzip_rag.answers import grounding_metadata
from kvzip_rag.bridge import apush_in_thread
from kvzip_rag.dialogue import ChatSession, fold_messages
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.generate import SamplingOptions
from kvzip_rag.qa import QAService, Target, get_composer

from ..segments import SERVICE_OPTIONS
from ._service import build_service, documents_in, target_of


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


class ChatKVzip(BaseChatModel):
    """A chat model that answers from compressed document caches.

    Built from ``store=`` (a folder or ``CacheStore``) and ``model=`` (a ``KVzipModel``, alias or path; loaded on
    first use with ``threads=``), or from ``qa=`` (a shared :class:`kvzip_rag.qa.QAService`).

    **Retrieved Documents in the prompt** (the idiomatic ``{"context": retriever, "question": RunnablePassthrough()}
    | prompt | chat_model`` chain): the retriever's Documents travel in the prompt as the template writes them
    (``Document(id=..., metadata={...}, page_content=...)``), and their metadata names their caches (``doc_id``,
    ``segment_index``). Those of this store's segments are read back from the last message, cut out of the prompt,
    and the rest of the prompt (instructions + question) is answered from *their caches* (as
    ``create_kvzip_qa_chain`` does) instead of re-reading their text; ``response_metadata["cached_documents"]``
    says how many. Text without the Documents (e.g. only their ``page_content`` joined) is read as a plain
    question: keep the Documents in the prompt to answer from the caches. Several segments
    make one answer by ``compose`` (default: the service's, ``"parallel"``: joined into one cache; ``"best-of-k"``:
    the best of their answers; per call too, e.g. ``chat_model.bind(compose="best-of-k")``), and
    ``response_metadata`` names it (``compose``, ``strategy``) with the segments used (``doc_ids``,
    ``composed_node_ids``) and those the model's window could not take (``dropped_node_ids``).

    **Otherwise** the conversation is appended after compressed documents, as the engine's follow-up turns are
    (:class:`kvzip_rag.dialogue.ChatSession`). Every human message is routed with the service's routing (full-text
    search; restricted to ``doc_ids`` when bound): the last one's documents are in the cache it is answered from,
    beside the documents earlier messages were routed to (composed; the least recently routed are dropped when the
    window cannot hold them), and a message that matches no word keeps the documents before it (the first one gets
    the first segment, with ``response_metadata["routing"] == "fallback"``). Earlier turns are replayed into that
    cache; when the history is exactly a conversation this instance just answered, that conversation's cache is
    continued instead (``reuse_conversations`` most recent ones are kept; rebuilt only when the new message needs
    another document). The documents are laid out by ``compose`` when it is a layout (``"parallel"``,
    ``"sequential"``), else in parallel (a conversation continues in one cache; ``response_metadata["compose"]``
    says which).

    Messages: system messages are folded into the next human message as a leading paragraph (the model's own system
    prompt is part of the cache's fixed prefix and cannot change); consecutive messages of one role are joined with
    a blank line; message ``name`` fields are ignored. Text only: tool calling, structured output and image, audio
    or file inputs are not supported (``bind_tools`` and ``with_structured_output`` raise ``NotImplementedError``,
    so do tool messages and non-text content blocks).

    ``stream``/``astream`` yield tokens as they are generated. Every answer carries ``usage_metadata``
    (``input_tokens`` = document tokens + earlier turns + question, of which the tokens served from a cache are
    ``input_token_details["cache_read"]``) and ``response_metadata``: ``model_name``, ``finish_reason``,
    ``doc_ids`` and ``node_ids`` (the documents this answer used, most recently routed first), ``cache_ids``,
    ``segment_index``, ``routed_node_ids``, ``routing``, ``route_score``, ``cache_change`` (``new``, ``kept``,
    ``recomposed`` or ``switched``), ``dropped`` (documents left out, with the reason), ``ratio``, ``level``,
    ``kept_ratio``, ``cache_bytes``, ``full_cache_bytes``, ``bytes_loaded`` (read from disk), ``document_tokens``,
    ``reused_conversation`` and timings ``retrieve_s``, ``cache_load_s``, ``replay_s``, ``ttft_s``, ``decode_s``;
    and the answer's grounding: ``citations`` (the cited spans as dicts: ``doc_id``, ``segment_index``, ``start``,
    ``end``, ``text``, ``weight``; best first), ``abstained`` (the evidence was too weak: ``invoke``'s content is
    the abstention, ``candidate_answer`` the generated text; a stream's pieces are the candidate as generated and
    its last chunk says so), for an answer from retrieved Documents and for a conversation turn alike.
    ``answer_style``, ``abstain_threshold``, ``evidence`` and ``abstain_text`` (fields, or per call) are passed to
    the service.

    Sampling: greedy when ``temperature=0`` (default); ``max_new_tokens`` (alias ``max_tokens``), ``top_k``,
    ``top_p``, ``seed`` and ``stop`` as in ``kvzip_rag.answer``; each can also be given per call, as can
    ``doc_ids`` and ``compose``. A per-call ``model`` argument naming another model is refused (the caches belong
    to one model).
    """

    qa: Any = Field(default=None, exclude=True, repr=False)
    store: Any = Field(default=None, exclude=True, repr=False)
    model: Any = Field(default=None, exclude=True, repr=False)
    index: Any = Field(default=None, exclude=True, repr=False)
    threads: int | None = None
    ratio: float | None = None
    level: str | None = None
    doc_ids: list[str] | None = None
    compose: str | None = None
    """How several retrieved segments in a prompt make one answer (None: the service's, ``"parallel"``)."""
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
    answer_style: str | None = None
    """Passed to the service when set (``"quote"``: a verbatim span of a document; see ``QAService.answer``)."""
    abstain_threshold: float | None = None
    """Passed to the service when set (``None`` given explicitly: never abstain)."""
    evidence: bool | None = None
    """Passed to the service when set (``False``: no citations and no abstention)."""
    abstain_text: str | None = None
    """Passed to the service when set: what the answer says when it abstains."""

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True, protected_namespaces=())

    _sessions: OrderedDict = PrivateAttr(default_factory=OrderedDict)

    @model_validator(mode="after")
    def _service(self) -> "ChatKVzip":
        if not isinstance(self.qa, QAService):
            self.qa = build_service({"qa": self.qa, "store": self.store, "model": self.model, "index": self.index,
                                     "threads": self.threads, "ratio": self.ratio, "level": self.level})
        if self.compose is not None:
            get_composer(self.compose)  # an unknown name is refused when the model is built
        return self

    # ------------------------------------------------------------------------------------------ identity

    @property
    def model_name(self) -> str:
        return self.qa.model.name

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
        stops = stop if stop is not None else self.stop
        if isinstance(stops, (list, tuple)) and stops:  # anything else fails with a clear error when answering
            params["ls_stop"] = list(stops)
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

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None,
                                                                               str | None]:
        """(sampling options for the engine, bound doc_ids, compose) from the fields and the call's kwargs."""
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
                f"ChatKVzip answers with the store's model {self.model_name!r}; its caches cannot be used by model "
                f"{requested!r} (index the documents with that model instead)"
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
        # the engine's own check and clean-up (one rule): a list of strings, the empty ones dropped
        options["stop"] = SamplingOptions(stop=stop if stop is not None else (self.stop or ())).stop
        for key in SERVICE_OPTIONS:  # forwarded when set on the model or the call; the service checks them
            if key in kwargs:
                options[key] = kwargs.pop(key)
            elif key in self.model_fields_set:
                options[key] = getattr(self, key)
        doc_ids = kwargs.pop("doc_ids", self.doc_ids)
        compose = kwargs.pop("compose", self.compose)
        if compose is not None:
            get_composer(compose)
        for ignored in ("stream", "ls_structured_output_format", "structured_output_format"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"ChatKVzip got unexpected arguments: {', '.join(sorted(kwargs))}")
        return options, doc_ids, compose

    # -------------------------------------------------------------------------------------- answering

    def _session_key(self, doc_ids: Sequence[str] | None, turns: Sequence[tuple[str, str]],
                     layout: str | None) -> tuple:
        return (tuple(doc_ids) if doc_ids is not None else None, tuple((q.strip(), a.strip()) for q, a in turns),
                layout)

    def _chunks(self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict, emit) -> None:
        """Emit the answer's text pieces as generated (``AIMessageChunk``), then one chunk with usage and
        response metadata."""
        roles = []
        for message in messages:
            _check_no_tools(message)
            role = message.role if isinstance(message, ChatMessage) else message.type
            roles.append((role, _text_of(message)))
        dialogue = fold_messages(roles)
        options, doc_ids, compose = self._options(stop, kwargs)
        piece = lambda text: emit(ChatGenerationChunk(message=AIMessageChunk(content=text)))  # noqa: E731
        start = time.perf_counter()
        cached = _cached_segments(self.qa, dialogue.question) if not dialogue.turns else None
        if cached is not None:
            targets, question = cached
            result = self.qa.answer(question, targets=targets, compose=compose, _emit=piece, **options)
            best = result.best
            used = result.used
            document_tokens = best.target_tokens
            info = result.metadata(time.perf_counter() - start)
            usage_in = best.answer.prompt_tokens + document_tokens
            turn_answer, target = best.answer, best.target
            extra = {"cached_documents": len(targets), "reused_conversation": False, "replay_s": 0.0,
                     "compose": result.compose, "strategy": info["strategy"],
                     "composed_node_ids": info["composed_node_ids"], "dropped_node_ids": info["dropped_node_ids"]}
            cached_read = document_tokens
            extra_grounding = grounding_metadata(result)
        else:
            layout = getattr(get_composer(compose), "layout", None) if compose is not None else None
            key = self._session_key(doc_ids, dialogue.turns, layout)
            session = self._sessions.pop(key, None) if self.reuse_conversations else None
            reused = session is not None
            if session is None:
                session = ChatSession(self.qa, doc_ids=doc_ids, sampling=options, compose=layout)
            history = [] if reused else dialogue.turns
            routing_start = time.perf_counter()
            plan = session.plan(dialogue.question, history)
            routed = time.perf_counter()
            turn = session.ask(dialogue.question, history=history, emit=piece, plan=plan, **options)
            if self.reuse_conversations and (not options["stop"] or turn.answer.finish_reason == "length"):
                # the cache tail holds exactly this conversation (no stop string cut the answer): keep it
                self._sessions[self._session_key(doc_ids, session.conversation.turns, layout)] = session
                while len(self._sessions) > self.reuse_conversations:
                    self._sessions.popitem(last=False)
            info = turn.info
            turn_answer, target, used = turn.answer, turn.documents[0], turn.documents
            extra_grounding = grounding_metadata(turn)
            document_tokens = session.conversation.cache.info.base_length
            cached_read = turn.cached_tokens
            usage_in = turn.cached_tokens + turn.replayed_tokens + turn_answer.prompt_tokens
            extra = {"reused_conversation": reused, "retrieve_s": routed - routing_start,
                     "replay_s": info["replay_s"], "doc_ids": info["doc_ids"], "node_ids": info["node_ids"],
                     "cache_ids": [t.metadata.get("cache_id") for t in turn.documents],
                     "routed_node_ids": info["routed_node_ids"], "routing": info["routing"],
                     "route_score": turn.routed[0].score if turn.routed else None,
                     "cache_change": info["cache_change"], "dropped": info["dropped"], "compose": session.layout}
        output_tokens = len(turn_answer.token_ids)
        usage = UsageMetadata(input_tokens=usage_in, output_tokens=output_tokens,
                              total_tokens=usage_in + output_tokens, input_token_details={"cache_read": cached_read})
        metadata = {
            "model_name": self.qa.model.name, "model_provider": "kvzip", "finish_reason": turn_answer.finish_reason,
            "doc_ids": [t.doc_id for t in used], "cache_ids": [t.metadata.get("cache_id") for t in used],
            "segment_index": target.segment_index, "routing": target.routing, "route_score": target.score,
            "ratio": info.get("ratio"), "level": info.get("level"), "kept_ratio": info.get("kept_ratio"),
            "cache_bytes": info.get("cache_bytes"), "full_cache_bytes": info.get("full_bytes"),
            "bytes_loaded": info.get("bytes_loaded"), "document_tokens": document_tokens,
            "retrieve_s": info.get("retrieve_s"), "cache_load_s": info.get("cache_load_s"),
            "ttft_s": turn_answer.time_to_first_token_s, "decode_s": turn_answer.decode_s, **extra,
            **extra_grounding,
        }
        emit(ChatGenerationChunk(message=AIMessageChunk(content="", usage_metadata=usage, response_metadata=metadata,
                                                        chunk_position="last")))

    def _iter_chunks(self, messages, stop, kwargs) -> Iterator[ChatGenerationChunk]:
        out: list = []
        self._chunks(messages, stop, kwargs, out.append)
        return iter(out)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        text, usage, metadata = "", None, {}
        for chunk in self._iter_chunks(messages, stop, kwargs):
            text += chunk.message.content
            usage = chunk.message.usage_metadata or usage
            metadata.update(chunk.message.response_metadata)
        if metadata.get("abstained"):  # the pieces were the candidate; the answer is the abstention
            text = metadata["abstain_text"]
        message = AIMessage(content=text, usage_metadata=usage, response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        from kvzip_rag.bridge import run_in_thread

        return await run_in_thread(lambda: self._generate(messages, stop, None, **kwargs))

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        from kvzip_rag.bridge import push_in_thread

        yield from push_in_thread(lambda emit: self._chunks(messages, stop, kwargs, emit), name="kvzip-chat")

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        async for chunk in apush_in_thread(lambda emit: self._chunks(messages, stop, kwargs, emit),
                                           name="kvzip-chat"):
            yield chunk


def _cached_segments(service: QAService, text: str) -> tuple[list[Target], str] | None:
    """The segments of this service's store whose Documents a prompt carries (:func:`._service.documents_in`: a
    retriever's Documents as a prompt template writes them), and the prompt with them cut out, so the answer comes
    from their caches, not from re-reading them; None when the prompt carries none."""
    def ours(document) -> bool:
        meta = document.metadata
        return (isinstance(meta.get("segment_index"), int) and isinstance(meta.get("doc_id"), str)
                and meta["doc_id"] in service.store)

    documents, rest = documents_in(text, ours)
    if not documents:
        return None
    return list(dict.fromkeys(target_of(d) for d in documents)), rest or text
