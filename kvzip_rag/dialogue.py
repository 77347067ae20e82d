"""Conversations over compressed caches, for every interface: history folding, the window check, chat sessions.

Every turn of a chat is routed (:class:`ChatSession`). The first turn is routed as any question; a later one
follows :func:`follow_up_routing`: it stays in the conversation's cache unless its own content words clearly point
to another document. A turn that stays is appended to that cache's tail (:class:`kvzip_rag.Conversation`). When it
moves to another document, the conversation's cache is rebuilt: the new document's cache composed with the
conversation's earlier documents (:func:`kvzip_rag.compose.compose`), and the earlier turns replayed into it
without generating. A given history (LlamaIndex ``chat_history``, LangChain messages) is folded into (question,
answer) turns by :func:`fold_messages` and replayed the same way.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .answers import Citation, grounding_metadata
from .checks import as_list, check_unicode
from .errors import ContextTooLongError, InvalidArgumentError
from .qa import EmptyIndexError, QAService, Routing, Target, check_k, check_question, check_sampling, get_composer
from .language import STOPWORDS, words

if TYPE_CHECKING:
    from .abstain import Assessment, Grounding
    from .cache import PackedCache
    from .generate import Answer, Conversation

_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user", "assistant": "assistant",
          "ai": "assistant", "model": "assistant"}


@dataclass
class Dialogue:
    """A conversation reduced to what the cache layout can hold: answered turns, then the question to answer."""

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
    return Dialogue([(q, a) for q, a in turns[:-1]], turns[-1][0])


def question_tokens(model, question: str, first_turn: bool) -> int:
    """The positions a question's prompt takes in a conversation's cache (``ContextTooLongError`` for one that
    alone exceeds the window)."""
    from .generate import prompt_ids

    return len(prompt_ids(model, question, first_turn))


def check_window(model, cache, question: str, max_new_tokens: int, first_turn: bool, pending: int = 0) -> None:
    """Refuse a turn that would run past the model's positions (documents + earlier turns + question + answer,
    :func:`kvzip_rag.generate.window_room`); ``pending``: tokens of earlier turns still to be replayed into
    ``cache``."""
    from .generate import window_room

    prompt = question_tokens(model, question, first_turn)
    if max_new_tokens > window_room(model, cache, prompt, pending):
        needed = cache.get_seq_length() + pending + prompt + max_new_tokens
        raise ContextTooLongError(
            f"this conversation needs {needed} positions (document {cache.info.base_length}, earlier turns "
            f"{cache.tail_length + pending}, question {prompt}, answer up to {max_new_tokens}) but model "
            f"{model.name!r} takes at most {model.max_positions}; start a new conversation (reset) or lower the "
            "answer length"
        )


# ------------------------------------------------------------------------------------------- follow-up routing

# Words that point back into the conversation instead of naming a topic (full-text search would route on them:
# "he", "there" or "one" match nearly every document), and conversational filler ("tell me more", "give me an
# example", "how much?").
PRONOUNS = frozenset("he him his she her hers it its they them their theirs this these those there".split())
FILLER = frozenset(
    """about again also another anything briefly continue describe detail details elaborate else example examples
    explain expand first further give go happen happened happens interesting last later many me mean meant more
    much next no now ok okay one ones other others please previous really said say second so some something
    summarize tell thanks then thing things third too us yes""".split()
)
# How many times the best other document's full-text score must exceed the conversation's documents' best score
# for a later turn to leave them: turns with content words of their own, and turns that also refer back with a
# pronoun (scored with the previous question's content words added: what the pronoun stands for).
SWITCH_MARGIN = 1.5
REFERRING_MARGIN = 4.0


def turn_words(question: str, documents: Sequence[Target]) -> tuple[list[str], bool]:
    """``(content words, refers back)`` of a later turn: its words less stop words, pronouns and conversational
    filler; whether it holds a pronoun (or ends with "that", which then stands alone for something said: "what
    came after that?"; elsewhere "that" is mostly a conjunction or a relative pronoun)."""
    found = words(question)
    content = list(dict.fromkeys(w for w in found if w not in STOPWORDS and w not in PRONOUNS and w not in FILLER))
    return content, any(w in PRONOUNS for w in found) or found[-1:] == ["that"]


def switches(current: float, other: float, referring: bool) -> bool:
    """Whether a later turn leaves its documents: the best other document's score beats theirs by the margin."""
    return other > (REFERRING_MARGIN if referring else SWITCH_MARGIN) * current


def follow_up_routing(service: QAService, question: str, documents: Sequence[Target], k: int,
                      doc_ids: Sequence[str] | None, previous: str = "") -> Routing | None:
    """A later turn's routing, or ``None`` when it stays in the conversation's ``documents``.

    It stays when it has no content words ("tell me more", "why?", "where was he from?"), when nothing matches
    them, or when the best-matching other document does not beat the conversation's documents by the margin
    (:func:`switches`). A turn with a pronoun is scored with the content words of the ``previous`` question
    added ("what nationality was he?" after "when did Martin Luther die?" asks "nationality martin luther die").
    Otherwise it is routed on that query, as a first turn is on the whole question.
    """
    content, referring = turn_words(question, documents)
    if not content:
        return None
    query = " ".join(dict.fromkeys(content + (turn_words(previous, documents)[0] if referring else [])))
    held = list(dict.fromkeys(t.doc_id for t in documents))
    routing = service.route(query, k + len(documents), doc_ids)
    if routing.fallback:
        return None
    routing = Routing(routing.targets[:k], False, routing.seconds)
    best = routing.targets[0]
    if best.doc_id in held:
        return routing
    current = service.store.search(query, k=1, doc_ids=held)
    return routing if switches(current[0].score if current else 0.0, best.score or 0.0, referring) else None


CACHE_CHANGES = ("new", "kept", "recomposed", "switched")


def cache_change(before: Sequence[Target], after: Sequence[Target]) -> str:
    """How a turn's documents relate to the previous turn's: one of :data:`CACHE_CHANGES`."""
    old, new = {t.node_id for t in before}, {t.node_id for t in after}
    if not old:
        return "new"
    if old == new:
        return "kept"
    return "recomposed" if old & new else "switched"


@dataclass(frozen=True)
class Dropped:
    """A document the conversation's cache no longer holds, and why."""

    target: Target
    reason: str  # "max_documents": the session keeps fewer; "window": it does not fit beside the conversation

    def as_dict(self) -> dict:
        return {"node_id": self.target.node_id, "doc_id": self.target.doc_id, "reason": self.reason}


@dataclass(frozen=True)
class TurnPlan:
    """What a turn answers from, decided by routing alone (no model work), so an interface can show the turn's
    sources before its answer streams."""

    question: str
    # this question's routing, best first: the fallback's first segments if no word matched, the conversation's
    # documents for a follow-up
    routed: list[Target]
    routing: str  # "search", "fallback" or "follow-up" (stays in the conversation's documents, ``routed``)
    documents: list[Target]  # the documents of the turn's cache, most recently routed first
    change: str  # one of CACHE_CHANGES
    dropped: list[Dropped]
    version: int  # the session state it was planned on

    @property
    def fallback(self) -> bool:
        return self.routing == "fallback"


@dataclass
class Turn:
    """One answered turn: the engine's answer, the documents its cache held, figures for response metadata."""

    answer: Answer
    info: dict
    documents: list[Target]  # the turn's sources, most recently routed first
    routed: list[Target]
    change: str  # one of CACHE_CHANGES
    dropped: list[Dropped]
    cached_tokens: int = 0  # documents + earlier turns served from the cache
    replayed_tokens: int = 0  # earlier turns put into the cache for this call
    assessment: Assessment | None = None  # its evidence read out (None: recorded none, ``evidence=False``)
    abstain_text: str = ""  # what ``text`` says when it abstained
    quote: Citation | None = None  # quote mode: the answer snapped to a span of the stored text (kvzip_rag.quote)

    @property
    def abstained(self) -> bool:
        return self.assessment is not None and self.assessment.abstained

    @property
    def text(self) -> str:
        """The answer shown: the abstention when the evidence was too weak (the conversation keeps the generated
        answer, ``answer.text``, as what was said)."""
        return self.abstain_text if self.abstained else self.candidate

    @property
    def citations(self) -> list:
        if self.quote is not None and not self.abstained:
            return [self.quote]
        return list(self.assessment.citations) if self.assessment is not None else []

    @property
    def evidence_score(self) -> float | None:
        return self.assessment.score if self.assessment is not None else None

    @property
    def unsupported_numbers(self) -> tuple[str, ...]:
        """The generated answer's numbers that none of its documents holds (none in quote mode: a quote is the
        documents' own text)."""
        if self.quote is not None or self.assessment is None:
            return ()
        return self.assessment.unsupported_numbers

    @property
    def candidate(self) -> str:
        """The answer abstained or not: the quote in quote mode, else the generated one (as
        :attr:`QAResult.candidate`)."""
        return self.quote.text if self.quote is not None else self.answer.text


def check_history(history: Any) -> list[tuple[str, str]]:
    """A given history: (question, answer) pairs of strings of valid text (an answer may be empty); anything else
    is a one-line ``InvalidArgumentError`` before any routing or model work."""
    pairs = []
    for n, pair in enumerate(as_list(history, "history is a list of (question, answer) pairs")):
        if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(text, str) for text in pair)):
            raise InvalidArgumentError(f"history[{n}] is not a (question, answer) pair of strings: {pair!r:.80}")
        for text in pair:
            check_unicode(text, f"history[{n}]")
        pairs.append((pair[0], pair[1]))
    return pairs


@dataclass
class ChatSession:
    """A conversation over compressed caches that follows its topic: every turn is routed (``k`` segments, within
    ``doc_ids``; see the module docstring).

    The cache holds at most ``max_documents`` documents (at least the ``k`` just routed; 4 is the most composed in
    BENCHMARKS.md); beyond that, and when the model's window cannot hold a document beside the conversation, the
    least recently routed documents are dropped (``Turn.dropped`` says which and why). ``ask(question,
    history=...)``: when no conversation is live, ``history``'s questions are routed in order and its (question,
    answer) pairs replayed into the cache first. ``reset()`` forgets the conversation and its documents.

    With a batching service (``QAService(batching=True)``) the turns of different sessions decode together
    (:meth:`QAService.produce`); a session takes one turn at a time.
    """

    service: QAService
    k: int = 1
    doc_ids: Sequence[str] | None = None
    sampling: dict = field(default_factory=dict)  # answer options by name, grounding ones included (``evidence``...)
    max_documents: int = 4
    compose: str | None = None  # the layout of the conversation's cache (None: the service's; see ``layout``)
    documents: list[Target] = field(default_factory=list)  # those of the live conversation's cache
    conversation: Conversation | None = None
    _version: int = field(default=0, init=False, repr=False)
    _grounding: Grounding | None = field(default=None, init=False, repr=False)
    _busy: bool = field(default=False, init=False, repr=False)  # a turn (or reset) is in flight

    def __post_init__(self) -> None:
        self._idle = threading.Condition(self.service.lock)
        check_k(self.k)
        check_k(self.max_documents, "max_documents")
        if not isinstance(self.sampling, Mapping):
            raise InvalidArgumentError(f"sampling is a dict of answer options by name, got {self.sampling!r:.80}")
        from .abstain import split_grounding

        sampling, self._grounding = split_grounding(self.sampling)
        self.sampling = check_sampling(sampling)
        if self.compose is not None and not hasattr(get_composer(self.compose), "layout"):
            raise InvalidArgumentError(
                f"compose={self.compose!r} answers from separate caches; a conversation continues in one cache: "
                "use compose='parallel' or 'sequential'")

    @property
    def layout(self) -> str:
        """``compose``'s layout, else the service's when its strategy composes caches, else ``parallel`` (a
        conversation continues in one cache, so best-of-k's separate answers have nothing to continue in)."""
        composer = get_composer(self.compose) if self.compose is not None else self.service.composer
        return getattr(composer, "layout", "parallel")

    def reset(self) -> None:
        with self._turn():
            if self.conversation is not None:
                self.conversation.reset()
            self.conversation, self.documents = None, []
            self._version += 1

    def plan(self, question: str, history: Sequence[tuple[str, str]] = ()) -> TurnPlan:
        """Route ``question`` (first ``history``'s questions, in order, when no conversation is live) and decide the
        documents of the turn's cache."""
        question, history = check_question(question, "message"), check_history(history)
        with self.service.lock:
            live = self.conversation is not None
            documents: list[Target] = list(self.documents) if live else []
            dropped: list[Dropped] = []
            previous = self.conversation.turns[-1][0] if live and self.conversation.turns else ""
            for text in ([] if live else [q for q, _ in history if q.strip()]) + [question]:
                routing, previous = self.route_turn(text, documents, previous), text
                if routing is None:
                    routed, how = list(documents), "follow-up"
                    continue
                routed, how = routing.targets, "fallback" if routing.fallback else "search"
                documents, left = self._admit(documents, routed)
                held = {t.node_id for t in documents}
                dropped = [d for d in dropped if d.target.node_id not in held] + left
            if not documents:
                raise EmptyIndexError(f"no segment to answer from in {self.service.describe()}")
            return TurnPlan(question, routed, how, documents,
                            cache_change(self.documents if live else [], documents), dropped, self._version)

    def route_turn(self, question: str, documents: list[Target], previous: str) -> Routing | None:
        """A turn's routing given the conversation's ``documents`` and ``previous`` question so far; ``None``: it
        stays in them."""
        if not documents:
            return self.service.route(question, self.k, self.doc_ids)
        return follow_up_routing(self.service, question, documents, self.k, self.doc_ids, previous)

    def _admit(self, documents: list[Target], targets: list[Target]) -> tuple[list[Target], list[Dropped]]:
        """The documents after one routed question: its targets first, then the earlier ones by recency, at most
        ``max_documents``."""
        new = list(targets)
        fresh = {t.node_id for t in new}
        rest = [t for t in documents if t.node_id not in fresh]
        room = max(self.max_documents - len(new), 0)
        return new + rest[:room], [Dropped(t, "max_documents") for t in rest[room:]]

    def ask(self, question: str, history: Sequence[tuple[str, str]] = (), emit: Callable[[str], None] | None = None,
            plan: TurnPlan | None = None, **sampling: Any) -> Turn:
        """Answer ``question`` from the cache :meth:`plan` decides (a given ``plan`` is used while the session has
        not changed since), passing the answer's pieces to ``emit`` as generated (the candidate: ``Turn.text`` is
        the abstention when its evidence is too weak; in quote mode one piece, the quote, once generated).
        ``sampling``: answer options for this turn, grounding ones (``evidence``, ``abstain_threshold``,
        ``abstain_text``) included."""
        from .abstain import split_grounding
        from .generate import SamplingOptions

        history = check_history(history)
        sampling, grounding = split_grounding(sampling, self._grounding)
        options = {**self.sampling, **check_sampling(sampling)}
        max_new = options.get("max_new_tokens", SamplingOptions.max_new_tokens)
        with self._turn():
            return self._ask(question, history, emit, plan, options, max_new, grounding)

    @contextmanager
    def _turn(self) -> Iterator[None]:
        """One turn of this session at a time: a batched turn lets the service's lock go while it decodes, so a
        second turn (or ``reset``) of the same session waits here, on a condition of that lock (waiting lets the
        lock go too, so the turn in flight and the batch go on)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._busy)
            self._busy = True
            try:
                yield
            finally:
                self._busy = False
                self._idle.notify_all()

    def _ask(self, question: str, history: Sequence[tuple[str, str]], emit: Callable[[str], None] | None,
             plan: TurnPlan | None, options: dict, max_new: int, grounding: Grounding) -> Turn:
        from .abstain import assess
        from .generate import Conversation, SamplingOptions

        service = self.service
        with service.lock:
            if plan is None or plan.version != self._version:
                plan = self.plan(question, history)
            model, question = service.model, plan.question
            info: dict = {"cache_load_s": 0.0, "bytes_loaded": 0, "compose_s": 0.0, "replay_s": 0.0}
            documents, change, dropped, replayed = plan.documents, plan.change, list(plan.dropped), 0
            conversation = self.conversation
            if change != "kept":
                turns = list(conversation.turns) if conversation is not None else list(history)
                cache, documents, overflow = self._cache(documents, turns, question, max_new, info)
                dropped += overflow
                change = cache_change(self.documents if conversation is not None else [], documents)
                conversation = Conversation(model, cache)
                start = time.perf_counter()
                for q, a in turns:
                    replayed += conversation.add_turn(q, a)
                info["replay_s"] = time.perf_counter() - start
            cache = conversation.cache
            check_window(model, cache, question, max_new, not conversation.turns)
            self.conversation, self.documents = conversation, documents
            self._version += 1
            cached = cache.get_seq_length() - replayed
            quoting = SamplingOptions.from_options(options).answer_style == "quote"
            stream = conversation.stream(question, evidence=grounding.evidence, **options)
            # with batching, beside other sessions' turns and answers; a quote is known once the answer is complete
            service.produce(stream, None if quoting else emit)
            result = stream.result
            found = assess(service, question, result, documents, grounding)
            quote = None  # the conversation's cache keeps the generated answer (what the model said)
            if quoting:
                quote = service.quote(question, result.text, documents, found.citations if found else ())
                if quote is not None and emit is not None:
                    emit(quote.text)
            info.update(
                ttft_s=result.time_to_first_token_s, decode_s=result.decode_s, ratio=cache.info.ratio,
                level=cache.info.level, kept_ratio=cache.kept_ratio, cache_bytes=cache.nbytes,
                full_bytes=cache.full_nbytes, answer_tokens=len(result.token_ids), prompt_tokens=result.prompt_tokens,
                finish_reason=result.finish_reason, turns=len(conversation.turns),
                cache_positions=cache.get_seq_length(),
                node_ids=[t.node_id for t in documents], doc_ids=list(dict.fromkeys(t.doc_id for t in documents)),
                routed_node_ids=[t.node_id for t in plan.routed], routing=plan.routing,
                cache_change=change, dropped=[d.as_dict() for d in dropped],
            )
            turn = Turn(result, info, documents, plan.routed, change, dropped, cached, replayed, found,
                        grounding.abstain_text, quote)
            info.update(grounding_metadata(turn))
            return turn

    def _cache(self, documents: list[Target], turns: list[tuple[str, str]], question: str, max_new: int,
               info: dict) -> tuple[PackedCache, list[Target], list[Dropped]]:
        """A cache over ``documents`` with room for ``turns``, the question and its answer: the first document
        (what the question was routed to) must fit, later ones are dropped when they do not."""
        from .compose import compose
        from .generate import turn_ids

        service, model = self.service, self.service.model
        loaded = [service.load(t) for t in documents]
        info.update(cache_load_s=sum(s for _, s, _ in loaded), bytes_loaded=sum(n for _, _, n in loaded))
        caches = [cache for cache, _, _ in loaded]
        pending = sum(len(turn_ids(model, q, a, first_turn=not i)) for i, (q, a) in enumerate(turns))
        check_window(model, caches[0], question, max_new, not turns, pending)
        if len(caches) == 1:
            return caches[0], documents, []
        start = time.perf_counter()
        reserve = pending + question_tokens(model, question, not turns) + max_new
        composed = compose(model, caches, layout=self.layout, reserve=reserve)
        info["compose_s"] = time.perf_counter() - start
        placed = composed.composition
        return (composed, [documents[i] for i in placed.used],
                [Dropped(documents[i], "window") for i in placed.dropped])
