"""``quant`` benchmark task: KVzip eviction x int8/int4 quantization (issue 11), side by side on the same documents.

Methods (rows of results.json, task ``quant-squad`` / ``quant-needle``): ``full`` (ratio 1.0, not quantized),
``kvzip-pair@r`` (16 = the cache dtype), ``kvzip-pair-int8@r`` and ``kvzip-pair-int4@r``: KVzip pair level at ratio
``r``, quantized as ``compress(..., kv_bits=b)`` would (``kvzip_rag.quant`` defaults). Each document is prefilled and
scored once; every (ratio, bits) cache is cut and quantized from that.

- SQuAD: teacher-forced gold NLL of ``quant_squad_questions`` questions per document at ratio 0.3 (and the full
  cache), of the first ``quant_grid_questions`` at the other ratios; greedy answers (F1) of the first
  ``quant_answer_questions`` at ``quant_answer_ratios`` (answers cost ~25 forward passes, an NLL one).
- Needle: hit rate at ``quant_needle_ratios``.
- Bytes: the blob each cache is stored as (``variants``/``disk`` rows carry ``kv_bits``).
- Time to first token from a stored cache of ``ttft_length`` tokens: read the blob + first token, per bit width;
  and from memory, holding the quantized form (dequantize + first token) vs the dequantized form (first token).

``results["quant"]`` holds the pareto table (quality vs bytes per ratio x bits) and the TTFT rows; ``quant.png`` plots
them.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from kvzip_rag.compression import pack
from kvzip_rag.extras import pyplot
from kvzip_rag.prefill import prefill_document
from kvzip_rag.quant import quantize
from kvzip_rag.scorers import KVzipScorer

from . import data as bench_data
from . import measure
from .metrics import mean, median, median_interval, needle_hit, stderr
from .presets import main_ratio

BITS = (16, 8, 4)


def method_name(bits: int, ratio: float) -> str:
    if ratio >= 1.0 and bits == 16:
        return "full"
    return f"kvzip-pair@{ratio:g}" if bits == 16 else f"kvzip-pair-int{bits}@{ratio:g}"


def variants(base, ratios, bits_list=BITS):
    """(method, ratio, bits, cache) for every ratio x bits, cut from ``base`` (the pair-level cache at the highest
    ratio needed) and quantized at its own ratio, as compress(ratio=r, kv_bits=b) does."""
    for ratio in ratios:
        cut = base if ratio >= base.info.ratio else base.at_ratio(ratio)
        for bits in bits_list:
            yield method_name(bits, ratio), ratio, bits, cut if bits == 16 else quantize(cut, bits).dequantize()


def stored_nbytes(cache) -> dict:
    """Bytes of the cache as a store blob (template prefix kept once per model, apart) and as a standalone file."""
    from kvzip_rag.store.cachefile import encode_document

    store = len(encode_document(cache, shared_prefix=True).blob.data)
    standalone = len(encode_document(cache, shared_prefix=False).blob.data)
    return {"file_bytes": store, "standalone_file_bytes": standalone}


class QuantTask:
    def __init__(self, bench):
        self.bench, self.model, self.preset = bench, bench.model, bench.preset
        self.ttft: list[dict] = []

    def prepared(self, text: str):
        """(pair-level cache at the highest ratio needed, ratio-1.0 full cache), one prefill and one scoring pass."""
        document = prefill_document(self.model, text, scorer=KVzipScorer())
        scores = KVzipScorer().score(document)
        shape = scores.shape
        top = max(max(self.preset.quant_ratios), max(self.preset.quant_needle_ratios))
        base = pack(document, scores, top, "pair", "kvzip")
        full = pack(document, torch.zeros(shape), 1.0, "pair", "full")
        return base, full

    def record_bytes(self, task: str, doc_id: str, method: str, ratio: float, bits: int, cache, tokens: int) -> None:
        quantized = cache.quantized
        self.bench.variants.append({
            "task": task, "doc": doc_id, "method": method, "context_tokens": tokens, "kv_bits": bits,
            "nbytes": quantized.nbytes if quantized is not None else cache.nbytes, "full_nbytes": cache.full_nbytes,
            "kept_ratio": cache.kept_ratio,
        })
        self.bench.disk.append({"task": task, "doc": doc_id, "method": method, "ratio": ratio, "kv_bits": bits,
                                "context_tokens": tokens, "memory_bytes": cache.nbytes,
                                "full_memory_bytes": cache.full_nbytes, **stored_nbytes(cache)})
        self.bench.disk[-1]["file_bytes_per_token"] = self.bench.disk[-1]["file_bytes"] / tokens

    def squad(self) -> None:
        p, bench = self.preset, self.bench
        docs = bench_data.load_squad(bench.data_dir, bench.count, p.quant_squad_docs, p.squad_min_tokens,
                                     min(p.squad_max_tokens, bench.max_context()), p.quant_squad_questions,
                                     first_article=p.quant_first_article)
        for doc in docs:
            if bench.over_budget("quant-squad", doc.id):
                continue
            base, full = self.prepared(doc.text)
            bench.say(f"quant-squad {doc.id}: {base.info.context_length} tokens, {len(doc.questions)} questions")
            grid = [("full", 1.0, 16, full), *variants(base, p.quant_ratios)]
            main = main_ratio(p.quant_ratios)
            for method, ratio, bits, cache in grid:
                self.record_bytes("quant-squad", doc.id, method, ratio, bits, cache, base.info.context_length)
                answered = ratio in p.quant_answer_ratios or method == "full"
                for rank, question in enumerate(doc.questions):
                    if ratio not in (main, 1.0) and rank >= p.quant_grid_questions:
                        continue
                    if answered and rank < p.quant_answer_questions:
                        gen = measure.packed_answer(self.model, cache, question.question, p.max_new_tokens,
                                                    gold=question.answers[0])
                        bench.add_row("quant-squad", doc, question, method, gen, kv_bits=bits, ratio=ratio)
                    else:
                        nll = measure.packed_nll(self.model, cache, question.question, question.answers[0])
                        self.nll_only_row(doc, question, method, nll, bits, ratio)

    def nll_only_row(self, doc, question, method: str, nll, bits: int, ratio: float) -> None:
        """A row for a (ratio, bits) point where only the gold NLL was measured (no answer was generated)."""
        self.bench.rows.append({
            "task": "quant-squad-nll", "doc": doc.id, "qid": question.id, "method": method,
            "question": question.question, "answer": None, "gold": question.answers, "new_tokens": 0,
            "ttft_s": None, "decode_s": None, "s_per_token": None, "nll": nll, "em": None, "f1": None,
            "contains": None, "kv_bits": bits, "ratio": ratio,
        })

    def needle(self) -> None:
        p, bench, model = self.preset, self.bench, self.model
        haystack = bench_data.essays_text(bench.data_dir)
        limit = bench.max_context()
        encode = model.encode
        decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        question = bench_data.Question("needle", bench_data.NEEDLE_QUESTION,
                                       ["eat a sandwich and sit in Dolores Park on a sunny day"])
        cases = list(dict.fromkeys((min(length, limit), depth) for length, depth in p.quant_needle_cases))
        ttft_length = min(p.ttft_length, limit)
        if all(length != ttft_length for length, _ in cases):
            cases.append((ttft_length, 0.5))
        ttft_doc = next(f"needle:{n}@{d:g}" for n, d in cases if n == ttft_length)
        for length, depth in cases:
            doc_id = f"needle:{length}@{depth:g}"
            if bench.over_budget("quant-needle", doc_id):
                continue
            text = bench_data.needle_haystack(haystack, encode, decode, length, depth)
            while bench.count(text) > limit:
                length -= 32
                text = bench_data.needle_haystack(haystack, encode, decode, length, depth)
            doc = bench_data.Document(doc_id, text, bench.count(text), [question])
            base, full = self.prepared(text)
            bench.say(f"quant-needle {doc_id}: {base.info.context_length} tokens")
            grid = [("full", 1.0, 16, full), *variants(base, p.quant_needle_ratios)]
            timed = []
            for method, ratio, bits, cache in grid:
                self.record_bytes("quant-needle", doc.id, method, ratio, bits, cache, base.info.context_length)
                gen = measure.packed_answer(model, cache, question.question, p.needle_max_new_tokens,
                                            gold=question.answers[0])
                row = bench.add_row("quant-needle", doc, question, method, gen, kv_bits=bits, ratio=ratio)
                row["hit"] = needle_hit(gen.text)
                if doc_id == ttft_doc and ratio == main_ratio(p.quant_needle_ratios):
                    timed.append((method, ratio, bits, cache))
            if timed:
                self.measure_ttft(doc_id, timed)

    def measure_ttft(self, doc_id: str, timed: list) -> None:
        """Stored blob -> first token per bit width, and from memory holding the quantized vs the dequantized
        form. The bit widths take turns inside every repeat, so a change in the machine's load hits them alike."""
        from kvzip_rag.store.cachefile import read_cache, write_cache

        model, question = self.model, bench_data.NEEDLE_QUESTION
        paths = {bits: self.bench.scratch / f"quant-ttft-{bits}.safetensors" for _, _, bits, _ in timed}
        sizes = {bits: len(write_cache(cache, paths[bits]).blob.data) for _, _, bits, cache in timed}
        times = {bits: {"stored": [], "load": [], "cold": [], "cold_stored": [], "memory": [], "quantized_memory": []}
                 for _, _, bits, _ in timed}

        def clock(action) -> float:
            start = time.perf_counter()
            action()
            return time.perf_counter() - start

        def read_and_answer(path: Path, read: list, total: list) -> None:
            start = time.perf_counter()
            loaded = read_cache(path)
            read.append(time.perf_counter() - start)
            measure.first_token(model, loaded, question)
            total.append(time.perf_counter() - start)

        for _ in range(self.preset.ttft_repeats):
            for _, _, bits, cache in timed:
                t, path = times[bits], paths[bits]
                read_and_answer(path, t["load"], t["stored"])
                if _evict_from_page_cache(path):  # the same read from the disk itself
                    read_and_answer(path, t["cold"], t["cold_stored"])
                t["memory"].append(clock(lambda: measure.first_token(model, cache, question)))
                if cache.quantized is not None:
                    t["quantized_memory"].append(clock(
                        lambda: measure.first_token(model, cache.quantized.dequantize(), question)))
        best = lambda values: min(values) if values else None  # noqa: E731
        baseline = times.get(16)

        def paired(t: dict, key: str):
            """Median (95% interval) of this width's time minus the 16-bit one, repeat by repeat."""
            if baseline is None or t is baseline:
                return None
            return median_interval([a - b for a, b in zip(t[key], baseline[key])])

        for method, ratio, bits, cache in timed:
            t = times[bits]
            self.ttft.append({
                "doc": doc_id, "context_tokens": cache.info.context_length, "method": method, "ratio": ratio,
                "kv_bits": bits, "file_bytes": sizes[bits], "load_s": best(t["load"]), "cold_load_s": best(t["cold"]),
                "stored_first_token_s": best(t["stored"]), "in_memory_first_token_s": best(t["memory"]),
                "quantized_in_memory_first_token_s": best(t["quantized_memory"]),
                "cold_stored_first_token_s": best(t["cold_stored"]),
                "median_load_s": statistics.median(t["load"]), "repeats": len(t["load"]),
                "median_stored_first_token_s": median(t["stored"]),
                "median_cold_stored_first_token_s": median(t["cold_stored"]),
                "stored_minus_16bit_s": paired(t, "stored"), "cold_stored_minus_16bit_s": paired(t, "cold_stored"),
                "samples": {key: values for key, values in t.items() if values},
                "memory_bytes_dequantized": cache.nbytes,
                "memory_bytes_quantized": cache.quantized.nbytes if cache.quantized is not None else cache.nbytes,
                "note": "best of repeats, bit widths interleaved; standalone file (prefix inline); load_s with the "
                        "file in the page cache, cold_* after evicting its pages; *_minus_16bit_s: median of the "
                        "per-repeat differences to the 16-bit blob with a 95% bootstrap interval",
            })
            paths[bits].unlink()

    def run(self) -> dict:
        """The quant task's summary (kept as ``results["quant"]``); its rows go into the bench's tables."""
        for part in (self.squad, self.needle):
            try:
                part()
            except FileNotFoundError as error:
                self.bench.skipped[f"quant-{part.__name__}"] = f"data not found: {error}"
        return summarize(self.bench.rows, self.bench.variants, self.bench.disk, self.ttft)


def _evict_from_page_cache(path: Path) -> bool:
    """Drop this one file's pages from the OS page cache (posix_fadvise), so the next read comes from the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def summarize(rows: list[dict], variants_: list[dict], disk: list[dict], ttft: list[dict]) -> dict:
    """Pareto table: per (ratio, bits) the SQuAD gold NLL (and its difference to the unquantized cache of the same
    ratio, paired per question), F1, needle hits and bytes (store blob / full cache)."""
    squad = [r for r in rows if r["task"] in ("quant-squad", "quant-squad-nll")]
    needle = [r for r in rows if r["task"] == "quant-needle"]
    by = lambda items, m: [r for r in items if r["method"] == m]  # noqa: E731
    nll16 = {(r["doc"], r["qid"], r.get("ratio")): r["nll"] for r in squad if r.get("kv_bits") == 16}
    points = sorted({(r["method"], r.get("ratio"), r.get("kv_bits")) for r in squad + needle},
                    key=lambda x: (-(x[1] or 0), -(x[2] or 0)))
    # the questions every point has an NLL for: the only fair comparison across ratios
    measured = [{(r["doc"], r["qid"]) for r in by(squad, m) if r["nll"] is not None} for m, _, _ in points]
    common = set.intersection(*measured) if measured and all(measured) else set()
    table = []
    for method, ratio, bits in points:
        items = by(squad, method)
        deltas = [r["nll"] - nll16[(r["doc"], r["qid"], ratio)] for r in items
                  if r["nll"] is not None and nll16.get((r["doc"], r["qid"], ratio)) is not None]
        files = [d for d in disk if d["method"] == method and d["task"] == "quant-squad"]
        table.append({
            "method": method, "ratio": ratio, "kv_bits": bits, "n_nll": len([r for r in items if r["nll"] is not None]),
            "nll": mean(r["nll"] for r in items), "nll_minus_16bit": mean(deltas) if bits != 16 else None,
            "n_common": len(common), "nll_common": mean(r["nll"] for r in items if (r["doc"], r["qid"]) in common),
            "nll_minus_16bit_se": stderr(deltas) if bits != 16 else None,
            "n_f1": len([r for r in items if r["f1"] is not None]), "f1": mean(r["f1"] for r in items),
            "needle_hit": mean(r["hit"] for r in by(needle, method)), "n_needle": len(by(needle, method)),
            "file_vs_full": mean(d["file_bytes"] / d["full_memory_bytes"] for d in files),
            "standalone_file_vs_full": mean(d["standalone_file_bytes"] / d["full_memory_bytes"] for d in files),
            "kv_vs_full": mean(v["nbytes"] / v["full_nbytes"] for v in variants_
                               if v["method"] == method and v["task"] == "quant-squad"),
        })
    return {"pareto": table, "ttft": ttft}


def markdown(results: dict) -> list[str]:
    quant = results.get("quant")
    if not quant:
        return []
    lines = ["", "## Quantized caches (task quant)", "",
             "| method | ratio | bits | n NLL | gold NLL | NLL - 16 bit (se) | NLL, questions common to all points "
             "| n F1 | F1 | needle | store blob / full | standalone file / full |", "|" + "---|" * 12]
    f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    for p in quant["pareto"]:
        delta = "-" if p["nll_minus_16bit"] is None else \
            f"{p['nll_minus_16bit']:+.4f} ({f(p['nll_minus_16bit_se'], 4)})"
        common = f"{f(p['nll_common'])} (n = {p['n_common']})"
        lines.append(f"| {p['method']} | {p['ratio']:g} | {p['kv_bits']} | {p['n_nll']} | {f(p['nll'])} | {delta} | "
                     f"{common} | "
                     f"{p['n_f1']} | {f(p['f1'])} | {f(p['needle_hit'], 2)} ({p['n_needle']}) | "
                     f"{f(p['file_vs_full'], 4)} | {f(p['standalone_file_vs_full'], 4)} |")
    if quant["ttft"]:
        lines += ["", "| TTFT, stored cache | tokens | bits | file MB | read + 1st token ms | read ms | read from disk "
                  "(not page cache) ms | disk read + 1st token ms | in memory ms | in memory, quantized form "
                  "(dequantize + 1st token) ms | TTFT - 16 bit, page cache / disk: median [95% CI] ms |",
                  "|" + "---|" * 11]
        ms = lambda v: "-" if v is None else f"{v * 1e3:.1f}"  # noqa: E731
        ci = lambda d: "-" if not d else f"{d[0] * 1e3:+.1f} [{d[1] * 1e3:+.1f}, {d[2] * 1e3:+.1f}]"  # noqa: E731
        for t in quant["ttft"]:
            lines.append(f"| {t['method']} | {t['context_tokens']} | {t['kv_bits']} | {t['file_bytes'] / 1e6:.2f} | "
                         f"{ms(t['stored_first_token_s'])} | {ms(t['load_s'])} | {ms(t.get('cold_load_s'))} | "
                         f"{ms(t.get('cold_stored_first_token_s'))} | "
                         f"{ms(t['in_memory_first_token_s'])} | {ms(t['quantized_in_memory_first_token_s'])} | "
                         f"{ci(t.get('stored_minus_16bit_s'))} / {ci(t.get('cold_stored_minus_16bit_s'))} |")
        lines.append("\nBest of the repeats; the last column pairs each repeat with the 16-bit blob's.")
    return lines


def plot(results: dict, out_dir: Path) -> Path | None:
    quant = results.get("quant")
    if not quant or not quant["pareto"]:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for bits, marker in ((16, "o"), (8, "s"), (4, "^")):
        points = sorted((p["file_vs_full"], p["nll_common"], p["f1"], p["ratio"]) for p in quant["pareto"]
                        if p["kv_bits"] == bits and p["method"] != "full" and p["file_vs_full"] is not None)
        if not points:
            continue
        for ax, col in ((axes[0], 1), (axes[1], 2)):
            pts = [(x[0], x[col], x[3]) for x in points if x[col] is not None]
            ax.plot([x[0] for x in pts], [x[1] for x in pts], marker=marker, label=f"{bits} bit")
            for x, y, r in pts:
                ax.annotate(f"{r:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    full = next((p for p in quant["pareto"] if p["method"] == "full"), None)
    if full and full["nll_common"] is not None:
        axes[0].axhline(full["nll_common"], color="k", linestyle="--", label="full cache")
        if full["f1"] is not None:
            axes[1].axhline(full["f1"], color="k", linestyle="--", label="full cache")
    n = quant["pareto"][0]["n_common"]
    for ax, label in ((axes[0], f"mean gold NLL, {n} common questions (lower: better)"),
                      (axes[1], "F1")):
        ax.set(xlabel="store blob bytes / full cache bytes", ylabel=label, xlim=(0, None))
        ax.legend(fontsize=8)
    axes[0].set_title("SQuAD: quality vs bytes, ratio x bits (labels: ratio)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "quant.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
