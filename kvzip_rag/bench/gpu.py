"""``kvzip-rag bench --preset gpu``: decoding cost on CUDA in bf16, per context length up to the model's window.

For each length (doubling from 1K to the model's context limit) on Paul Graham essays: the plain prefill, KVzip's
scoring overhead (scoring seconds / prefill seconds), time to first token (the question on a cache already in
memory; dense: prefill of document + question), per-token decode latency for transformers' DynamicCache full
cache, the packed cache at ratio 1.0 and at the ratio under test, the packed attention alone (sum over layers,
one decode query), and the allocator's peak growth while decoding (no allocation proportional to the cache may
appear per token). No network: the model comes from a local folder and the hub is switched off.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from functools import partial
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import DynamicCache

from kvzip_rag.attention import packed_attention
from kvzip_rag.cache import PackedCache
from kvzip_rag.compression import pack
from kvzip_rag.generate import packed_forward
from kvzip_rag.models import KVzipModel
from kvzip_rag.prefill import prefill_document
from kvzip_rag.scorers import KVzipScorer

from .data import essays_text


@dataclass
class LengthRow:
    context_tokens: int
    prefill_s: float
    scoring_overhead: float  # KVzip scoring seconds / plain prefill seconds
    ttft_dense_s: float  # prefill document + question, first token
    ttft_packed_s: float  # question on the compressed cache already in memory, first token
    decode_dense_ms: float  # per token, transformers DynamicCache (full)
    decode_full_ms: float  # per token, packed cache at ratio 1.0
    decode_ratio_ms: float  # per token, packed cache at the ratio under test
    attention_full_ms: float  # packed attention alone, all layers, one decode query, ratio 1.0
    attention_ratio_ms: float  # same at the ratio under test
    decode_peak_growth_mb: float  # allocator peak while decoding, above what was allocated before (packed, ratio)
    cache_mb_full: float
    cache_mb_ratio: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> tuple[float, object]:
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def lengths_up_to(limit: int, start: int = 1024) -> list[int]:
    lengths, n = [], start
    while n < limit:
        lengths.append(n)
        n *= 2
    return lengths + [limit]


def measure_length(model: KVzipModel, text: str, ratio: float, steps: int, question: str) -> LengthRow:
    """All figures for one document (see the module docstring). Device-agnostic, so it is tested on CPU."""
    device = model.device
    prompt = model.encode(model.template.question_text(question, first_turn=True))
    prefill_document(model, text)  # warm-up: kernel selection and allocator growth are not the prefill's cost
    prefill_s, document = _timed(device, lambda: prefill_document(model, text))
    ids, context_length = document.prefix_ids + document.context_ids, document.context_length
    del document
    scorer = KVzipScorer()
    scored_s, scored = _timed(device, lambda: prefill_document(model, text, scorer=scorer))
    score_s, scores = _timed(device, partial(scorer.score, scored))
    full = pack(scored, scores, 1.0, "pair", scorer.name)
    del scored
    low = full.at_ratio(ratio)

    def dense_prefill(cache: DynamicCache, tokens: list[int], chunk: int = 2048) -> torch.Tensor:
        """Chunked, as ``prefill`` does: long windows never need the whole attention matrix."""
        for start in range(0, len(tokens), chunk):
            logits = model.forward(tokens[start : start + chunk], cache, logits_to_keep=1).logits[0, -1]
        return logits

    def dense_steps() -> tuple[float, float]:
        cache = DynamicCache(config=model.model.config)
        with torch.inference_mode():
            ttft, logits = _timed(device, lambda: dense_prefill(cache, ids + prompt))
            times = []
            for _ in range(steps):
                step, logits = _timed(
                    device, lambda: model.forward([int(logits.argmax())], cache, logits_to_keep=1).logits[0, -1]
                )
                times.append(step)
        return ttft, statistics.median(times)

    def packed_steps(cache: PackedCache) -> tuple[float, float, float]:
        cache.rewind()
        with torch.inference_mode():
            ttft, logits = _timed(device, lambda: packed_forward(model, cache, prompt))
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            times = []
            for _ in range(steps):
                step, logits = _timed(device, lambda: packed_forward(model, cache, [int(logits.argmax())]))
                times.append(step)
            peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
        cache.rewind()
        return ttft, statistics.median(times), peak / 2**20

    def attention_ms(cache: PackedCache) -> float:
        config = model.config
        head_dim = cache.layers[0].buffer_keys.shape[-1]
        scaling = head_dim**-0.5
        cache.rewind()
        with torch.inference_mode():
            packed_forward(model, cache, prompt)  # a real tail, as while decoding
            query = torch.randn(1, config.num_attention_heads, 1, head_dim, device=device, dtype=model.dtype)
            times = [
                _timed(device, lambda: [packed_attention(query, layer, scaling) for layer in cache.layers])[0]
                for _ in range(steps)
            ]
        cache.rewind()
        return statistics.median(times) * 1e3

    _, decode_full, _ = packed_steps(full)
    ttft_packed, decode_low, peak = packed_steps(low)
    attention_full, attention_low = attention_ms(full), attention_ms(low)
    cache_mb_full, cache_mb_low = full.nbytes / 2**20, low.nbytes / 2**20
    del full, low
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ttft_dense, decode_dense = dense_steps()
    return LengthRow(
        context_tokens=context_length,
        prefill_s=prefill_s,
        scoring_overhead=(scored_s - prefill_s + score_s) / prefill_s,
        ttft_dense_s=ttft_dense,
        ttft_packed_s=ttft_packed,
        decode_dense_ms=decode_dense * 1e3,
        decode_full_ms=decode_full * 1e3,
        decode_ratio_ms=decode_low * 1e3,
        attention_full_ms=attention_full,
        attention_ratio_ms=attention_low,
        decode_peak_growth_mb=peak,
        cache_mb_full=cache_mb_full,
        cache_mb_ratio=cache_mb_low,
    )


def markdown(rows: list[LengthRow], ratio: float, meta: dict) -> str:
    lines = [
        f"# GPU benchmark ({meta['model']}, {meta['device']}, {meta['dtype']}, ratio {ratio:g}, pair level)",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| context | prefill s | scoring overhead | TTFT dense s | TTFT packed s | decode dense ms/tok | "
        f"decode packed 1.0 ms/tok | decode packed {ratio:g} ms/tok | attention 1.0 ms | attention {ratio:g} ms "
        f"(x of 1.0) | decode peak growth MiB | cache MiB 1.0 / {ratio:g} |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.context_tokens} | {r.prefill_s:.2f} | {r.scoring_overhead:.2f}x | {r.ttft_dense_s:.3f} | "
            f"{r.ttft_packed_s:.3f} | {r.decode_dense_ms:.1f} | {r.decode_full_ms:.1f} | {r.decode_ratio_ms:.1f} | "
            f"{r.attention_full_ms:.2f} | {r.attention_ratio_ms:.2f} ({r.attention_ratio_ms / r.attention_full_ms:.2f}x)"
            f" | {r.decode_peak_growth_mb:.1f} | {r.cache_mb_full:.0f} / {r.cache_mb_ratio:.0f} |"
        )
    return "\n".join(lines) + "\n"


class GPUUnavailableError(RuntimeError):
    """The GPU preset was asked for where there is no CUDA device."""


def run_gpu_bench(model_path: Path, data_dir: Path, out_dir: Path, ratio: float = 0.3, steps: int = 32,
                  max_length: int | None = None, command: str = "", log=print) -> list[LengthRow]:
    """Load ``model_path`` (a local folder) in bf16 on CUDA, offline, and measure every length; writes
    ``gpu-results.json`` and ``gpu-results.md`` into ``out_dir``."""
    import kvzip_rag

    if not torch.cuda.is_available():
        raise GPUUnavailableError(
            "the gpu preset measures CUDA decoding and this machine has no CUDA device (torch.cuda.is_available() is "
            "False); run it on a GPU machine, or use --quick/--full for the CPU benchmark"
        )
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"--model must be a local model folder for the gpu preset (no network): {model_path}")
    os.environ["HF_HUB_OFFLINE"] = "1"
    model = kvzip_rag.load_model(str(model_path), device="cuda", dtype=torch.bfloat16)
    haystack = essays_text(data_dir)
    ids = model.encode(haystack)
    while len(ids) < model.context_limit:
        ids = ids + ids
    prefix = len(model.encode(model.template.prefix))
    limit = min(model.context_limit, max_length or model.context_limit) - prefix
    rows = []
    for length in lengths_up_to(limit):
        text = model.tokenizer.decode(ids[:length])
        rows.append(measure_length(model, text, ratio, steps, "What did the author work on before college?"))
        log(json.dumps(asdict(rows[-1])))
    meta = {"model": model.name, "device": torch.cuda.get_device_name(), "dtype": "bfloat16", "command": command,
            "torch": torch.__version__, "steps": steps}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu-results.json").write_text(json.dumps({"meta": meta, "ratio": ratio,
                                                          "rows": [asdict(r) for r in rows]}, indent=2))
    (out_dir / "gpu-results.md").write_text(markdown(rows, ratio, meta))
    log(markdown(rows, ratio, meta))
    return rows
