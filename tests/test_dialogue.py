"""Chat sessions follow the topic: every turn is routed; a follow-up about another document composes it into the
conversation's cache (earlier turns replayed), a follow-up that matches nothing stays, and documents that do not fit
are dropped with the reason (tiny random model: answers are gibberish but deterministic)."""

from __future__ import annotations

import pytest
from conftest import service_over

from kvzip_rag.compose import ComposedCache, compose
from kvzip_rag.dialogue import ChatSession, fold_messages, question_tokens
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.generate import Conversation, turn_ids
from kvzip_rag.qa import QAService

DOCS = {  # "apple" is the longest, so a narrowed window can hold "bridge" but not "apple"
    "apple": "Apples ripen in the orchard of Brindle Farm every September. The oldest tree of the orchard was planted "
             "by Mara Venn, who also pressed the first cider of the valley in a wooden press behind the barn, and the "
             "farm still sells that cider at the autumn market beside the church.",
    "bridge": "The Tallow Bridge crosses the river Esk; the town council painted it green in 1990.",
    "bakery": "The bakery on Mill Street opens at six and sells rye bread and cinnamon buns.",
}
APPLE = "Who planted the oldest tree of the orchard?"
BRIDGE = "What colour is the Tallow Bridge?"
BAKERY = "When does the bakery on Mill Street open?"
VAGUE = "xylophone quantum zebra?"  # no word of any document: "tell me more"
SHORT = {"max_new_tokens": 4}


@pytest.fixture(scope="module")
def service(tiny_llama, tmp_path_factory) -> QAService:
    return service_over(tiny_llama, tmp_path_factory.mktemp("dialogue"), DOCS)


def by_hand(service: QAService, doc_ids: list[str]) -> ComposedCache:
    return compose(service.model, [service.load((d, 0))[0] for d in doc_ids], layout="parallel")


def test_a_follow_up_about_another_document_composes_it_into_the_conversation(service):
    session = ChatSession(service, sampling=SHORT)
    first = session.ask(APPLE)
    assert first.change == "new" and first.info["doc_ids"] == ["apple"] and first.info["node_ids"] == ["apple:0"]

    second = session.ask(BRIDGE)
    assert second.info["routed_node_ids"] == ["bridge:0"] and second.info["routing"] == "search"
    assert second.change == second.info["cache_change"] == "recomposed"
    assert second.info["doc_ids"] == ["bridge", "apple"] and second.info["dropped"] == []
    # the turn's cache holds the bridge's tokens (and the apple's), composed as by hand
    cache = session.conversation.cache
    reference = by_hand(service, ["bridge", "apple"])
    bridge_ids = service.load(("bridge", 0))[0].info.input_ids  # the prompt prefix, then the bridge's text
    apple_ids = service.load(("apple", 0))[0].info.input_ids
    assert isinstance(cache, ComposedCache) and cache.composition.used == (0, 1)
    assert cache.info.input_ids == bridge_ids + apple_ids[cache.info.prefix_length:] == reference.info.input_ids
    # the first turn was replayed into it, then the question answered: the same as doing that by hand
    assert second.replayed_tokens == len(turn_ids(service.model, APPLE, first.answer.text, first_turn=True))
    assert second.cached_tokens == reference.info.base_length
    conversation = Conversation(service.model, reference)
    conversation.add_turn(APPLE, first.answer.text)
    assert conversation.ask(BRIDGE, **SHORT).text == second.answer.text
    assert session.conversation.turns == [(APPLE, first.answer.text), (BRIDGE, second.answer.text)]


def test_follow_ups_on_the_same_documents_or_on_nothing_stay_in_the_cache(service):
    session = ChatSession(service, sampling=SHORT)
    session.ask(APPLE)
    session.ask(BRIDGE)
    cache = session.conversation.cache
    vague = session.ask(VAGUE)
    assert vague.info["routing"] == "follow-up" and vague.change == "kept"
    assert vague.info["doc_ids"] == ["bridge", "apple"] and vague.replayed_tokens == 0
    assert session.conversation.cache is cache and len(session.conversation.turns) == 3
    again = session.ask("When was the apple tree planted in the orchard?")
    assert again.change == "kept" and session.conversation.cache is cache
    assert again.info["doc_ids"] == ["apple", "bridge"]  # most recently routed first
    session.reset()
    assert session.conversation is None and session.documents == []
    fresh = session.ask(VAGUE)  # nothing to follow: the fallback's first segment, flagged
    assert fresh.change == "new" and fresh.info["routing"] == "fallback" and len(fresh.documents) == 1


def test_the_least_recently_routed_document_is_dropped_beyond_max_documents(service):
    session = ChatSession(service, sampling=SHORT, max_documents=2)
    session.ask(APPLE)
    session.ask(BRIDGE)
    third = session.ask(BAKERY)
    assert third.info["doc_ids"] == ["bakery", "bridge"] and third.change == "recomposed"
    assert third.info["dropped"] == [{"node_id": "apple:0", "doc_id": "apple", "reason": "max_documents"}]
    assert session.conversation.cache.info.input_ids == by_hand(service, ["bakery", "bridge"]).info.input_ids
    assert len(session.conversation.turns) == 3  # every earlier turn was replayed


def test_a_window_overflow_drops_the_older_document(service, monkeypatch):
    """Narrow the model's window after the first turn so that the new, short document fits beside the
    conversation and the older, longer one does not: the conversation switches, and says why."""
    session = ChatSession(service, sampling=SHORT)
    first = session.ask(APPLE)
    model = service.model
    bridge = service.load(("bridge", 0))[0].info.base_length
    apple = service.load(("apple", 0))[0].info.base_length
    assert apple > bridge
    room = (bridge + len(turn_ids(model, APPLE, first.answer.text, first_turn=True))
            + question_tokens(model, BRIDGE, first_turn=False) + SHORT["max_new_tokens"])
    monkeypatch.setattr(model.config, "max_position_embeddings", room)
    second = session.ask(BRIDGE)
    assert second.change == "switched" and second.info["doc_ids"] == ["bridge"]
    assert second.info["dropped"] == [{"node_id": "apple:0", "doc_id": "apple", "reason": "window"}]
    assert session.conversation.turns[0] == (APPLE, first.answer.text)  # replayed into the bridge's cache
    assert session.conversation.cache.get_seq_length() <= room


def test_a_given_history_is_routed_turn_by_turn(service):
    dialogue = fold_messages([("user", APPLE), ("assistant", "Mara Venn."), ("user", BRIDGE)])
    session = ChatSession(service, sampling=SHORT)
    plan = session.plan(dialogue.question, dialogue.turns)
    assert [t.node_id for t in plan.documents] == ["bridge:0", "apple:0"] and plan.change == "new"
    turn = session.ask(dialogue.question, history=dialogue.turns, plan=plan)
    assert turn.info["doc_ids"] == ["bridge", "apple"] and turn.replayed_tokens > 0
    assert session.conversation.turns[0] == (APPLE, "Mara Venn.")
    conversation = Conversation(service.model, by_hand(service, ["bridge", "apple"]))
    conversation.add_turn(APPLE, "Mara Venn.")
    assert conversation.ask(BRIDGE, **SHORT).text == turn.answer.text


@pytest.mark.parametrize("history", [3, "Who?", [(1, 2)], [(APPLE,)], [(APPLE, "Mara", "Venn")], [(APPLE, "\ud800")]],
                         ids=["int", "string", "ints", "single", "triple", "surrogate"])
def test_a_malformed_history_or_sampling_is_a_one_line_error_before_any_work(service, history):
    session = ChatSession(service, sampling=SHORT)
    with pytest.raises(InvalidArgumentError, match=r"history") as caught:
        session.ask(BRIDGE, history=history)
    assert "\n" not in str(caught.value) and session.conversation is None
    with pytest.raises(InvalidArgumentError, match="history"):
        session.plan(BRIDGE, history)
    with pytest.raises(InvalidArgumentError, match="sampling is a dict"):
        ChatSession(service, sampling=[("max_new_tokens", 4)])
    turn = session.ask(BRIDGE, history=[[APPLE, ""]])  # lists for pairs, an empty answer: fine
    assert session.conversation.turns[0] == (APPLE, "") and turn.info["doc_ids"]
