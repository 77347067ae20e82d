"""Conversations over one compressed cache, for every interface: history folding, the window check, chat sessions.

A chat is routed once, by its first question, and then stays in that cache: each turn is appended to the cache's
tail (:class:`kvzip_rag.Conversation`). A given history (LlamaIndex ``chat_history``, LangChain messages) is folded
into (question, answer) turns by :func:`fold_messages` and replayed into the cache without generating.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ContextTooLongError, InvalidArgumentError
from .qa import QAResult, QAService, Target, check_k, check_question, check_sampling, get_composer

if TYPE_CHECKING:
    from .generate import Answer, Conversation

_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
          "ai": "assistant", "model": "assistant"}


@dataclass
class Dialogue:
    """A conversation reduced to what the cache layout can hold: answered turns, then the question to answer."""

    route_query: str  # the first user message: it picks the document segment
    turns: list[tuple[str, str]]
    question: str


def fold_messages(messages: Iterable[tuple[str, str]]) -> Dialogue:
    """Fold ``(role, text)`` messages into turns (roles: system/developer, user/human, assistant/ai).

    System messages go before the next user message as a leading paragraph (the model's own system prompt is part
    of the cache's fixed prefix and cannot change); a trailing one before the last question. Consecutive messages
    of one role are joined with a blank line; assistant messages before the first user message go before the first
    question. The conversation must end with a user (or system) message.
    """
    pending_system: list[str] = []
    leading_ai: list[str] = []
    turns: list[list[Any]] = []  # [question, answer | None]
    first_user: str | None = None
    last_role = None
    for role, text in messages:
        kind = _ROLES.get(str(role).lower())
        if kind is None:
            raise InvalidArgumentError(f"cannot read a {role!r} message (system, user and assistant messages only)")
        text = (text or "").strip()
        if kind == "system":
            if text:
                pending_system.append(text)
            continue
        if kind == "user":
            if first_user is None:
                first_user = text
            if leading_ai and not turns:
                text, leading_ai = "\n\n".join([*leading_ai, text]), []
            if pending_system:
                text, pending_system = "\n\n".join([*pending_system, text]), []
            if last_role == "user" and turns and turns[-1][1] is None:
                turns[-1][0] = "\n\n".join(filter(None, [turns[-1][0], text]))
            else:
                turns.append([text, None])
        else:
            if not turns:
                if text:
                    leading_ai.append(text)
                continue
            turns[-1][1] = text if turns[-1][1] is None else "\n\n".join(filter(None, [turns[-1][1], text]))
        last_role = kind
    if not turns or turns[-1][1] is not None:
        raise InvalidArgumentError("the conversation must end with a human message (a user message: the question to answer)")
    if pending_system:
        turns[-1][0] = "\n\n".join([*pending_system, turns[-1][0]])
    if not turns[-1][0].strip():
        raise InvalidArgumentError("the last human (user) message is empty: there is no question to answer")
    return Dialogue(first_user or turns[0][0], [(q, a) for q, a in turns[:-1]], turns[-1][0])


def check_window(model, cache, question: str, max_new_tokens: int, first_turn: bool) -> None:
    """Refuse a turn that would run past the model's positions (document + earlier turns + question + answer)."""
    prompt = len(model.encode(model.template.question_text(question, first_turn=first_turn)))
    needed = cache.get_seq_length() + prompt + max_new_tokens
    if needed > model.max_positions:
        raise ContextTooLongError(
            f"this conversation needs {needed} positions (document {cache.info.base_length}, earlier turns "
            f"{cache.tail_length}, question {prompt}, answer up to {max_new_tokens}) but model {model.name!r} takes "
            f"at most {model.max_positions}; start a new conversation (reset) or lower the answer length"
        )


@dataclass
class Turn:
    """One answered turn: the engine's answer, figures for response metadata, and the several-cache result if any."""

    answer: Answer
    info: dict
    result: QAResult | None = None
    target: Target | None = None
    cached_tokens: int = 0  # document + earlier turns served from the cache
    replayed_tokens: int = 0  # earlier turns put into the cache for this call


@dataclass
class ChatSession:
    """A conversation with the cache its first question is routed to (``k`` > 1: the first message is answered by
    the service's composition, or ``compose``, and the conversation continues in the first cache that answer used).

    ``ask(question, history=...)``: when no conversation is live, ``history`` ((question, answer) pairs) is
    replayed into the routed cache first. ``reset()`` goes back to the compressed document and routes afresh.
    """

    service: QAService
    k: int = 1
    doc_ids: Sequence[str] | None = None
    sampling: dict = field(default_factory=dict)
    compose: str | None = None  # how several routed caches answer the first message (None: the service's)
    targets: list[Target] = field(default_factory=list)
    fallback: bool = False
    conversation: Conversation | None = None

    def __post_init__(self) -> None:
        check_k(self.k)
        self.sampling = check_sampling(self.sampling)
        if self.compose is not None:
            get_composer(self.compose)  # an unknown name is refused here, before any message

    def reset(self) -> None:
        with self.service.lock:
            if self.conversation is not None:
                self.conversation.reset()
            self.conversation, self.targets, self.fallback = None, [], False

    def route(self, question: str) -> list[Target]:
        routing = self.service.route(question, self.k, self.doc_ids)
        self.targets, self.fallback = routing.targets, routing.fallback
        return self.targets

    def ask(self, question: str, history: Sequence[tuple[str, str]] = (), emit: Callable[[str], None] | None = None,
            **sampling: Any) -> Turn:
        question = check_question(question, "message")
        options = {**self.sampling, **check_sampling(sampling)}
        service = self.service
        with service.lock:
            model = service.model
            info: dict = {"cache_load_s": 0.0, "bytes_loaded": 0}
            replayed = 0
            target = self.targets[0] if self.targets else None
            if self.conversation is None:
                if not self.targets:
                    self.route(history[0][0] if history else question)
                if len(self.targets) > 1 and not history:
                    return self._best_of_k(question, options, emit)
                from .generate import Conversation

                target = self.targets[0]
                cache, load_s, nbytes = service.load(target)
                self.conversation = Conversation(model, cache)
                info.update(cache_load_s=load_s, bytes_loaded=nbytes)
                for q, a in history:
                    replayed += self.conversation.add_turn(q, a)
            conversation = self.conversation
            cache = conversation.cache
            cached = cache.get_seq_length() - replayed
            check_window(model, cache, question, options.get("max_new_tokens", 128), not conversation.turns)
            stream = conversation.stream(question, **options)
            for piece in stream:
                if emit is not None:
                    emit(piece)
            result = stream.result
            info.update(
                ttft_s=result.time_to_first_token_s, decode_s=result.decode_s, ratio=cache.info.ratio,
                level=cache.info.level, kept_ratio=cache.kept_ratio, cache_bytes=cache.nbytes,
                full_bytes=cache.full_nbytes, answer_tokens=len(result.token_ids), prompt_tokens=result.prompt_tokens,
                finish_reason=result.finish_reason, turns=len(conversation.turns),
                cache_positions=cache.get_seq_length(),
            )
            return Turn(result, info, None, target, cached, replayed)

    def _best_of_k(self, question: str, options: dict, emit) -> Turn:
        """First message with several routed caches: the composition answers it, then the conversation continues in
        the first cache the answer used (best-of-k: the winner's)."""
        from .generate import Conversation

        service = self.service
        start = time.perf_counter()
        result = service.answer(question, targets=self.targets, compose=self.compose, _emit=emit, **options)
        best = result.best
        cache, load_s, nbytes = service.load(best.target)
        self.conversation = Conversation(service.model, cache)
        self.conversation.add_turn(question, best.text)
        info = result.metadata()
        info.update(cache_load_s=info["cache_load_s"] + load_s, bytes_loaded=info["bytes_loaded"] + nbytes,
                    turns=1, generate_s=time.perf_counter() - start)
        self.targets = [best.target] + [t for t in self.targets if t != best.target]
        return Turn(best.answer, info, result, best.target, cache.info.base_length, 0)
