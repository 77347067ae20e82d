"""Benchmark data, read in place from the shared data folder (never copied into the repository).

- SQuAD v1.1: consecutive paragraphs of an article grouped into one document of a target token length; the
  document's questions are then all answered from one compressed cache (query-agnostic, multi-question).
- Needle in a haystack: Paul Graham essays cut to a token length, the needle sentence inserted at a depth.
- NarrativeQA: story summaries with their questions (two reference answers each).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"

Counter = Callable[[str], int]


@dataclass
class Question:
    id: str
    question: str
    answers: list[str]


@dataclass
class Document:
    id: str
    text: str
    tokens: int
    questions: list[Question] = field(default_factory=list)
    meta: dict = field(default_factory=dict)


def default_data_dir() -> Path:
    """``KVZIP_RAG_DATA`` if set, else ``../shared/data`` beside the project root (or the working directory)."""
    env = os.environ.get("KVZIP_RAG_DATA")
    if env:
        return Path(env).expanduser()
    candidates = [
        Path(__file__).resolve().parents[3] / "shared" / "data",  # checkout: <root>/kvzip_rag/bench/data.py
        Path.cwd().parent / "shared" / "data",
        Path.cwd() / "shared" / "data",
    ]
    return next((c for c in candidates if c.is_dir()), candidates[1])


def load_squad(
    data_dir: Path, count: Counter, docs: int, min_tokens: int, max_tokens: int, questions_per_doc: int,
    first_article: int = 0, exclude: Collection[str] = frozenset(),
) -> list[Document]:
    """One document per article (starting at ``first_article``): its first consecutive paragraphs, joined until
    the document reaches ``min_tokens`` (never above ``max_tokens``). Questions are taken round-robin over the
    document's paragraphs so they cover all of it, skipping the ids in ``exclude`` (e.g. those a calibration was
    fitted on, so a benchmark measures it on held-out questions)."""
    path = data_dir / "squad" / "dev-v1.1-even-articles.json"
    articles = json.loads(path.read_text())["data"]
    out: list[Document] = []
    for article in articles[first_article:]:
        if len(out) >= docs:
            break
        chosen, total = [], 0
        for paragraph in article["paragraphs"]:
            tokens = count(paragraph["context"]) + 1
            if total + tokens > max_tokens:
                break
            chosen.append(paragraph)
            total += tokens
            if total >= min_tokens:
                break
        if total < min_tokens or not chosen:
            continue
        text = "\n\n".join(p["context"] for p in chosen)
        per_paragraph = [[qa for qa in p["qas"] if qa["id"] not in exclude] for p in chosen]
        questions: list[Question] = []
        rank = 0
        while len(questions) < questions_per_doc and any(rank < len(q) for q in per_paragraph):
            for qas in per_paragraph:
                if rank < len(qas) and len(questions) < questions_per_doc:
                    qa = qas[rank]
                    answers = list(dict.fromkeys(a["text"] for a in qa["answers"]))
                    questions.append(Question(qa["id"], qa["question"], answers))
            rank += 1
        out.append(Document(
            id=f"squad:{article['title']}", text=text, tokens=count(text), questions=questions,
            meta={"title": article["title"], "paragraphs": len(chosen)},
        ))
    return out


def load_narrativeqa(data_dir: Path, count: Counter, docs: int, questions_per_doc: int,
                     max_tokens: int) -> list[Document]:
    """The first ``docs`` summaries that fit ``max_tokens``, each with its first ``questions_per_doc`` questions."""
    path = data_dir / "narrativeqa" / "test-summaries-0-49.json"
    out: list[Document] = []
    for item in json.loads(path.read_text()):
        if len(out) >= docs:
            break
        tokens = count(item["summary"])
        if tokens > max_tokens:
            continue
        questions = [
            Question(f"nqa:{item['doc_index']}:{i}", qa["question"], list(qa["answers"]))
            for i, qa in enumerate(item["qas"][:questions_per_doc])
        ]
        out.append(Document(f"narrativeqa:{item['doc_index']}", item["summary"], tokens, questions))
    return out


def essays_text(data_dir: Path) -> str:
    folder = data_dir / "paul_graham_essays"
    files = sorted(folder.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no essays in {folder}")
    return "\n\n".join(f.read_text() for f in files)


def needle_haystack(haystack: str, tokenizer_encode, tokenizer_decode, length: int, depth: float,
                    needle: str = NEEDLE) -> str:
    """A ``length``-token text: the haystack's first tokens with the needle inserted at ``depth`` (0 = start,
    1 = end), moved back to the nearest sentence end so no sentence is cut (as in LLMTest_NeedleInAHaystack)."""
    needle_ids = tokenizer_encode(" " + needle)
    budget = max(length - len(needle_ids), 1)
    hay_ids = tokenizer_encode(haystack[: budget * 8])[:budget]
    if len(hay_ids) < budget:
        raise ValueError(f"the haystack has only {len(hay_ids)} tokens, {budget} needed")
    hay = tokenizer_decode(hay_ids)
    cut = int(len(hay) * depth)
    if 0 < cut < len(hay):
        period = hay.rfind(".", 0, cut)
        cut = period + 1 if period >= 0 else 0
    return hay[:cut] + " " + needle + " " + hay[cut:]
