"""The chat engine of a KVzipIndex: a :class:`kvzip_rag.dialogue.ChatSession` with LlamaIndex's chat types."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional

from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.chat_engine.types import AgentChatResponse, BaseChatEngine, StreamingAgentChatResponse
from llama_index.core.schema import NodeWithScore

from kvzip_rag.bridge import apush_in_thread, push_in_thread, run_in_thread
from kvzip_rag.dialogue import ChatSession, TurnPlan, fold_messages

if TYPE_CHECKING:
    from kvzip_rag.generate import Conversation

    from .index import KVzipIndex


def _role(message: ChatMessage) -> str:
    return message.role.value if hasattr(message.role, "value") else str(message.role)


class KVzipChatEngine(BaseChatEngine):
    """A conversation answered from compressed caches that follows its topic (:class:`kvzip_rag.dialogue.ChatSession`).

    Every message is routed (``similarity_top_k`` segments). Follow-ups about the documents already in the
    conversation's cache, or matching no word ("tell me more"), continue in it (:class:`kvzip_rag.Conversation`);
    one about another document rebuilds the cache with that document composed beside the conversation's earlier
    ones (the least recently routed are dropped when they do not fit) and the earlier turns replayed into it.
    ``compose="parallel"|"sequential"`` picks the layout of the composed cache (default: the index's when it
    composes, else parallel; ``"best-of-k"`` is refused: a conversation continues in one cache). ``reset()`` drops the turns and documents. Passing ``chat_history`` replaces the conversation with that history
    (folded by :func:`kvzip_rag.dialogue.fold_messages`: system messages lead the next user message; its questions
    routed in order, its turns replayed into the cache). Responses carry the turn's documents as ``source_nodes``
    and, in ``metadata``, ``node_ids``/``doc_ids`` (the documents the turn used), ``routed_node_ids``, ``routing``,
    ``cache_change`` (``new``, ``kept``, ``recomposed`` or ``switched``), ``dropped`` (with reasons) and timings.
    """

    def __init__(self, index: "KVzipIndex", similarity_top_k: int = 1, compose: Optional[str] = None,
                 **sampling: Any) -> None:
        self._index = index
        self._session = ChatSession(index.qa, k=similarity_top_k, sampling=sampling, compose=compose)
        self._history: List[ChatMessage] = []
        self._pairs: list[tuple[str, str]] = []
        self._pending: list[tuple[str, str]] = []

    @property
    def index(self) -> "KVzipIndex":
        return self._index

    @property
    def conversation(self) -> Optional["Conversation"]:
        """The live conversation (None before the first message and after ``reset()``)."""
        return self._session.conversation

    @property
    def chat_history(self) -> List[ChatMessage]:
        return list(self._history)

    def reset(self) -> None:
        with self._index.lock:
            self._session.reset()
            self._history, self._pairs, self._pending = [], [], []

    def _prepare(self, message: str, chat_history: Optional[List[ChatMessage]]) -> tuple[str, TurnPlan]:
        """Check, adopt a given history and plan the turn (retrieval only); runs before any generation starts.
        What a turn answers from travels with its plan and result, never through the engine, so concurrent
        messages to one engine (which the session answers one at a time) each get their own sources."""
        question = message
        if chat_history is not None:
            dialogue = fold_messages([(_role(m), m.content or "") for m in chat_history] + [("user", message)])
            question = dialogue.question
            if dialogue.turns != self._pairs:
                self.reset()
                self._pending = dialogue.turns
        return question, self._session.plan(question, self._pending)

    def _turn(self, message: str, plan: TurnPlan, emit=None) -> tuple[str, List[NodeWithScore], dict]:
        """The turn's text, source nodes (the documents its cache held) and metadata."""
        with self._index.lock:
            turn = self._session.ask(message, history=self._pending, emit=emit, plan=plan)
            if self._pending:
                self._pairs = list(self._pending)
                self._history = [m for q, a in self._pending for m in (
                    ChatMessage(role=MessageRole.USER, content=q), ChatMessage(role=MessageRole.ASSISTANT, content=a))]
                self._pending = []
            self._pairs.append((message, turn.answer.text))
            self._history += [ChatMessage(role=MessageRole.USER, content=message),
                              ChatMessage(role=MessageRole.ASSISTANT, content=turn.text)]
            return turn.text, self._index.nodes_for(turn.documents), dict(turn.info)

    def chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        with self._index.lock:
            question, plan = self._prepare(message, chat_history)
            text, nodes, info = self._turn(question, plan)
        return AgentChatResponse(response=text, source_nodes=nodes, metadata=info)

    async def achat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        return await run_in_thread(lambda: self.chat(message, chat_history))

    def _locked_prepare(self, message: str, chat_history: Optional[List[ChatMessage]]) -> tuple[str, TurnPlan]:
        with self._index.lock:
            return self._prepare(message, chat_history)

    def _streaming_response(self, question: str, plan: TurnPlan, asynchronous: bool) -> StreamingAgentChatResponse:
        metadata: dict = {}

        def work(emit) -> None:
            _, nodes, info = self._turn(question, plan, emit)
            response.source_nodes[:] = nodes  # the window may have left some of the plan's out
            metadata.update(info)

        response = StreamingAgentChatResponse(source_nodes=self._index.nodes_for(plan.documents),
                                              is_writing_to_memory=False)
        response.metadata = metadata  # filled in when the stream ends

        def delta(text: str, piece: str) -> ChatResponse:
            return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)

        if asynchronous:
            async def achat_stream():
                text = ""
                async for piece in apush_in_thread(work, name="kvzip-chat"):
                    text += piece
                    yield delta(text, piece)

            response.achat_stream = achat_stream()
        else:
            def chat_stream():
                text = ""
                for piece in push_in_thread(work, name="kvzip-chat"):
                    text += piece
                    yield delta(text, piece)

            response.chat_stream = chat_stream()
        return response

    def stream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                    ) -> StreamingAgentChatResponse:
        return self._streaming_response(*self._locked_prepare(message, chat_history), asynchronous=False)

    async def astream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                           ) -> StreamingAgentChatResponse:
        question, plan = await run_in_thread(lambda: self._locked_prepare(message, chat_history))
        return self._streaming_response(question, plan, asynchronous=True)
