"""The benchmark's fidelity task: a smoke run on a tiny model and tiny data, its one-pass measurements against the
plain NLL reference, and the document bootstrap on rows whose answer is known."""

from __future__ import annotations

import json

import pytest

from kvzip_rag.bench import measure
from kvzip_rag.bench.cli import run_bench
from kvzip_rag.bench.fidelity import frontier_targets, summarize, teacher_forced
from kvzip_rag.compression import compress
from test_bench import tiny_data  # noqa: F401  (fixture)


def test_teacher_forced_matches_the_nll_reference(tiny_llama):
    cache = compress(tiny_llama, "The harbour of Velmora was built in 1731 by the engineer Ansel Brask.", ratio=0.5)
    out = teacher_forced(tiny_llama, cache, "Who built the harbour?", "Ansel Brask")
    assert out["nll"] == pytest.approx(measure.packed_nll(tiny_llama, cache, "Who built the harbour?", "Ansel Brask"),
                                       rel=1e-5)
    assert out["logprobs"].shape[0] == len(measure.gold_ids(tiny_llama, "Ansel Brask"))
    first = measure.first_token(tiny_llama, cache, "Who built the harbour?")
    assert int(out["greedy"][0]) == first


def test_bootstrap_intervals_and_paired_differences():
    rows = []
    for d in range(6):
        for q in range(5):
            base = 2.0 + 0.3 * d + 0.05 * q  # documents differ a lot; the method adds exactly 0.25 everywhere
            for method, shift in (("full", 0.0), ("kvzip-pair@0.3", 0.25), ("snapkv@0.3", 1.0)):
                rows.append({"doc": f"d{d}", "qid": f"d{d}q{q}", "method": method, "nll": base + shift,
                             "first_token_match": 1.0, "token_agreement": 1.0, "kl_from_full": shift, "f1": None,
                             "answer": None})
    table = summarize({"rows": rows})
    kvzip = table["kvzip-pair@0.3"]
    assert kvzip["n"] == 30 and kvzip["n_f1"] == 0 and "f1" not in kvzip
    assert kvzip["nll_minus_full"] == pytest.approx(0.25)
    assert kvzip["nll_minus_full_ci"] == pytest.approx([0.25, 0.25])  # paired: the document spread cancels
    lo, hi = kvzip["nll_ci"]
    assert lo < kvzip["nll"] < hi and hi - lo > 0.3  # unpaired: it does not
    assert table["snapkv@0.3"]["nll_minus_kvzip"] == pytest.approx(0.75)
    assert list(table) == ["full", "kvzip-pair@0.3", "snapkv@0.3"]


def test_fidelity_smoke_run(tiny_llama, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))  # no gate yet: calibrated on the essays
    out = tmp_path / "out"
    overrides = dict(fidelity_questions=6, fidelity_f1_questions=3, fidelity_min_tokens=100, fidelity_max_tokens=400,
                     fidelity_ratios=(0.3, 0.5), fidelity_max_new_tokens=3, fidelity_calibration_tokens=120,
                     fidelity_calibration_segments=4)
    results = run_bench("quick", data_dir=tiny_data, out_dir=out, loaded_model=tiny_llama, embedding="hashing",
                        tasks=("fidelity",), preset_overrides=overrides, log=lambda message: None)
    stored = json.loads((out / "results.json").read_text())
    table = stored["summary"]["quality"]["fidelity"]
    expected = {"full", "kvzip-pair@0.3", "kvzip-uniform@0.5", "kvzip-head@0.3", "kvzip-fast@0.3", "kvzip-fast@0.5",
                "snapkv@0.3", "h2o@0.5"}
    assert expected <= set(table)
    assert all(table[m]["n"] == 6 for m in expected)
    assert table["full"]["first_token_match"] == 1.0 and table["full"]["token_agreement"] == 1.0
    assert table["full"]["kl_from_full"] == pytest.approx(0.0, abs=1e-6)
    assert table["kvzip-fast@0.3"]["n_f1"] == 3 and table["kvzip-pair@0.5"]["n_f1"] == 0
    for method in expected:
        lo, hi = table[method]["nll_ci"]
        assert lo <= table[method]["nll"] <= hi
    assert "nll_minus_kvzip_ci" in table["kvzip-fast@0.3"]
    assert results["fidelity"]["gate"]["calibrated_now"] is True
    scoring = stored["summary"]["scoring"]
    assert {"kvzip", "kvzip-fast", "snapkv", "h2o"} <= set(scoring) and scoring["kvzip-fast"]["overhead"] > 0
    names = [t["target"] for t in stored["summary"]["targets"]]
    assert any(n.startswith("kvzip-fast at 0.3") for n in names)
    assert "## Fidelity" in (out / "results.md").read_text()


def test_frontier_grid_measures_codecs_scorers_and_bytes(tiny_llama, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """fidelity_bits and fidelity_scorers add stored-precision and scorer variants of the KVzip methods; each
    method reports its blob bytes per document token, smaller at fewer bits and at lower ratios."""
    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    overrides = dict(fidelity_questions=4, fidelity_f1_questions=0, fidelity_min_tokens=100, fidelity_max_tokens=400,
                     fidelity_ratios=(0.125, 0.0625), levels=("pair",), fidelity_baselines=("snapkv",),
                     fidelity_calibration_tokens=120, fidelity_calibration_segments=4,
                     fidelity_scorers=("kvzip-structure",), fidelity_bits=(16, 4, 3))
    run_bench("quick", data_dir=tiny_data, out_dir=out, loaded_model=tiny_llama, embedding="hashing",
              tasks=("fidelity",), preset_overrides=overrides, log=lambda message: None)
    table = json.loads((out / "results.json").read_text())["summary"]["quality"]["fidelity"]
    for family in ("kvzip-pair", "kvzip-fast", "kvzip-structure"):
        for ratio in ("0.125", "0.0625"):
            sizes = [table[f"{family}{suffix}@{ratio}"]["blob_bytes_per_token"] for suffix in ("", "-int4", "-k4v2")]
            assert sizes[0] > sizes[1] > sizes[2]
            assert table[f"{family}-k4v2@{ratio}"]["n"] == 4 and "nll_minus_full_ci" in table[f"{family}-k4v2@{ratio}"]
        assert table[f"{family}-int4@0.0625"]["kv_bytes_per_token"] < table[f"{family}-int4@0.125"]["kv_bytes_per_token"]
    assert "snapkv-int4@0.125" not in table and "full-int4" not in table  # baselines: as computed only
    assert 0 < table["kvzip-pair-k4v2@0.125"]["blob_vs_full_fp16"] < table["kvzip-pair@0.125"]["blob_vs_full_fp16"]
    assert "nll_minus_kvzip_ci" in table["kvzip-structure@0.125"]
    assert list(table).index("kvzip-pair@0.125") < list(table).index("kvzip-pair-int4@0.125")


def test_key_group_layouts_and_k2v2_are_measured_paired_against_the_default(
        tiny_llama, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """fidelity_key_groups adds (kv_bits, key group) layouts beside that precision's default, with fewer bytes and
    the NLL difference to the default paired; kv_bits 2 is K2V2; fidelity_fast=False leaves kvzip-fast out."""
    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    overrides = dict(fidelity_questions=4, fidelity_f1_questions=0, fidelity_min_tokens=100, fidelity_max_tokens=400,
                     fidelity_ratios=(0.125,), levels=("pair",), fidelity_baselines=(), fidelity_fast=False,
                     fidelity_bits=(3, 2), fidelity_key_groups=((3, 16), (3, 64)))  # 64: K4V2's own
    run_bench("quick", data_dir=tiny_data, out_dir=out, loaded_model=tiny_llama, embedding="hashing",
              tasks=("fidelity",), preset_overrides=overrides, log=lambda message: None)
    table = json.loads((out / "results.json").read_text())["summary"]["quality"]["fidelity"]
    assert set(table) == {"full", "kvzip-pair-k4v2@0.125", "kvzip-pair-k4v2-g16@0.125", "kvzip-pair-k2v2@0.125"}
    default, narrow = table["kvzip-pair-k4v2@0.125"], table["kvzip-pair-k4v2-g16@0.125"]  # K4V2's default: 64
    assert narrow["blob_bytes_per_token"] > default["blob_bytes_per_token"]
    assert table["kvzip-pair-k2v2@0.125"]["kv_bytes_per_token"] < narrow["kv_bytes_per_token"]
    assert narrow["nll_minus_layout"] == pytest.approx(narrow["nll"] - default["nll"])
    assert "nll_minus_layout_ci" in narrow
    assert "nll_minus_layout" not in default


def test_frontier_targets_and_codec_twins():
    """Paired differences compare a scorer with KVzip at the same stored precision; the issue's frontier targets are
    decided from the paired intervals and the bytes."""
    rows = []
    methods = {"full": 0.0, "kvzip-pair@0.125": 0.05, "kvzip-pair-int4@0.125": 0.08, "kvzip-structure-int4@0.125": 0.02,
               "snapkv@0.125": 0.6, "h2o@0.125": 0.5}
    for d in range(5):
        for q in range(4):
            for method, shift in methods.items():
                rows.append({"doc": f"d{d}", "qid": f"d{d}q{q}", "method": method, "nll": 2.0 + 0.2 * d + shift,
                             "first_token_match": 1.0, "token_agreement": 1.0, "kl_from_full": shift, "f1": None,
                             "answer": None})
    sizes = {"kvzip-pair@0.125": 4000, "kvzip-pair-int4@0.125": 600, "kvzip-structure-int4@0.125": 300,
             "snapkv@0.125": 4000, "h2o@0.125": 4000}
    record = {"rows": rows, "fp16_bytes_per_token": 20000,
              "bytes": [{"doc": "d0", "method": m, "context_tokens": 100, "blob_bytes": b * 100, "kv_bytes": b * 90}
                        for m, b in sizes.items()]}
    table = summarize(record)
    assert table["kvzip-structure-int4@0.125"]["nll_minus_kvzip"] == pytest.approx(0.02 - 0.08)  # int4 twin
    assert table["kvzip-structure-int4@0.125"]["blob_vs_full_fp16"] == pytest.approx(0.015)
    targets = {t["target"].split(":")[0].split(" (")[0]: t for t in frontier_targets(table)}
    assert targets["KVzip pair at 0.125"]["met"] is True
    smallest = targets["bytes stored <= 0.02x the full fp16 cache with NLL within 0.1 nats of full"]
    assert smallest["met"] is True and smallest["note"] == "method kvzip-structure-int4@0.125"
    ahead = targets["KVzip pair ahead of SnapKV and H2O at 0.125 and 0.0625"]
    assert ahead["met"] is True and len(ahead["value"]) == 2


def test_runs_over_disjoint_documents_merge_into_the_run_over_all(tiny_llama, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    """A run split by document merges back into the same table; overlapping documents or another grid are refused."""
    from kvzip_rag.bench.fidelity_merge import merge_runs
    from kvzip_rag.errors import InvalidArgumentError

    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    overrides = dict(fidelity_questions=4, fidelity_f1_questions=0, fidelity_min_tokens=100, fidelity_max_tokens=400,
                     fidelity_ratios=(0.3,), levels=("pair",), fidelity_baselines=("snapkv",),
                     fidelity_calibration_tokens=120, fidelity_calibration_segments=4, fidelity_questions_per_doc=2)
    run_bench("quick", data_dir=tiny_data, out_dir=tmp_path / "all", loaded_model=tiny_llama, embedding="hashing",
              tasks=("fidelity",), preset_overrides=dict(overrides, fidelity_checkpoint=str(tmp_path / "ckpt.json")),
              log=lambda message: None)
    whole = json.loads((tmp_path / "all" / "results.json").read_text())
    assert json.loads((tmp_path / "ckpt.json").read_text())["fidelity"]["rows"] == whole["fidelity"]["rows"]
    docs = sorted({r["doc"] for r in whole["fidelity"]["rows"]})
    assert len(docs) == 2
    for i, doc in enumerate(docs):
        part = json.loads(json.dumps(whole))
        part["fidelity"]["rows"] = [r for r in whole["fidelity"]["rows"] if r["doc"] == doc]
        part["fidelity"]["bytes"] = [b for b in whole["fidelity"]["bytes"] if b["doc"] == doc]
        part["summary"]["quality"]["fidelity"] = {}  # stale: the merge recomputes it
        (tmp_path / f"part{i}").mkdir()
        (tmp_path / f"part{i}" / "results.json").write_text(json.dumps(part))
    merge_runs([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["summary"]["quality"]["fidelity"] == whole["summary"]["quality"]["fidelity"]
    assert [p["documents"] for p in merged["meta"]["merged_from"]] == [1, 1]
    assert (tmp_path / "merged" / "fidelity_curve.png").exists()
    with pytest.raises(InvalidArgumentError, match="share documents"):
        merge_runs([tmp_path / "part0", tmp_path / "all"], tmp_path / "again")
    cut_short = {"model_fingerprint": whole["meta"]["model_fingerprint"],
                 "fidelity": json.loads((tmp_path / "part1" / "results.json").read_text())["fidelity"]}
    (tmp_path / "cut.json").write_text(json.dumps(cut_short))
    merge_runs([tmp_path / "part0", tmp_path / "cut.json"], tmp_path / "from-checkpoint")
    again = json.loads((tmp_path / "from-checkpoint" / "results.json").read_text())
    assert again["summary"]["quality"]["fidelity"] == whole["summary"]["quality"]["fidelity"]
    other = json.loads(json.dumps(whole))
    other["fidelity"]["rows"] = [dict(r, method="h2o@0.3") if r["method"] == "snapkv@0.3" else r
                                 for r in whole["fidelity"]["rows"] if r["doc"] == docs[1]]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text(json.dumps(other))
    with pytest.raises(InvalidArgumentError, match="other models, methods"):
        merge_runs([tmp_path / "part0", tmp_path / "other"], tmp_path / "again")
