"""Markdown tables and matplotlib plots from a results dict (``results.json``)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

from kvzip_rag.extras import pyplot

from . import fidelity
from .methods import parse_method

PLOT_FAMILIES = ("kvzip-pair", "kvzip-uniform", "kvzip-head", "snapkv", "h2o", "keynorm", "random")


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _load(values) -> str:
    return "-" if not values else ", ".join(f"{v:.1f}" for v in values)


def _ms(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def _target_value(t: dict) -> str:
    value = t["value"]
    if isinstance(value, list):
        return "; ".join(f"r={m['ratio']:g}: {m['margin']:+.3f} vs {m['vs']}" for m in value) or "-"
    if isinstance(value, dict):
        return (f"F1 {value['f1']:.3f} vs {value['f1_chunk_rag']:.3f}; TTFT {_ms(value['ttft_s'])} ms vs "
                f"{_ms(value['ttft_s_chunk_rag'])} ms")
    return _f(value)


def qa_section(task: str, title: str) -> Callable[[dict], list[str]]:
    """The report section of a question-answering task over single documents (squad, narrativeqa)."""

    def section(results: dict) -> list[str]:
        quality, memory = results["summary"]["quality"], results["summary"]["bytes"]["memory"]
        if task not in quality:
            return []
        lines = [f"## {title}", ""]
        rows = []
        for method, q in quality[task].items():
            mem = memory.get(task, {}).get(method, {})
            rows.append([
                f"`{method}`", str(q["n"]), _f(q["em"]), _f(q["f1"]) + (f" ± {q['f1_se']:.3f}" if q["f1_se"] else ""),
                _f(q["f1_vs_full"], 2), _f(q["contains"]), _f(q["agree_f1"]), _f(q["nll"]),
                _f(q["nll_minus_full"]), _ms(q["ttft_s"]), _f(q["ttft_vs_reprefill"], 2), _ms(q["s_per_token"]),
                _f(mem.get("memory_vs_full"), 3),
            ])
        return lines + _table(["method", "n", "EM", "F1 ± se", "F1/full", "contains", "agree F1 w/ full", "NLL",
                               "NLL - full", "TTFT ms", "TTFT/reprefill", "ms/token", "bytes/full"], rows) + [""]

    return section


def multidoc_section(results: dict) -> list[str]:
    """Composed caches over several documents (HotpotQA) and the cross-segment needle."""
    quality, lines = results["summary"]["quality"], []
    for task, title in (("multidoc", "Multi-document questions (HotpotQA distractor, composed caches)"),
                        ("multidoc-needle", "Cross-segment needle (two facts in two segments of one essay)")):
        if task in quality:
            lines += [f"## {title}", ""]
            rows = [[f"`{m}`", str(q["n"]) + (f" ({q['n_answered']} answered)" if q.get("n_answered") not in
                                                (None, q["n"]) else ""), _f(q["f1"]), _f(q.get("f1_vs_oracle"), 2), _f(q["contains"]),
                     _f(q.get("both"), 2), _f(q["nll"]), _f(q.get("nll_minus_oracle")), _ms(q["ttft_s"]),
                     _f(q.get("ttft_speedup_vs_oracle"), 1), _f((q.get("bytes_loaded") or 0) / 1e6, 2),
                     _f((q.get("cache_bytes") or 0) / 1e6, 2), _f(q.get("routed_gold"), 2)] for m, q in quality[task].items()]
            lines += _table(["method", "n", "F1", "F1/oracle", "contains", "both facts", "NLL", "NLL - oracle",
                             "TTFT ms", "oracle TTFT / TTFT", "MB read", "MB in memory", "gold docs routed"], rows) + [""]
    return lines


def needle_section(results: dict) -> list[str]:
    """Needle in a haystack: accuracy per method and haystack length."""
    quality, preset = results["summary"]["quality"], results["meta"]["preset"]
    if "needle" not in quality:
        return []
    needle = quality["needle"]
    lengths = sorted({n for q in needle.values() for n in q.get("hit_by_length", {})})
    lines = ["## Needle in a haystack (Paul Graham essays)", "",
             f"Cases (length, depth): {[tuple(c) for c in preset.get('needle_cases', ())]} (lengths clamped to the model's "
             "window); one question per haystack; a hit is an answer mentioning the sandwich or Dolores Park.", ""]
    rows = [[f"`{m}`", str(q["n"]), _f(q["hit"], 2), _f(q["hit_vs_full"], 2), _f(q["agree_f1"]),
             *(_f(q["hit_by_length"].get(n), 2) for n in lengths), _f(q["nll"]), _ms(q["ttft_s"])]
            for m, q in needle.items()]
    return lines + _table(["method", "n", "accuracy", "acc/full", "agree F1 w/ full",
                           *(f"acc @{n}" for n in lengths), "NLL", "TTFT ms"], rows) + [""]


def fidelity_section(results: dict) -> list[str]:
    return fidelity.markdown(results["summary"])


def quant_section(results: dict) -> list[str]:
    from .quant import markdown as quant_markdown

    return quant_markdown(results)


# The sections of the tasks that share results.md, by task, in the report's order (a task without results: none).
SECTIONS: dict[str, Callable[[dict], list[str]]] = {
    "fidelity": fidelity_section,
    "squad": qa_section("squad", "SQuAD (one compressed cache per document, all its questions)"),
    "narrativeqa": qa_section("narrativeqa", "NarrativeQA summaries"),
    "multidoc": multidoc_section,
    "needle": needle_section,
    "quant": quant_section,
}


def markdown(results: dict, command: str | None = None,
             sections: Iterable[Callable[[dict], list[str]]] | None = None) -> str:
    """results.md: the run, the targets, each task's section (``sections``: those of the tasks run, default every
    task's that has results), then the costs all tasks share."""
    meta, summary = results["meta"], results["summary"]
    machine = meta["machine"]
    preset = meta["preset"]
    lines = [
        f"# kvzip-rag benchmark ({preset['name']} preset)",
        "",
        f"- model: `{meta['model']}` on {meta['device']} ({meta['dtype']}), torch threads {meta['torch_threads']}",
        f"- machine: {machine['nproc']} CPUs ({machine['cpu']}), {machine['ram_gib']} GiB RAM, "
        f"torch {machine['torch']}, load average at end {_load(machine.get('loadavg_at_end'))}"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else ""),
        f"- duration: {meta['duration_s'] / 60:.1f} min; data: `{meta['data_dir']}`; embedding for chunk retrieval: "
        f"{meta['embedding']}",
    ]
    if command:
        lines.append(f"- command: `{command}`")
    if meta.get("skipped"):
        lines.append(f"- skipped: {meta['skipped']}")
    lines += ["", "Ratios are to the baseline measured in the same run (full cache for quality, re-prefill for time to "
              "first token, the DynamicCache full cache for decode). `n` is the number of questions.", ""]

    lines += ["## Targets", ""]
    rows = [[t["target"], _target_value(t), _f(t["threshold"], 2), _f(t["met"]) if t["met"] is not None else "n/a",
             _f(t["n"]), (t["measured"] + ("; " + t["note"] if t["note"] else ""))] for t in summary["targets"]]
    lines += _table(["target", "measured", "threshold", "met", "n", "how"], rows) + [""]

    memory = summary["bytes"]["memory"]
    for section in sections if sections is not None else SECTIONS.values():
        lines += section(results)

    lines += ["## Costs", "", "### Prefill and scoring (per scorer, over all documents)", ""]
    rows = [[f"`{s}`", str(v["n_docs"]), str(v["tokens"]), _f(v["prefill_s"], 2), _f(v.get("scoring_s"), 2),
             _f(v.get("overhead"), 2), _f(v["index_tokens_per_s"], 0)]
            for s, v in summary["scoring"].items()]
    lines += _table(["scorer", "docs", "context tokens", "prefill s", "scoring s", "(prefill+scoring)/prefill",
                     "indexing tokens/s"], rows)
    chunk = summary["indexing_chunk_rag"]
    lines += ["", f"Chunk retrieval indexing ({meta['embedding']} embeddings + VectorStoreIndex, chunks of "
              f"{preset['chunk_tokens']} tokens): {_f(chunk['tokens_per_s'], 0)} tokens/s over {chunk['n_docs']} "
              f"documents (embedding model load {_f(meta.get('embedding_load_s'), 1)} s, not included). KVzip head "
              f"level: no per-document scoring; its head scores are calibrated once per model "
              f"({_f(meta.get('head_calibration_s'), 2)} s in this run; near 0 when already cached on disk).", ""]

    if summary["decode"]:
        lines += ["### Per-token decode latency vs context length", ""]
        methods = sorted({k for row in summary["decode"].values() for k in row if not k.endswith("_vs_dense")},
                         key=lambda m: (m != "dense-full", m != "packed-full", m))
        rows = [[str(n), *(_ms(row.get(m)) for m in methods),
                 *(_f(row.get(f"{m}_vs_dense"), 2) for m in methods if m != "dense-full")]
                for n, row in summary["decode"].items()]
        lines += _table(["context tokens", *(f"{m} ms" for m in methods),
                         *(f"{m}/dense" for m in methods if m != "dense-full")], rows) + [""]

    if summary["ttft"]:
        lines += ["### Time to first token: stored cache vs re-prefill", ""]
        rows = [[str(t["context_tokens"]), f"`{t['method']}`", _ms(t.get("reprefill_ttft_s")), _ms(t.get("load_s")),
                 _ms(t.get("stored_first_token_s")), _ms(t.get("in_memory_first_token_s")),
                 _f(t.get("speedup_stored_vs_reprefill"), 1), _f(t.get("speedup_in_memory_vs_reprefill"), 1)]
                for t in summary["ttft"]]
        lines += _table(["context tokens", "cache", "re-prefill ms", "read_blob ms", "read_blob + first token ms",
                         "in memory first token ms", "speed-up stored", "speed-up in memory"], rows) + [""]

    lines += ["### Cache bytes", ""]
    rows = []
    for task, methods in memory.items():
        for method, m in methods.items():
            if method in ("full",) or parse_method(method)[0] in ("kvzip-pair",):
                rows.append([task, f"`{method}`", str(m["n_docs"]), _f(m["memory_vs_full"]),
                             _f(m["memory_bytes_per_token"], 0)])
    lines += _table(["task", "method", "docs", "memory / full", "memory bytes per context token"], rows) + [""]
    if summary["bytes"]["disk"]:
        rows = [[d["doc"], f"`{d['method']}`", str(d["context_tokens"]), _f(d["file_bytes_per_token"], 0),
                 _f(d["file_vs_full_memory"]), _f(d["file_vs_memory"]), _f(d.get("store_vs_full_memory"))]
                for d in summary["bytes"]["disk"]]
        lines += _table(["document", "method", "context tokens", "file bytes per token", "file / full in memory",
                         "file / same cache in memory", "in a CacheStore / full (prefix shared)"], rows) + [""]

    mem = meta["memory"]
    lines += ["### Memory", "", "Peak resident set size of the benchmark process after each phase (MiB; one process "
              "holds the model and every method, so this is an upper bound, not a per-method figure):", ""]
    lines += _table(["phase", "peak RSS MiB", "RSS now MiB"],
                    [[k.removeprefix("peak_rss_mb_after_"), _f(v, 0), _f(mem.get(k.replace("peak_rss", "rss")), 0)]
                     for k, v in mem.items() if k.startswith("peak_rss")]) + [""]
    lines += ["## Plots", "", "![SQuAD quality vs ratio](squad_quality.png)", "", "![Needle](needle.png)", "",
              "![Decode latency](decode_latency.png)", "", "![Time to first token](ttft.png)", ""]
    return "\n".join(lines)


def plots(results: dict, out_dir: Path) -> list[Path]:
    plt = pyplot()
    summary = results["summary"]
    written = []
    quality = summary["quality"]

    squad = quality.get("squad", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for family in PLOT_FAMILIES:
        points = sorted((q["ratio"], q["f1"], q["nll"]) for m, q in squad.items() if q["family"] == family)
        if points:
            xs = [p[0] for p in points]
            axes[0].plot(xs, [p[1] for p in points], marker="o", label=family)
            axes[1].plot(xs, [p[2] for p in points], marker="o", label=family)
    for ref, style in (("full", "k--"), ("reprefill", "k:"), ("chunk-rag", "r-.")):
        if ref in squad:
            axes[0].axhline(squad[ref]["f1"], color=style[0], linestyle=style[1:], label=ref)
            if squad[ref]["nll"] is not None:
                axes[1].axhline(squad[ref]["nll"], color=style[0], linestyle=style[1:], label=ref)
    n = squad.get("full", {}).get("n", 0)
    axes[0].set(xlabel="ratio (fraction of KV pairs kept)", ylabel="F1", title=f"SQuAD F1 (n={n} questions)")
    axes[1].set(xlabel="ratio (fraction of KV pairs kept)", ylabel="mean NLL of gold answer",
                title="Teacher-forced NLL (lower is better)")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "squad_quality.png"))

    needle = quality.get("needle", {})
    methods = [m for m in needle if m != "reprefill"]
    lengths = sorted({int(n) for q in needle.values() for n in q.get("hit_by_length", {})})
    grid = [[{int(n): v for n, v in needle[m].get("hit_by_length", {}).items()}.get(n) for n in lengths]
            for m in methods]
    fig, ax = plt.subplots(figsize=(1.3 * max(len(lengths), 2) + 3, 0.38 * max(len(methods), 2) + 1.4))
    if methods and lengths:
        values = [[float("nan") if v is None else v for v in row] for row in grid]
        ax.imshow(values, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, "-" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(methods)), methods, fontsize=8)
    n = needle.get("full", {}).get("n", 0)
    ax.set(xlabel="context tokens", title=f"Needle accuracy (n={n} haystacks)")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "needle.png"))

    decode = summary["decode"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    methods = sorted({k for row in decode.values() for k in row if not k.endswith("_vs_dense")})
    for method in methods:
        points = sorted((int(n), row[method]) for n, row in decode.items() if row.get(method) is not None)
        ax.plot([p[0] for p in points], [p[1] * 1000 for p in points], marker="o", label=method)
    ax.set(xlabel="context tokens", ylabel="ms per decoded token", title="Decode latency vs context length")
    if methods:
        ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(_save(fig, out_dir / "decode_latency.png"))

    labels, values = [], []
    seen_reprefill = set()
    for t in summary["ttft"]:
        n = t["context_tokens"]
        if t.get("reprefill_ttft_s") is not None and n not in seen_reprefill:
            seen_reprefill.add(n)
            labels.append(f"re-prefill, {n} tok")
            values.append(t["reprefill_ttft_s"] * 1000)
        if t.get("stored_first_token_s") is not None:
            labels.append(f"stored {t['method']}: read_blob + 1st token, {n} tok")
            values.append(t["stored_first_token_s"] * 1000)
        if t.get("in_memory_first_token_s") is not None:
            labels.append(f"in memory {t['method']}: 1st token, {n} tok")
            values.append(t["in_memory_first_token_s"] * 1000)
    rag = squad.get("chunk-rag")
    if rag and rag.get("ttft_s") is not None:
        labels.append("chunk-rag: retrieve + prefill + 1st token (SQuAD median)")
        values.append(rag["ttft_s"] * 1000)
    fig, ax = plt.subplots(figsize=(8, 0.45 * max(len(values), 2) + 1.2))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.set_yticks(range(len(values)), labels, fontsize=8)
    ax.invert_yaxis()
    if values and min(values) > 0:
        ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.0f} ms", va="center", fontsize=7)
    ax.set(xlabel="ms (log scale)", title="Time to first token")
    fig.tight_layout()
    written.append(_save(fig, out_dir / "ttft.png"))
    from .quant import plot as quant_plot

    return written + [p for p in [quant_plot(results, out_dir), fidelity.plot(results, out_dir)] if p]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def render(results_path: Path, out_dir: Path | None = None) -> Path:
    """Re-write the summary in results.json, results.md and the plots from a results.json (e.g. after editing the
    report code, or merging runs)."""
    import json

    from dataclasses import fields

    from .presets import Preset
    from .summary import summarize

    results = json.loads(Path(results_path).read_text())
    known = {f.name for f in fields(Preset)}
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in results["meta"]["preset"].items() if k in known}
    settings.setdefault("needle_cases", ())
    results["summary"] = summarize(results, Preset(**settings))
    out_dir = Path(out_dir) if out_dir else Path(results_path).parent
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))  # with the summary recomputed
    (out_dir / "results.md").write_text(markdown(results, results["meta"].get("command")))
    plots(results, out_dir)
    return out_dir / "results.md"


if __name__ == "__main__":
    import sys

    print(render(Path(sys.argv[1])))
