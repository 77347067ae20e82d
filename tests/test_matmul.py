"""bfloat16 weight products on CPU (kvzip_rag.matmul): the packed oneDNN product equals the plain bfloat16
product row by row, a batch still gives each sequence its batch-1 logits, and the option reaches the model from
every entry point (argument, environment, CLI) or is refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import kvzip_rag
from kvzip_rag.batch import batched_forward
from kvzip_rag.cli import app
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.matmul import BFloat16Linear, bfloat16_matmul_supported, use_matmul
from kvzip_rag.models import model_fingerprint

from conftest import build_tiny
from test_batching import PROMPTS, STEPS, serial_logits, varied_caches
from test_cli import WIDE, docs, tiny_model_dir  # noqa: F401  (fixtures)
from test_engine import ATOL

BF16_ATOL = 0.05  # a few bfloat16 steps of a logit: one rounding flipped upstream, not another answer
needs_bf16 = pytest.mark.skipif(not bfloat16_matmul_supported(),
                                reason="this CPU or torch build has no oneDNN bfloat16 matrix instructions")


@needs_bf16
def test_the_packed_product_equals_the_plain_bfloat16_product_row_by_row(smol_tokenizer):
    """Every linear layer (and the output head) multiplies its packed weight; its output is the plain bfloat16
    product exactly, for 1 row, 8 rows or a 3-d batch, and a row's output does not depend on the rows beside it."""
    model = build_tiny("llama", smol_tokenizer, seed=3)
    use_matmul(model.model, "bfloat16")
    linears = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, BFloat16Linear) for m in linears)
    torch.manual_seed(0)
    for layer in (linears[0], linears[-1]):
        rows = torch.randn(2, 9, layer.in_features)
        out = layer(rows)
        assert out.dtype == torch.float32
        assert torch.equal(out, layer.reference(rows))
        flat = rows.reshape(-1, layer.in_features)
        for count in (1, 3, 8):
            assert torch.equal(layer(flat[:count]), out.reshape(-1, out.shape[-1])[:count])
        assert not torch.equal(out, torch.nn.functional.linear(rows, layer.weight))  # it really rounds


@needs_bf16
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_batched_decoding_in_bfloat16_gives_each_sequence_its_batch_one_logits(family, smol_tokenizer):
    """The serving guarantee with bfloat16 products: five different caches decoded together, fed each one's
    batch-1 greedy tokens, give each sequence its batch-1 logits. The products are row-independent; the float32
    attention around them may differ in its last bit between the two paths (as it does with float32 products,
    ``ATOL``), and rounding to bfloat16 can turn that bit into one bfloat16 step, hence the wider tolerance."""
    model = build_tiny(family, smol_tokenizer, seed=5)
    use_matmul(model.model, "bfloat16")
    caches = varied_caches(model)
    prompts = [model.encode(model.template.question_text(q)) for q in PROMPTS]
    expected = serial_logits(model, caches, prompts, STEPS)
    with torch.inference_mode():
        rows = [batched_forward(model, caches, prompts)]
        for step in range(STEPS):
            rows.append(batched_forward(model, caches, [[int(e[step].argmax())] for e in expected]))
    for cache in caches:
        cache.reset()
    got = list(torch.stack(rows, 1))
    exact = 0
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=BF16_ATOL), (g - e).abs().max()
        exact += int(torch.equal(g, e))
    assert exact >= len(caches) - 1  # most are equal bit for bit
    use_matmul(model.model, "float32")
    assert not torch.allclose(serial_logits(model, caches, prompts, 0)[0], expected[0][:1], atol=ATOL)


@needs_bf16
def test_bfloat16_keeps_the_fingerprint_and_state_dict_and_float32_undoes_it(smol_tokenizer):
    """A store indexed with float32 products is the same model's (same fingerprint), and switching back
    gives the float32 logits bit for bit."""
    model = build_tiny("llama", smol_tokenizer, seed=1)
    ids = torch.tensor([model.encode("The harbour was built in 1884.")])
    with torch.inference_mode():
        before = model.model(ids).logits
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    use_matmul(model.model, "bfloat16")
    assert model.matmul == "bfloat16"
    assert model_fingerprint(model.model) == model.fingerprint
    assert model.model.state_dict().keys() == state.keys()
    with torch.inference_mode():
        rounded = model.model(ids).logits
    assert not torch.equal(rounded, before) and torch.allclose(rounded, before, atol=0.05)
    use_matmul(model.model, "float32")
    assert model.matmul == "float32"
    assert not any(isinstance(m, BFloat16Linear) for m in model.model.modules())
    with torch.inference_mode():
        assert torch.equal(model.model(ids).logits, before)


@needs_bf16
def test_the_environment_picks_the_precision_an_argument_overrides_it_wrapping_keeps_it(smol_tokenizer, monkeypatch):
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    monkeypatch.setenv("KVZIP_RAG_MATMUL", "bfloat16")
    torch.manual_seed(0)
    raw = AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32)
    assert kvzip_rag.wrap_model(raw, smol_tokenizer).matmul == "bfloat16"
    assert kvzip_rag.wrap_model(raw, smol_tokenizer, matmul="float32").matmul == "float32"
    monkeypatch.delenv("KVZIP_RAG_MATMUL")
    use_matmul(raw, "bfloat16")
    assert kvzip_rag.wrap_model(raw, smol_tokenizer).matmul == "bfloat16"  # neither given: wrapping keeps it
    assert kvzip_rag.wrap_model(raw, smol_tokenizer, matmul="float32").matmul == "float32"
    assert kvzip_rag.wrap_model(raw, smol_tokenizer).matmul == "float32"


def test_unknown_precisions_and_models_it_cannot_serve_are_refused(smol_tokenizer, monkeypatch):
    model = build_tiny("llama", smol_tokenizer, seed=2)
    with pytest.raises(InvalidArgumentError, match="matmul must be one of float32, bfloat16, got 'int8'"):
        use_matmul(model.model, "int8")
    monkeypatch.setenv("KVZIP_RAG_MATMUL", "fp8")
    with pytest.raises(InvalidArgumentError, match="got 'fp8'"):
        kvzip_rag.wrap_model(model.model, smol_tokenizer)
    monkeypatch.delenv("KVZIP_RAG_MATMUL")
    model.model.to(torch.bfloat16)
    with pytest.raises(InvalidArgumentError, match="for float32 models on CPU; this one is torch.bfloat16"):
        use_matmul(model.model, "bfloat16")
    assert not any(isinstance(m, BFloat16Linear) for m in model.model.modules())  # nothing half-changed


def test_the_cli_refuses_an_unknown_precision_when_it_loads_the_model(tmp_path, tiny_model_dir, docs):  # noqa: F811
    bad = CliRunner(env=WIDE).invoke(app, ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir),
                                           "index", str(docs / "harbour.txt"), "--matmul", "int8"])
    assert bad.exit_code == 1 and "matmul must be one of float32, bfloat16, got 'int8'" in bad.output
    assert "Traceback" not in bad.output


@needs_bf16
def test_the_cli_loads_the_model_with_the_precision_asked_for(tmp_path, tiny_model_dir, docs):  # noqa: F811
    """``--matmul`` (or ``KVZIP_RAG_MATMUL``) reaches the model every command loads; answers come back."""
    from kvzip_rag.cli import settings

    runner = CliRunner(env=WIDE)
    options = ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir)]
    assert runner.invoke(app, [*options, "index", str(docs / "harbour.txt")]).exit_code == 0
    result = runner.invoke(app, [*options, "ask", "Who built the harbour?", "--max-tokens", "4",
                                               "--matmul", "bfloat16"])
    assert result.exit_code == 0, result.output
    assert "bfloat16 matmuls" in result.output
    loaded = [m for key, m in settings._MODELS.items() if key[0] == str(tiny_model_dir) and key[2] == "bfloat16"]
    assert loaded and loaded[0].matmul == "bfloat16"
    env = runner.invoke(app, [*options, "ask", "Who built the harbour?", "--max-tokens", "4"],
                        env={**WIDE, "KVZIP_RAG_MATMUL": "float32"})
    assert env.exit_code == 0, env.output
    assert any(key[0] == str(tiny_model_dir) and key[2] == "float32" for key in settings._MODELS)


@needs_bf16
def test_the_precision_benchmark_pairs_each_question_in_both_precisions(tiny_model_dir, tmp_path):  # noqa: F811
    import json

    from conftest import DATA_DIR

    if not (DATA_DIR / "squad").exists():
        pytest.skip("SQuAD data not found")
    run = CliRunner(env=WIDE).invoke(app, ["bench", "--task", "precision", "--model", str(tiny_model_dir),
                                           "--threads", "1", "--data", str(DATA_DIR), "--out", str(tmp_path),
                                           "--limit", "3"])
    assert run.exit_code == 0, run.output
    result = json.loads((tmp_path / "precision.json").read_text())
    assert sorted((r["qid"], r["matmul"]) for r in result["rows"]) == sorted(
        (q, m) for q in {r["qid"] for r in result["rows"]} for m in ("float32", "bfloat16"))
    assert len(result["rows"]) == 6 and result["summary"]["nll_difference"]["n"] == 3
    nll = {m: sum(r["nll"] for r in result["rows"] if r["matmul"] == m) / 3 for m in ("float32", "bfloat16")}
    assert result["summary"]["nll_difference"]["mean"] == pytest.approx(nll["bfloat16"] - nll["float32"])
    assert "| bfloat16 | 3 |" in (tmp_path / "precision.md").read_text()
