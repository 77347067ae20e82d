"""The multidoc benchmark task: BM25 routing, and a smoke run whose methods and fields are what results.json promises."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvzip_rag.bench.cli import run_bench
from kvzip_rag.bench.multidoc import bm25_rank

PARAGRAPHS = [
    ("Velmora harbour", ["The harbour of Velmora was built in 1731 by the engineer Ansel Brask."]),
    ("Ansel Brask", ["Ansel Brask was a Danish engineer born in Aarhus.", " He died in 1770."]),
    ("Tessin", ["Tessin is an island with two villages and a lighthouse."]),
    ("Regatta", ["Every August fishing boats race around the harbour for a silver anchor."]),
]


def test_bm25_ranks_the_matching_documents_first():
    documents = [f"{t}: {''.join(s)}" for t, s in PARAGRAPHS]
    order = bm25_rank("Where was the engineer Ansel Brask born?", documents)
    assert order[0] == 1 and sorted(order) == [0, 1, 2, 3]
    assert bm25_rank("silver anchor regatta", documents)[0] == 3


@pytest.fixture
def hotpot_data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    (root / "hotpotqa").mkdir(parents=True)
    items = [
        {"_id": "q1", "question": "Where was the engineer who built the harbour of Velmora born?", "answer": "Aarhus",
         "type": "bridge", "level": "easy", "supporting_facts": [["Velmora harbour", 0], ["Ansel Brask", 0]],
         "context": PARAGRAPHS},
        {"_id": "q2", "question": "What do the boats race for in August?", "answer": "a silver anchor",
         "type": "bridge", "level": "easy", "supporting_facts": [["Regatta", 0]], "context": PARAGRAPHS},
    ]
    (root / "hotpotqa" / "distractor-sample-0-49.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    (root / "paul_graham_essays").mkdir()
    essay = " ".join(f"Essay sentence {i} says that startups should make something people want." for i in range(150))
    (root / "paul_graham_essays" / "one.txt").write_text(essay)
    return root


@pytest.mark.parametrize("k", [1, 2])
def test_multidoc_smoke_run(tiny_llama, hotpot_data, tmp_path, k):
    overrides = dict(multidoc_questions=2, multidoc_k=k, multidoc_ratios=(1.0, 0.3), multidoc_repair=4,
                     multidoc_needle_cases=1, multidoc_segments=3, multidoc_segment_tokens=60,
                     multidoc_max_new_tokens=3, needle_max_new_tokens=3, chunk_tokens=40, chunk_overlap=0)
    results = run_bench("quick", data_dir=hotpot_data, out_dir=tmp_path / "out", loaded_model=tiny_llama,
                        tasks=("multidoc",), embedding="hashing", preset_overrides=overrides, log=lambda m: None)
    quality = results["summary"]["quality"]
    multidoc = quality["multidoc"]
    names = {"composed-parallel@1", "composed-sequential@1", "composed-sequential-repair@1", "composed-parallel@0.3",
             "composed-sequential@0.3", "composed-sequential-repair@0.3", "best-of-k@0.3", "chunk-rag", "oracle"}
    assert set(multidoc) == names
    for entry in multidoc.values():
        assert entry["n"] == 2 and all(entry[key] is not None for key in ("f1", "contains", "nll", "ttft_s"))
    assert multidoc["composed-sequential@0.3"]["cache_bytes"] < multidoc["composed-sequential@1"]["cache_bytes"]
    if k == 1:  # one routed document at ratio 1.0: composing it is its cache, which is re-prefilling it
        for name in ("composed-parallel@1", "composed-sequential@1"):
            assert multidoc[name]["nll"] == pytest.approx(multidoc["oracle"]["nll"], rel=1e-3)
    else:
        rows = [r for r in results["rows"] if r["method"] == "composed-sequential@1"]
        assert all(len(r["used"]) == 2 and r["dropped"] == [] for r in rows)
    assert set(quality["multidoc-needle"]) == names
    assert "## Multi-document questions" in (tmp_path / "out" / "results.md").read_text()


def test_multidoc_nll_only_run_skips_answers(tiny_llama, hotpot_data, tmp_path):
    overrides = dict(multidoc_indices=(1,), multidoc_k=2, multidoc_ratios=(0.3,), multidoc_repair=0,
                     multidoc_needle_cases=0, multidoc_nll_only=True, chunk_tokens=40, chunk_overlap=0)
    results = run_bench("quick", data_dir=hotpot_data, out_dir=tmp_path / "out", loaded_model=tiny_llama,
                        tasks=("multidoc",), embedding="hashing", preset_overrides=overrides, log=lambda m: None)
    multidoc = results["summary"]["quality"]["multidoc"]
    assert set(multidoc) == {"composed-parallel@0.3", "composed-sequential@0.3", "chunk-rag", "oracle"}
    for entry in multidoc.values():
        assert entry["n"] == 1 and entry["n_answered"] == 0 and entry["f1"] is None
        assert entry["nll"] is not None and entry["ttft_s"] > 0
    assert {r["qid"] for r in results["rows"]} == {"q2"}
