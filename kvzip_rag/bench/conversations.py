"""``kvzip-rag bench --task conversations``: do chat turns answer from the document they need?

Scripted multi-turn conversations (package data, :data:`CONVERSATION_SETS`) name, for every turn, the SQuAD paragraph
it needs; their text is read from the shared data (never copied). Two sets: ``dev`` (``conversations.json``), on which
the follow-up routing's margins were chosen, and ``heldout`` (``conversations_heldout.json``), written after that from
other paragraphs, so its figure is out of sample. A store of the conversations' articles (their first
``paragraphs_per_article`` paragraphs, one document each, ratio 0.3) answers every conversation through
:class:`kvzip_rag.dialogue.ChatSession`, twice: with its follow-up routing, and with every turn routed on its own
words as before issue 23 (``search-every-turn``). A turn is *on its document* when the document its answer came
from (the turn's first document: the one routed to, or the one a follow-up stayed in) is the labelled one; shares
come with 95% Wilson intervals, for first turns, follow-ups (same document as the previous turn) and switches.
``routing_only``: every turn is planned (:meth:`ChatSession.plan`, given the conversation's earlier questions) and no
answer is generated; routing reads only the questions, so the shares are those of the full run, in seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvzip_rag.dialogue import ChatSession
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAService, Routing, Target

from .data import default_data_dir
from .metrics import normalize_answer, share_interval

RATIO = 0.3
KINDS = ("first", "follow-up", "switch")
ROUTINGS = ("search-every-turn", "follow-up")
CONVERSATION_SETS = {"dev": "conversations.json", "heldout": "conversations_heldout.json"}


@dataclass(frozen=True)
class ScriptedTurn:
    question: str
    doc_id: str  # "<article title>/<paragraph index>", a document of the benchmark store
    kind: str  # one of KINDS: the first turn, the previous turn's document again, another document


@dataclass(frozen=True)
class Script:
    id: str
    turns: list[ScriptedTurn]


def doc_id(title: str, paragraph: int) -> str:
    return f"{title}/{paragraph}"


def load_conversations(conversation_set: str = "dev", path: Path | None = None) -> tuple[list[Script], dict]:
    """The scripted conversations of a packaged set (of :data:`CONVERSATION_SETS`), or of the file at ``path``, and
    the file's header (``data``, ``paragraphs_per_article``)."""
    if path is None and conversation_set not in CONVERSATION_SETS:
        raise InvalidArgumentError(f"unknown conversation set {conversation_set!r}; use "
                                   f"{', '.join(CONVERSATION_SETS)}")
    raw = json.loads(Path(path).read_text() if path else
                     resources.files("kvzip_rag.bench").joinpath(CONVERSATION_SETS[conversation_set]).read_text())
    scripts = []
    for item in raw["conversations"]:
        turns, previous = [], None
        for turn in item["turns"]:
            if turn["paragraph"] >= raw["paragraphs_per_article"]:
                raise InvalidArgumentError(f"conversation {item['id']}: paragraph {turn['paragraph']} is beyond "
                                           f"the {raw['paragraphs_per_article']} stored per article")
            label = doc_id(turn["title"], turn["paragraph"])
            kind = "first" if previous is None else "follow-up" if label == previous else "switch"
            turns.append(ScriptedTurn(turn["question"], label, kind))
            previous = label
        scripts.append(Script(item["id"], turns))
    return scripts, {k: v for k, v in raw.items() if k != "conversations"}


def conversation_documents(scripts: list[Script], header: dict, data_dir: Path) -> dict[str, tuple[str, dict]]:
    """``doc_id -> (text, metadata)``: the first paragraphs of every article the conversations name."""
    articles = {a["title"]: a for a in json.loads((data_dir / header["data"]).read_text())["data"]}
    titles = dict.fromkeys(t.doc_id.rsplit("/", 1)[0] for s in scripts for t in s.turns)
    missing = [t for t in titles if t not in articles]
    if missing:
        raise InvalidArgumentError(f"no article {', '.join(missing)} in {data_dir / header['data']}")
    return {doc_id(title, i): (paragraph["context"], {"title": title.replace("_", " "), "paragraph": i})
            for title in titles
            for i, paragraph in enumerate(articles[title]["paragraphs"][: header["paragraphs_per_article"]])}


class SearchEveryTurn(ChatSession):
    """The routing before issue 23: every turn routed on its own words; one that matches no word stays."""

    def route_turn(self, question: str, documents: list[Target], previous: str) -> Routing | None:
        routing = self.service.route(question, self.k, self.doc_ids)
        return None if documents and routing.fallback else routing


def share(hits: list[bool]) -> dict:
    interval = share_interval(sum(hits), len(hits))
    return {"n": len(hits), "share": interval and interval[0], "low": interval and interval[1],
            "high": interval and interval[2]}


def conversation_figures(model, work_dir: Path, limit: int | None = None, *, data_dir: Path | None = None,
                         max_new_tokens: int = 32, routings: tuple[str, ...] = ROUTINGS,
                         conversation_set: str = "dev", routing_only: bool = False,
                         log: Callable[[str], None] | None = None) -> dict:
    """Run the first ``limit`` conversations (all: ``None``) of ``conversation_set`` under each of ``routings`` (of
    :data:`ROUTINGS`), answering every turn or (``routing_only``) planning it; per-turn rows and shares."""
    from kvzip_rag.store import CacheStore

    unknown = set(routings) - set(ROUTINGS)
    if unknown:
        raise InvalidArgumentError(f"unknown routing(s) {', '.join(sorted(unknown))}; use {', '.join(ROUTINGS)}")
    log = log or (lambda message: None)
    scripts, header = load_conversations(conversation_set)
    scripts = scripts[:limit] if limit is not None else scripts
    documents = conversation_documents(scripts, header, Path(data_dir) if data_dir else default_data_dir())
    store = CacheStore(Path(work_dir) / "conversations-store")
    start = time.perf_counter()
    for i, (name, (text, meta)) in enumerate(documents.items()):
        store.add_document(model, text, doc_id=name, metadata=meta, ratio=RATIO)
        log(f"conversations: stored {i + 1}/{len(documents)} documents")
    service = QAService(store, model, ratio=RATIO)
    rows = []
    for routing, session_type in zip(ROUTINGS, (SearchEveryTurn, ChatSession)):
        if routing not in routings:
            continue
        for script in scripts:
            session, previous, asked = session_type(service, sampling={"max_new_tokens": max_new_tokens}), None, []
            for index, turn in enumerate(script.turns):
                if routing_only:  # the plan a live session makes: the earlier questions routed in order, then this
                    plan = session.plan(turn.question, [(q, "") for q in asked])
                    held, how, answer = [t.doc_id for t in plan.documents], plan.routing, None
                else:
                    turn_answer = session.ask(turn.question)
                    held = [t.doc_id for t in turn_answer.documents]
                    how, answer = turn_answer.info["routing"], turn_answer.answer.text
                text = None if answer is None else normalize_answer(answer)
                rows.append({"routing": routing, "conversation": script.id, "turn": index, "kind": turn.kind,
                             "question": turn.question, "label": turn.doc_id, "answered_from": held[0],
                             "held": held, "turn_routing": how, "answer": answer,
                             "on_label": held[0] == turn.doc_id, "label_held": turn.doc_id in held,
                             "repeats_previous": None if text is None else bool(text) and text == previous})
                previous = text
                asked.append(turn.question)
            log(f"conversations: {routing} {script.id} done")
    summary = {routing: {kind: share([r["on_label"] for r in rows if r["routing"] == routing
                                      and kind in ("all", r["kind"])]) for kind in ("all", *KINDS)}
               for routing in routings}
    for routing in routings:
        mine = [r for r in rows if r["routing"] == routing]
        summary[routing]["label_held"] = share([r["label_held"] for r in mine])
        summary[routing]["repeats_previous"] = share([r["repeats_previous"] for r in mine
                                                      if r["turn"] > 0 and r["repeats_previous"] is not None])
    return {"model": model.name, "ratio": RATIO, "max_new_tokens": max_new_tokens, "set": conversation_set,
            "routing_only": routing_only, "turns": sum(len(s.turns) for s in scripts), "conversations": len(scripts),
            "documents": len(documents), "seconds": time.perf_counter() - start, "summary": summary, "rows": rows}


def markdown(result: dict) -> str:
    """The figures as a Markdown section (BENCHMARKS.md's "Conversations")."""
    def cell(s: dict) -> str:
        return "-" if s["share"] is None else f"{s['share']:.1%} ({s['low']:.1%}-{s['high']:.1%}), n={s['n']}"

    answers = ("routing only (turns planned, no answer generated)" if result["routing_only"] else
               f"answers up to {result['max_new_tokens']} tokens")
    lines = [f"Model `{result['model']}`, ratio {result['ratio']:g}, set `{result['set']}`: {result['conversations']} "
             f"conversations ({result['turns']} turns) over {result['documents']} documents, {answers}; 95% Wilson "
             "intervals.", "",
             "| routing | on the labelled document | first turns | follow-ups | switches | labelled document in "
             "the cache | answer repeats the previous one |", "|---|---|---|---|---|---|---|"]
    for routing, s in result["summary"].items():
        lines.append(f"| {routing} | {cell(s['all'])} | {cell(s['first'])} | {cell(s['follow-up'])} | "
                     f"{cell(s['switch'])} | {cell(s['label_held'])} | {cell(s['repeats_previous'])} |")
    return "\n".join(lines) + "\n"
