"""Follow-ups stay on topic: a later chat turn stays in the conversation's cache unless its own content words
clearly point to another document (tiny random model, real SQLite store); the scripted conversations of the
benchmark resolve in the shared data."""

from __future__ import annotations

import json

import pytest

from conftest import service_over, DATA_DIR

from kvzip_rag import dialogue
from kvzip_rag.bench.conversations import CONVERSATION_SETS, KINDS, conversation_documents, load_conversations
from kvzip_rag.dialogue import REFERRING_MARGIN, SWITCH_MARGIN, ChatSession, switches, turn_words
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAService, Target

# "she", "more", "why", "second" and "one" are in the bakery's text: routing a follow-up on them lands there
DOCS = {
    "harbour": "Old Tom Birch built the harbour wall of Wrenfield in 1820 from granite quarried at Kell Point.",
    "bakery": "The bakery on Mill Street opens at six. Its owner says she learned baking in Lyon; one more loaf of "
              "rye bread is baked for the market every Friday, and nobody knows why the second oven is never lit.",
    "bridge": "The Tallow Bridge crosses the river Esk; the town council painted it green in 1990.",
}
SHORT = {"max_new_tokens": 3}


@pytest.fixture(scope="module")
def service(tiny_llama, tmp_path_factory) -> QAService:
    return service_over(tiny_llama, tmp_path_factory.mktemp("followups"), DOCS)


def chat_about_the_harbour(service: QAService) -> ChatSession:
    session = ChatSession(service, sampling=SHORT)
    assert session.ask("Who built the harbour wall of Wrenfield?").info["doc_ids"] == ["harbour"]
    return session


@pytest.mark.parametrize("question", ["Where was she from?", "Tell me more.", "Why?", "And the second one?"])
def test_a_follow_up_without_content_words_stays(service, question):
    session = chat_about_the_harbour(service)
    assert service.route(question).targets[0].doc_id == "bakery"  # what routing it on its own words would do
    cache = session.conversation.cache
    turn = session.ask(question)
    assert turn.info["routing"] == "follow-up" and turn.change == "kept" and turn.info["doc_ids"] == ["harbour"]
    assert turn.info["routed_node_ids"] == ["harbour:0"] and session.conversation.cache is cache


def test_a_pronoun_follow_up_with_words_of_its_own_stays_unless_they_point_elsewhere(service):
    session = chat_about_the_harbour(service)
    stays = session.ask("When did he build it from granite?")
    assert stays.change == "kept" and stays.info["doc_ids"] == ["harbour"]
    moved = session.plan("Did she learn baking in Lyon before the bakery on Mill Street opened?")
    assert moved.routing == "search" and moved.documents[0].doc_id == "bakery"


def test_a_clearly_different_topic_switches(service):
    session = chat_about_the_harbour(service)
    turn = session.ask("What colour did the town council paint the Tallow Bridge?")
    assert turn.info["routing"] == "search" and turn.change == "recomposed"
    assert turn.info["doc_ids"] == ["bridge", "harbour"] and turn.info["routed_node_ids"] == ["bridge:0"]


def test_the_first_turn_routes_as_any_question(service):
    plan = ChatSession(service).plan("Tell me more about the bakery")
    assert plan.routing == "search" and plan.change == "new" and plan.documents[0].doc_id == "bakery"
    unmatched = ChatSession(service).plan("xylophone quantum zebra?")
    assert unmatched.routing == "fallback" and unmatched.fallback and unmatched.change == "new"


def test_a_given_history_is_followed_as_a_live_conversation(service):
    plan = ChatSession(service).plan("Where was she from?", [("Who built the harbour wall?", "Tom Birch.")])
    assert plan.routing == "follow-up" and [t.doc_id for t in plan.documents] == ["harbour"]


def test_the_margin_rule_at_its_boundary():
    assert not switches(1.0, SWITCH_MARGIN, referring=False)
    assert switches(1.0, SWITCH_MARGIN + 1e-9, referring=False)
    assert not switches(1.0, REFERRING_MARGIN, referring=True)
    assert switches(1.0, REFERRING_MARGIN + 1e-9, referring=True)
    assert switches(0.0, 1e-9, referring=True) and not switches(0.0, 0.0, referring=False)


def test_turn_words_drop_filler_and_see_pronouns():
    harbour = [Target("harbour", 0)]
    assert turn_words("Tell me more, why?", harbour) == ([], False)
    assert turn_words("Where was he from?", harbour) == ([], True)
    assert turn_words("And the second one? Give me an example.", harbour) == ([], False)
    assert turn_words("Who repaired its wall?", harbour) == (["repaired", "wall"], True)
    assert turn_words("What does the bakery sell?", harbour) == (["bakery", "sell"], False)
    # "that" ending a question stands for what was said (a scripted follow-up left for Martin Luther on "came
    # after"); inside one it is a conjunction or relative pronoun
    assert turn_words("What came after that?", harbour) == (["came", "after"], True)
    assert turn_words("Who owns the bakery that sells rye?", harbour) == (["owns", "bakery", "sells", "rye"], False)


def test_a_pronoun_is_scored_with_the_previous_question(service):
    """"When was it baked?" after a question about the harbour wall stays there: "it" stands for the wall."""
    held = [service.route("Who built the harbour wall of Wrenfield?").targets[0]]
    kept = dialogue.follow_up_routing(service, "When was it baked?", held, 1, None,
                                      previous="Who built the harbour wall of Wrenfield?")
    assert kept is None or kept.targets[0].doc_id == "harbour"  # "baked built harbour wall wrenfield"
    moved = dialogue.follow_up_routing(service, "When was it baked?", held, 1, None)
    assert moved is not None and moved.targets[0].doc_id == "bakery"  # "baked" alone: only the bakery matches


def test_the_margin_decides_a_real_turn(service, monkeypatch):
    """The same turn stays or switches as the margin moves across its score ratio."""
    question = "Who built the bakery on Mill Street?"
    held = [service.route("Who built the harbour wall of Wrenfield?").targets[0]]
    query = "built bakery mill street"
    bakery = service.store.search(query, k=1, doc_ids=["bakery"])[0].score
    harbour = service.store.search(query, k=1, doc_ids=["harbour"])[0].score
    assert turn_words(question, held) == (query.split(), False)
    monkeypatch.setattr(dialogue, "SWITCH_MARGIN", bakery / harbour * 1.001)
    assert dialogue.follow_up_routing(service, question, held, 1, None) is None
    monkeypatch.setattr(dialogue, "SWITCH_MARGIN", bakery / harbour * 0.999)
    assert dialogue.follow_up_routing(service, question, held, 1, None).targets[0].doc_id == "bakery"


needs_squad = pytest.mark.skipif(not (DATA_DIR / "squad").is_dir(), reason=f"SQuAD data not found at {DATA_DIR}")


@needs_squad
@pytest.mark.parametrize("conversation_set", CONVERSATION_SETS)
def test_the_scripted_conversations_load_and_every_label_resolves(conversation_set):
    scripts, header = load_conversations(conversation_set)
    turns = [t for s in scripts for t in s.turns]
    assert len(scripts) >= 30 and all(2 <= len(s.turns) <= 4 for s in scripts) and len(turns) >= 120
    assert {t.kind for t in turns} == set(KINDS) and sum(t.kind == "switch" for t in turns) >= 30
    documents = conversation_documents(scripts, header, DATA_DIR)
    assert {t.doc_id for t in turns} <= set(documents)
    assert all(text.strip() and meta["title"] for text, meta in documents.values())


@needs_squad
def test_the_held_out_set_asks_other_paragraphs_of_a_store_that_holds_the_dev_set_ones():
    dev, dev_header = load_conversations("dev")
    heldout, header = load_conversations("heldout")
    labels = {t.doc_id for s in heldout for t in s.turns}
    assert all(int(label.rsplit("/", 1)[1]) >= dev_header["paragraphs_per_article"] for label in labels)
    assert not {s.turns[0].question for s in heldout} & {t.question for s in dev for t in s.turns}
    documents = conversation_documents(heldout, header, DATA_DIR)
    assert set(documents) >= set(conversation_documents(dev, dev_header, DATA_DIR))  # the dev ones distract
    assert len(documents) == 24 * header["paragraphs_per_article"] == 96


def test_a_conversation_file_is_checked_as_it_loads(tmp_path):
    with pytest.raises(InvalidArgumentError, match="unknown conversation set 'test'"):
        load_conversations("test")
    beyond = {"data": "squad/x.json", "paragraphs_per_article": 2, "conversations": [
        {"id": "x", "turns": [{"question": "Who?", "title": "T", "paragraph": 2}]}]}
    (tmp_path / "c.json").write_text(json.dumps(beyond))
    with pytest.raises(InvalidArgumentError, match="paragraph 2 is beyond the 2 stored"):
        load_conversations(path=tmp_path / "c.json")


@needs_squad
def test_the_conversation_benchmark_reports_each_routing(tiny_llama, tmp_path):
    from kvzip_rag.bench.conversations import conversation_figures, markdown

    with pytest.raises(InvalidArgumentError, match="unknown routing"):
        conversation_figures(tiny_llama, tmp_path, routings=("bogus",))
    result = conversation_figures(tiny_llama, tmp_path, limit=1, data_dir=DATA_DIR, max_new_tokens=2)
    turns = len(load_conversations()[0][0].turns)
    assert len(result["rows"]) == 2 * turns and result["documents"] == 2
    for routing in ("search-every-turn", "follow-up"):
        mine = [r for r in result["rows"] if r["routing"] == routing]
        summary = result["summary"][routing]
        assert summary["all"]["n"] == turns and summary["all"]["share"] == sum(r["on_label"] for r in mine) / turns
        assert summary["repeats_previous"]["n"] == turns - 1
    assert "| follow-up |" in markdown(result)


@needs_squad
def test_routing_only_plans_the_turns_a_live_chat_answers_from(tiny_llama, tmp_path):
    """The bench task's routing-only mode (held-out set, through the preset): every turn lands on the documents a
    live session answers it from, and no answer figure is made up."""
    from kvzip_rag.bench.conversations import conversation_figures
    from kvzip_rag.bench.presets import get_preset
    from kvzip_rag.bench.tasks import TASKS, Context

    preset = get_preset("quick", conversations_set="heldout", conversations_routing_only=True)
    context = Context(preset, DATA_DIR, tmp_path / "planned", loaded_model=tiny_llama, log=lambda m: None, limit=1)
    planned = TASKS["conversations"].run(context)
    script = load_conversations("heldout")[0][0]
    assert planned["set"] == "heldout" and planned["routing_only"] and planned["turns"] == len(script.turns)
    assert planned["documents"] == 4  # paragraphs 0-3 of the conversation's article
    assert (tmp_path / "planned" / "conversations.json").is_file()
    assert "routing only" in (tmp_path / "planned" / "conversations.md").read_text()
    live = conversation_figures(tiny_llama, tmp_path / "live", limit=1, data_dir=DATA_DIR, max_new_tokens=2,
                                conversation_set="heldout")

    def routed(result: dict) -> list[tuple]:
        return [(r["routing"], r["turn"], r["held"], r["turn_routing"], r["on_label"]) for r in result["rows"]]

    assert routed(planned) == routed(live) and len(routed(live)) == 2 * len(script.turns)
    assert all(r["answer"] is None for r in planned["rows"]) and all(r["answer"] is not None for r in live["rows"])
    for routing, summary in planned["summary"].items():
        on_label = [r["on_label"] for r in planned["rows"] if r["routing"] == routing]
        assert summary["all"]["share"] == sum(on_label) / len(on_label)
        assert summary["repeats_previous"]["n"] == 0 and live["summary"][routing]["repeats_previous"]["n"] > 0
