"""``kvzip-rag bench --preset gpu``: refuses clearly without CUDA; its measurements run (on CPU, tiny model)."""

from __future__ import annotations

import math
import pytest
import torch
from typer.testing import CliRunner

from kvzip_rag.bench.cli import app
from kvzip_rag.bench.gpu import lengths_up_to, markdown, measure_length

from test_engine import TEXT


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the preset would run, not refuse")
def test_gpu_preset_refuses_on_cpu(tmp_path):
    result = CliRunner().invoke(app, ["--preset", "gpu", "--model", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "no CUDA device" in result.output
    assert not (tmp_path / "o").exists()


def test_gpu_measurements_run_and_hold_together(tiny_llama):
    assert lengths_up_to(7000) == [1024, 2048, 4096, 7000] and lengths_up_to(4096) == [1024, 2048, 4096]
    row = measure_length(tiny_llama, " ".join([TEXT] * 3), ratio=0.3, steps=3, question="Who built the harbour?")
    assert row.context_tokens > 200
    assert row.cache_mb_ratio < 0.5 * row.cache_mb_full
    assert min(row.prefill_s, row.decode_dense_ms, row.decode_full_ms, row.decode_ratio_ms,
               row.attention_full_ms, row.attention_ratio_ms, row.ttft_packed_s, row.ttft_dense_s) > 0
    assert math.isfinite(row.scoring_overhead)  # a difference of two timings: its sign is noise on a busy CPU
    table = markdown([row], 0.3, {"model": "tiny", "device": "cpu", "dtype": "float32", "command": "x"})
    assert f"| {row.context_tokens} |" in table
