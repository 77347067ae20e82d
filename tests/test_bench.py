"""The benchmark: metric definitions, the ratio shortcut it relies on, and a smoke run of every task and method on
a tiny random-weight Llama with tiny data made here (outputs checked for shape, never for timings)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kvzip_rag
from kvzip_rag.bench import measure, metrics
from kvzip_rag.bench.cli import run_bench
from kvzip_rag.bench.data import NEEDLE, needle_haystack
from kvzip_rag.bench.runner import PreparedDocument, Variant, cut, variant_grid

PARAGRAPHS = [
    "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. It has two breakwaters, the northern one "
    "made of granite and the southern one of basalt.",
    "Ferries leave for the island of Tessin every morning at seven. The crossing takes forty minutes in calm weather.",
    "The lighthouse at the end of the northern breakwater is painted red and white, and its lamp can be seen from "
    "eighteen nautical miles away.",
    "Every August the town holds a regatta in which fishing boats race around the harbour, and the winner receives "
    "a silver anchor.",
]
QUESTIONS = [
    ("Who built the harbour of Velmora?", "Ansel Brask"),
    ("When do ferries leave for Tessin?", "every morning at seven"),
    ("What colour is the lighthouse?", "red and white"),
    ("What does the regatta winner receive?", "a silver anchor"),
]


# ---------------------------------------------------------------------------------------------- metrics

def test_normalize_answer_follows_squad():
    assert metrics.normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert metrics.normalize_answer("an apple, a pear & the plum.") == "apple pear plum"
    assert metrics.normalize_answer("Theory of the mind") == "theory of mind"  # only whole-word articles go
    assert metrics.normalize_answer("  ") == ""


def test_exact_match_and_f1():
    assert metrics.exact_match("the Denver Broncos.", "Denver Broncos") == 1.0
    assert metrics.exact_match("Denver", "Denver Broncos") == 0.0
    assert metrics.f1_score("Denver Broncos", "Denver Broncos") == 1.0
    assert metrics.f1_score("Denver", "Denver Broncos") == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert metrics.f1_score("the team was the Denver Broncos", "Denver Broncos") == pytest.approx(
        2 * (2 / 4) * 1.0 / (2 / 4 + 1.0))
    assert metrics.f1_score("Carolina Panthers", "Denver Broncos") == 0.0
    assert metrics.f1_score("", "") == 1.0 and metrics.f1_score("a", "Broncos") == 0.0  # "a" normalises to empty
    assert metrics.f1_score("broncos broncos", "broncos") == pytest.approx(2 * 0.5 * 1.0 / 1.5)  # counts, not sets


def test_contains_best_over_and_needle():
    assert metrics.contains_gold("It was the Denver Broncos, in 2016.", "Denver Broncos") == 1.0
    assert metrics.contains_gold("Denverite", "Denver") == 0.0  # whole tokens only
    assert metrics.best_over(metrics.f1_score, "Denver", ["Carolina", "Denver"]) == 1.0
    assert metrics.needle_hit("Eat a Sandwich in the park") == 1.0
    assert metrics.needle_hit("Sit in Dolores Park.") == 1.0
    assert metrics.needle_hit("Visit the Golden Gate Bridge.") == 0.0
    assert metrics.ratio(1.0, 0.0) is None and metrics.ratio(1.0, 2.0) == 0.5
    assert metrics.mean([]) is None and metrics.stderr([1.0]) is None


def test_needle_is_inserted_at_a_sentence_boundary(smol_tokenizer):
    hay = " ".join(f"Sentence number {i} talks about startups." for i in range(200))
    encode = lambda s: smol_tokenizer(s, add_special_tokens=False)["input_ids"]
    text = needle_haystack(hay, encode, smol_tokenizer.decode, 300, 0.5)
    assert NEEDLE in text
    before = text.split(NEEDLE)[0].rstrip()
    assert before.endswith(".")
    assert abs(len(encode(text)) - 300) < 10
    assert 0.3 < len(before) / len(text) < 0.7


# ---------------------------------------------------------------------------------------------- the ratio shortcut

@pytest.mark.parametrize("scorer,level", [("kvzip", "pair"), ("kvzip", "uniform"), ("snapkv", "uniform"),
                                          ("keynorm", "pair"), ("kvzip", "head")])
def test_cut_from_ratio_one_equals_compress(tiny_llama, scorer, level):
    """The benchmark scores once at ratio 1.0 and cuts lower ratios; that must be what compress() gives."""
    text = " ".join(PARAGRAPHS)
    prep = PreparedDocument(tiny_llama, text)
    source = "kvzip-head" if level == "head" else scorer
    base, _ = prep.base(source)
    mine = cut(base, Variant("x", source, level, 0.3))
    direct = kvzip_rag.compress(tiny_llama, text, ratio=0.3, level=level, scorer=scorer)
    assert mine.nbytes == direct.nbytes
    for a, b in zip(mine.layers, direct.layers):
        assert torch.equal(a.offsets, b.offsets)
        assert torch.equal(a.positions, b.positions)
        assert torch.allclose(a.keys, b.keys)


def test_dense_and_packed_answers_share_one_decode_loop(tiny_llama):
    """The re-prefill baseline decodes through the package's decode loop with the packed answers' options (an answer
    ends where it repeats itself, in both): over a full cache of the same document both give the same answers,
    lengths and gold NLLs."""
    doc = PreparedDocument(tiny_llama, " ".join(PARAGRAPHS))
    cache, _ = doc.base("full")
    for question, gold in QUESTIONS:
        packed = measure.packed_answer(tiny_llama, cache, question, 64, gold=gold)
        dense = measure.dense_answer(tiny_llama, doc.ids + measure.question_ids(tiny_llama, question), 64, gold=gold)
        assert (dense.text, dense.tokens) == (packed.text, packed.tokens), question
        assert dense.nll == pytest.approx(packed.nll, rel=1e-3)


def test_variant_grid_names():
    grid = variant_grid((0.1, 0.3), ("pair", "uniform", "head"), ("snapkv", "random"), "uniform", (0.5,))
    names = [v.name for v in grid]
    assert names[0] == "full" and len(names) == len(set(names))
    assert {"kvzip-pair@0.1", "kvzip-uniform@0.3", "kvzip-head@0.3", "kvzip-pair@0.5", "snapkv@0.3",
            "random@0.1"} <= set(names)
    assert {v.source for v in grid} == {"full", "kvzip", "kvzip-head", "snapkv", "random"}


# ---------------------------------------------------------------------------------------------- smoke run

@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "squad").mkdir(parents=True)
    articles = []
    for a in range(2):
        paragraphs = []
        for p, text in enumerate(PARAGRAPHS):
            q, ans = QUESTIONS[p]
            paragraphs.append({"context": text, "qas": [
                {"id": f"a{a}p{p}", "question": q, "answers": [{"text": ans, "answer_start": 0}]}]})
        articles.append({"title": f"Article_{a}", "paragraphs": paragraphs})
    (root / "squad" / "dev-v1.1-even-articles.json").write_text(json.dumps({"data": articles}))
    (root / "paul_graham_essays").mkdir()
    essay = " ".join(f"Essay sentence {i} says that startups should make something people want." for i in range(120))
    for name in ("one", "two"):
        (root / "paul_graham_essays" / f"{name}.txt").write_text(essay)
    (root / "narrativeqa").mkdir()
    (root / "narrativeqa" / "test-summaries-0-49.json").write_text(json.dumps([
        {"doc_index": 0, "summary": " ".join(PARAGRAPHS),
         "qas": [{"question": q, "answers": [a, a.upper()]} for q, a in QUESTIONS[:2]]}]))
    return root


def test_smoke_run_writes_json_markdown_and_plots(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "out"
    overrides = dict(
        squad_docs=2, squad_min_tokens=60, squad_max_tokens=400, squad_questions=2, ratios=(0.3, 0.5),
        needle_cases=((200, 0.5), (400, 0.2), (400, 0.8), (9000, 0.5)), needle_ratios=(0.3,), needle_extra_ratios=(0.1,),
        nqa_docs=1, nqa_questions=2, nqa_ratios=(0.3,), ttft_length=400, decode_steps=2, ttft_repeats=1,
        max_new_tokens=4, needle_max_new_tokens=4, chunk_tokens=40, chunk_overlap=0, top_k=2,
    )
    results = run_bench("quick", data_dir=tiny_data, out_dir=out, loaded_model=tiny_llama, embedding="hashing",
                        preset_overrides=overrides, log=lambda message: None)

    for name in ("results.json", "results.md", "squad_quality.png", "needle.png", "decode_latency.png", "ttft.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "squad_quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((out / "results.json").read_text())
    assert set(stored) >= {"meta", "summary", "rows", "documents", "variants", "indexing", "decode", "ttft", "disk"}
    assert stored["meta"]["machine"]["nproc"] >= 1 and stored["meta"]["skipped"] == {}

    quality = stored["summary"]["quality"]
    assert set(quality) == {"squad", "needle", "narrativeqa"}
    squad = quality["squad"]
    expected = {"full", "reprefill", "chunk-rag", "kvzip-pair@0.3", "kvzip-uniform@0.5", "kvzip-head@0.3",
                "snapkv@0.3", "h2o@0.5", "keynorm@0.3", "random@0.5"}
    assert expected <= set(squad)
    for method in expected:
        entry = squad[method]
        assert entry["n"] == 4  # 2 documents x 2 questions, every method the same questions
        for key in ("em", "f1", "contains", "nll", "agree_f1", "ttft_s", "f1_vs_full", "ttft_vs_reprefill"):
            assert key in entry
        assert entry["nll"] is not None and entry["nll"] > 0
    assert squad["full"]["agree_em"] == 1.0
    # the packed full cache and re-prefilling are the same computation: same greedy answers and likelihoods
    assert squad["reprefill"]["agree_em"] == 1.0
    assert squad["reprefill"]["nll"] == pytest.approx(squad["full"]["nll"], rel=1e-3)

    needle = quality["needle"]
    assert {"full", "kvzip-pair@0.3", "kvzip-pair@0.1", "snapkv@0.3"} <= set(needle)
    limit = tiny_llama.context_limit - len(tiny_llama.encode(tiny_llama.template.prefix)) - 16
    assert needle["full"]["n"] == 4 and set(needle["full"]["hit_by_length"]) == {"200", "400", str(limit)}

    summary = stored["summary"]
    assert summary["bytes"]["memory"]["squad"]["kvzip-pair@0.3"]["memory_vs_full"] < 0.6
    assert {"kvzip", "snapkv", "h2o", "keynorm", "random", "prefill-only"} <= set(summary["scoring"])
    assert summary["scoring"]["kvzip"]["overhead"] > 0
    decode = summary["decode"]
    assert len(decode) == 3 and all({"dense-full", "packed-full", "kvzip-pair@0.3"} <= set(r) for r in decode.values())
    assert summary["ttft"] and summary["ttft"][0]["reprefill_ttft_s"] > 0
    assert summary["ttft"][0]["stored_first_token_s"] > 0 and summary["bytes"]["disk"]
    assert len(summary["targets"]) == 9 and all({"target", "value", "met"} <= set(t) for t in summary["targets"])

    md = (out / "results.md").read_text()
    for heading in ("## Targets", "## SQuAD", "## Needle", "## NarrativeQA", "### Per-token decode latency",
                    "### Time to first token", "`kvzip-pair@0.3`", "`chunk-rag`"):
        assert heading in md, heading
    assert results["meta"]["preset"]["squad_questions"] == 2


def test_missing_data_folder_is_a_clear_error(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match="KVZIP_RAG_DATA"):
        run_bench("quick", data_dir=tmp_path / "nope", out_dir=tmp_path / "out", loaded_model=tiny_llama)


def test_budget_skips_documents_but_still_reports(tiny_llama, tiny_data, tmp_path):
    out = tmp_path / "out"
    results = run_bench("quick", data_dir=tiny_data, out_dir=out, loaded_model=tiny_llama, embedding="hashing",
                        preset_overrides={"budget_minutes": 0.0, "squad_min_tokens": 60}, log=lambda message: None)
    assert results["meta"]["skipped"]["over_budget"]  # every document listed, none run
    assert results["rows"] == []
    assert (out / "results.md").read_text().startswith("# kvzip-rag benchmark")
    assert (out / "ttft.png").exists()


def test_timings_are_reported_at_the_package_default_ratio_when_measured():
    from kvzip_rag.bench.presets import main_ratio
    from kvzip_rag.budget import DEFAULT_BUDGET

    assert main_ratio((0.1, DEFAULT_BUDGET.ratio, 0.5)) == DEFAULT_BUDGET.ratio
    assert main_ratio((0.5, 0.2)) == 0.5


def test_preset_overrides_parse_and_validate():
    from kvzip_rag.bench.presets import get_preset, parse_overrides

    overrides = parse_overrides(["squad_docs=2", "needle_cases=((4096, 0.5),)", "baseline_level=pair"])
    assert overrides == {"squad_docs": 2, "needle_cases": ((4096, 0.5),), "baseline_level": "pair"}
    assert get_preset("full", **overrides).needle_cases == ((4096, 0.5),)
    with pytest.raises(ValueError, match="unknown preset field"):
        get_preset("quick", nope=1)
    with pytest.raises(ValueError, match="name=value"):
        parse_overrides(["squad_docs"])


def test_every_task_is_one_interface_and_the_runner_only_dispatches(tiny_llama, tmp_path, monkeypatch):
    from kvzip_rag.bench.presets import get_preset
    from kvzip_rag.bench.tasks import TASKS, Context, StandaloneTask, run_tasks

    for name, task in TASKS.items():
        assert task.name == name and isinstance(task.standalone, bool)
        assert callable(task.run) and callable(task.section)
    # a task plugs in by name, without touching the runner: run, its own files, its report section
    echo = StandaloneTask("echo", lambda context: {"preset": context.preset.name},
                          lambda results: f"# echo\n\npreset {results['preset']}\n")
    monkeypatch.setitem(TASKS, "echo", echo)
    context = Context(get_preset("quick"), tmp_path, tmp_path / "out", loaded_model=tiny_llama, log=lambda m: None)
    assert run_tasks(["echo"], context) == {"echo": {"preset": "quick"}}
    assert json.loads((tmp_path / "out" / "echo.json").read_text()) == {"preset": "quick"}
    assert (tmp_path / "out" / "echo.md").read_text() == "# echo\n\npreset quick\n"
    assert echo.section({"preset": "quick"}) == ["# echo", "", "preset quick"]
    from typer.testing import CliRunner

    from kvzip_rag.bench.cli import app

    shown = CliRunner().invoke(app, ["--task", "echo", "--data", str(tmp_path), "--out", str(tmp_path / "cli")])
    assert shown.exit_code == 0, shown.output
    assert "preset quick" in shown.stdout and (tmp_path / "cli" / "echo.md").exists()
