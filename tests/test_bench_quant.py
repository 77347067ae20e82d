"""The ``quant`` benchmark task on a tiny model: every ratio x bits point, the same row fields, bytes, report."""

from __future__ import annotations

import json

from kvzip_rag.bench.cli import run_bench

from test_bench import tiny_data  # noqa: F401 (fixture)


def test_quant_task_rows_pareto_and_report(tiny_llama, tiny_data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    overrides = dict(
        squad_min_tokens=60, squad_max_tokens=400, quant_squad_docs=1, quant_squad_questions=2,
        quant_ratios=(0.1, 0.3), quant_grid_questions=1, quant_answer_questions=1, quant_needle_cases=((300, 0.5),),
        ttft_length=300, ttft_repeats=2, max_new_tokens=3, needle_max_new_tokens=3,
    )
    run_bench("quick", data_dir=tiny_data, out_dir=out, loaded_model=tiny_llama, embedding="hashing",
              tasks=("quant",), preset_overrides=overrides, log=lambda message: None)
    stored = json.loads((out / "results.json").read_text())
    rows = stored["rows"]
    methods = {r["method"] for r in rows}
    assert {"full", "kvzip-pair@0.3", "kvzip-pair-int8@0.3", "kvzip-pair-int4@0.3", "kvzip-pair-int4@0.1"} <= methods
    reference = next(r for r in rows if r["method"] == "kvzip-pair@0.3" and r["task"] == "quant-squad")
    for row in rows:
        assert set(reference) <= set(row), row["method"]
    answered = [r for r in rows if r["task"] == "quant-squad" and r["method"] == "kvzip-pair-int4@0.3"]
    assert len(answered) == 1 and answered[0]["answer"] is not None and answered[0]["kv_bits"] == 4
    nll_only = [r for r in rows if r["task"] == "quant-squad-nll" and r["method"] == "kvzip-pair-int4@0.3"]
    assert len(nll_only) == 1 and nll_only[0]["nll"] is not None
    pareto = {p["method"]: p for p in stored["quant"]["pareto"]}
    assert pareto["kvzip-pair-int8@0.3"]["n_nll"] == 2 and pareto["kvzip-pair-int4@0.1"]["n_nll"] == 1
    assert pareto["kvzip-pair-int4@0.3"]["file_vs_full"] < pareto["kvzip-pair-int8@0.3"]["file_vs_full"] \
        < pareto["kvzip-pair@0.3"]["file_vs_full"] < pareto["full"]["file_vs_full"]
    assert pareto["kvzip-pair-int8@0.3"]["nll_minus_16bit"] is not None
    assert pareto["kvzip-pair@0.3"]["needle_hit"] is not None
    disk = [d for d in stored["disk"] if d["method"] == "kvzip-pair-int4@0.3"]
    assert disk and all(d["kv_bits"] == 4 and d["file_bytes"] > 0 for d in disk)
    ttft = stored["quant"]["ttft"]
    assert [t["kv_bits"] for t in ttft] == [16, 8, 4] and ttft[2]["file_bytes"] < ttft[0]["file_bytes"]
    assert ttft[2]["quantized_in_memory_first_token_s"] > 0
    assert all(t["cold_load_s"] is None or t["cold_load_s"] > 0 for t in ttft)
    assert ttft[0]["stored_minus_16bit_s"] is None and len(ttft[2]["samples"]["stored"]) == 2
    median, low, high = ttft[2]["stored_minus_16bit_s"]
    differences = [a - b for a, b in zip(ttft[2]["samples"]["stored"], ttft[0]["samples"]["stored"])]
    assert low <= median <= high and median == sum(differences) / 2
    md = (out / "results.md").read_text()
    assert "## Quantized caches (task quant)" in md and "kvzip-pair-int4@0.1" in md
    assert (out / "quant.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_median_interval_excludes_zero_only_for_a_consistent_difference():
    from kvzip_rag.bench.metrics import median_interval

    assert median_interval([0.1]) is None
    median, low, high = median_interval([0.04, 0.05, 0.06, 0.05, 0.045, 0.055])
    assert median == 0.05 and 0 < low <= median <= high <= 0.06
    median, low, high = median_interval([-0.05, 0.04, -0.03, 0.05, 0.01, -0.02])
    assert low < 0 < high
