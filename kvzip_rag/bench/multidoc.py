"""Benchmark task ``multidoc``: questions whose evidence sits in several documents, answered from one composed cache.

- HotpotQA distractor (``../shared/data/hotpotqa``): the 10 paragraphs of a question are its documents. BM25 routes
  the top ``multidoc_k`` of them; each routed paragraph is prefilled and KVzip-scored once, stored as a ratio-1.0
  blob, and read back at every ratio (a stored blob serves any lower ratio by reading row prefixes).
- Cross-segment needle (task ``multidoc-needle``): two facts inserted in different segments of one long essay,
  one question needing both; BM25 routes the top ``multidoc_k`` segments, composed in document order.

Methods, side by side on the same routed documents, in the same order:

- ``composed-{parallel,sequential}@r`` (and ``composed-sequential-repair@r``): the stored blobs read at ratio ``r``,
  composed (``kvzip_rag.compose``), one answer. TTFT counts reading the blobs, composing and the question.
  Repair does not apply to the parallel layout (each document's first tokens already see exactly their prefix).
- ``best-of-k@r``: every routed document's cache answers alone; the answer with the best mean log-probability wins
  (``compose="best-of-k"``; ``similarity_top_k > 1`` composes in parallel by default). Its TTFT is the time until
  the winner is known (all k answers), its NLL the gold answer's under the winning cache.
- ``chunk-rag``: LlamaIndex ``VectorStoreIndex`` over the chunks of all the question's documents, top ``k`` chunks
  prefilled with the question by the same LLM (TTFT includes retrieval, not indexing).
- ``oracle``: no stored cache: the prefix and the routed documents' tokens (the exact token sequence the sequential
  layout represents) re-prefilled with the question.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections import Counter
from pathlib import Path

import kvzip_rag
from kvzip_rag.cache import PackedCache
from kvzip_rag.compose import compose
from kvzip_rag.compression import pack
from kvzip_rag.prefill import prefill_document
from kvzip_rag.scorers import KVzipScorer

from . import data as bench_data
from . import measure

FACT_PAIRS = (
    ("The first secret code word of the expedition is amber.", "The second secret code word of the expedition is "
     "falcon.", "What are the two secret code words of the expedition?", ("amber", "falcon")),
    ("Maria's bakery opened in the year 1987.", "Maria's bakery is located on Cedar Street.",
     "When did Maria's bakery open, and on which street is it?", ("1987", "cedar street")),
    ("The lighthouse keeper's cat is called Pepper.", "The lighthouse keeper's dog is called Biscuit.",
     "What are the names of the lighthouse keeper's cat and dog?", ("pepper", "biscuit")),
    ("The annual chess tournament starts on a Monday.", "The annual chess tournament is held in Geneva.",
     "On which day does the annual chess tournament start, and in which city is it held?", ("monday", "geneva")),
)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def bm25_rank(query: str, documents: list[str], k1: float = 1.5, b: float = 0.75) -> list[int]:
    """Document indices by Okapi BM25 score for ``query``, best first (ties keep document order)."""
    bags = [Counter(_words(d)) for d in documents]
    lengths = [sum(bag.values()) for bag in bags]
    average = sum(lengths) / max(len(lengths), 1)
    df = Counter(word for bag in bags for word in bag)
    n = len(documents)

    def score(i: int) -> float:
        total = 0.0
        for word in set(_words(query)):
            tf = bags[i].get(word, 0)
            if tf:
                idf = math.log(1 + (n - df[word] + 0.5) / (df[word] + 0.5))
                total += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / average))
        return total

    return sorted(range(n), key=lambda i: -score(i))


def load_hotpotqa(data_dir: Path, count: int, first: int = 0) -> list[dict]:
    path = data_dir / "hotpotqa" / "distractor-sample-0-49.jsonl"
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return items[first : first + count]


def paragraph_text(title: str, sentences: list[str]) -> str:
    """One HotpotQA paragraph as a document; the trailing newline separates documents when concatenated."""
    return f"{title}: {''.join(sentences).strip()}\n"


class StoredDocument:
    """A routed document: prefilled and KVzip-scored once, stored as a standalone ratio-1.0 cache file (its prompt
    prefix included: the store shares it between documents, so the bytes read here are an upper bound)."""

    def __init__(self, bench, text: str, name: str):
        from kvzip_rag.store.cachefile import write_cache

        model = bench.model
        start = time.perf_counter()
        scorer = KVzipScorer()
        document = prefill_document(model, text, scorer=scorer)
        cache = pack(document, scorer.score(document), 1.0, "pair", scorer.name)
        self.compress_s = time.perf_counter() - start
        self.ids = list(cache.info.input_ids)
        self.prefix_length = cache.info.prefix_length
        self.path = bench.scratch / f"{name}.safetensors"
        self.file_bytes = write_cache(cache, self.path).nbytes

    def load(self, model, ratio: float) -> tuple[PackedCache, int]:
        """(cache at ``ratio``, bytes read from the blob)."""
        from kvzip_rag.store.blob import ReadStats
        from kvzip_rag.store.cachefile import read_cache

        stats = ReadStats()
        cache = read_cache(self.path, ratio=ratio if ratio < 1 else None, stats=stats)
        cache.info.check_model(model)
        return cache, stats.nbytes

    def unlink(self) -> None:
        self.path.unlink(missing_ok=True)


def composed_methods(preset) -> list[tuple[str, str, int, float]]:
    """(name, layout, repair tokens, ratio) of every composed method of the run."""
    out = []
    for r in preset.multidoc_ratios:
        out.append((f"composed-parallel@{r:g}", "parallel", 0, r))
        out.append((f"composed-sequential@{r:g}", "sequential", 0, r))
        if preset.multidoc_repair:
            out.append((f"composed-sequential-repair@{r:g}", "sequential", preset.multidoc_repair, r))
    return out


def answer_question(bench, task: str, doc: bench_data.Document, question: bench_data.Question,
                    routed: list[StoredDocument], chunk_context, extra: dict) -> None:
    """Every method on one question over its routed documents."""
    model, p = bench.model, bench.preset
    gold = question.answers[0]
    max_new = p.multidoc_max_new_tokens if task == "multidoc" else p.needle_max_new_tokens
    if p.multidoc_nll_only:  # first token and gold NLL only: no answer to score, no best-of-k (it needs answers)
        max_new = 1
        start_row = len(bench.rows)
    for name, layout, repair, r in composed_methods(p):
        start = time.perf_counter()
        loaded = [d.load(model, r) for d in routed]
        composed = compose(model, [c for c, _ in loaded], layout=layout, repair=repair)
        ready = time.perf_counter() - start
        answer = kvzip_rag.answer(model, composed, question.question, max_new_tokens=max_new)
        gen = measure.Generation(answer.text, len(answer.token_ids), ready + answer.time_to_first_token_s,
                                 answer.decode_s, measure.packed_nll(model, composed, question.question, gold))
        bench.add_row(task, doc, question, name, gen, bytes_loaded=sum(n for _, n in loaded), compose_s=ready,
                      cache_bytes=composed.nbytes,
                      used=list(composed.composition.used), dropped=list(composed.composition.dropped),
                      composed_entries_ratio=composed.kept_ratio, **extra)
    for r in () if p.multidoc_nll_only else p.multidoc_best_of_k_ratios:
        start = time.perf_counter()
        best = None
        loaded_bytes = cache_bytes = 0
        for d in routed:
            cache, nbytes = d.load(model, r)
            loaded_bytes += nbytes
            cache_bytes += cache.nbytes
            answer = kvzip_rag.answer(model, cache, question.question, max_new_tokens=max_new)
            score = answer.mean_logprob if answer.mean_logprob is not None else -math.inf
            if best is None or score > best[0]:
                best = (score, answer, cache)
        known = time.perf_counter() - start
        _, answer, cache = best
        gen = measure.Generation(answer.text, len(answer.token_ids), known, answer.decode_s,
                                 measure.packed_nll(model, cache, question.question, gold))
        bench.add_row(task, doc, question, f"best-of-k@{r:g}", gen, bytes_loaded=loaded_bytes,
                      cache_bytes=cache_bytes, **extra)
    if chunk_context is not None:
        gen, retrieval_s, prompt_tokens = measure.chunk_answer(model, chunk_context, question.question, max_new,
                                                               gold=gold)
        bench.add_row(task, doc, question, "chunk-rag", gen, prompt_tokens=prompt_tokens, retrieval_s=retrieval_s,
                      bytes_loaded=0, **extra)
    ids = routed[0].ids[: routed[0].prefix_length] + [t for d in routed for t in d.ids[d.prefix_length:]]
    ids += measure.question_ids(model, question.question)
    gen = measure.dense_answer(model, ids, max_new, gold=gold)
    bench.add_row(task, doc, question, "oracle", gen, prompt_tokens=len(ids), bytes_loaded=0, **extra)
    if p.multidoc_nll_only:
        for row in bench.rows[start_row:]:
            row.update(answer=None, em=None, f1=None, contains=None, new_tokens=None, decode_s=None,
                       s_per_token=None, nll_only=True)


def _chunk_context(bench, text: str):
    """A chunk retriever over ``text`` (top ``multidoc_k`` chunks), or None when chunk retrieval is unavailable."""
    embed = bench.chunk_embedder()
    if embed is None:
        return None
    from .retrieval import ChunkRetriever

    p = bench.preset
    return ChunkRetriever(text, embed, bench.count, p.chunk_tokens, p.chunk_overlap, p.multidoc_k).context


def run_hotpotqa(bench) -> None:
    p = bench.preset
    items = load_hotpotqa(bench.data_dir, p.multidoc_questions, p.multidoc_first)
    if p.multidoc_indices:
        items = [item for i, item in enumerate(load_hotpotqa(bench.data_dir, 10**6)) if i in p.multidoc_indices]
    for n, item in enumerate(items):
        texts = [paragraph_text(title, sentences) for title, sentences in item["context"]]
        titles = [title for title, _ in item["context"]]
        order = bm25_rank(item["question"], texts)[: p.multidoc_k]
        gold_titles = {title for title, _ in item["supporting_facts"]}
        routed_gold = len(gold_titles & {titles[i] for i in order})
        question = bench_data.Question(item["_id"], item["question"], [item["answer"]])
        doc = bench_data.Document(f"hotpotqa:{item['_id']}", "".join(texts), 0, [question],
                                  {"routed": [titles[i] for i in order]})
        routed = [StoredDocument(bench, texts[i], f"hp{n}-{i}") for i in order]
        extra = {"routed_gold": routed_gold, "gold_paragraphs": len(gold_titles), "type": item["type"],
                 "compress_s": sum(d.compress_s for d in routed), "file_bytes": sum(d.file_bytes for d in routed)}
        answer_question(bench, "multidoc", doc, question, routed, _chunk_context(bench, "\n".join(texts)), extra)
        for d in routed:
            d.unlink()
        bench.say(f"multidoc {n + 1}/{len(items)}: routed {routed_gold}/{len(gold_titles)} gold paragraphs")
        if p.multidoc_checkpoint:
            Path(p.multidoc_checkpoint).write_text(json.dumps({"rows": bench.rows}, default=str))


def run_needle(bench) -> None:
    """Two facts in different segments of one essay; the segments routed by BM25 and composed in document order."""
    p, model = bench.preset, bench.model
    haystack = bench_data.essays_text(bench.data_dir)
    decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)
    hay_ids = model.encode(haystack[: 400_000])
    size, count = p.multidoc_segment_tokens, p.multidoc_segments
    for case in range(p.multidoc_needle_cases):
        first, second, asked, keywords = FACT_PAIRS[case % len(FACT_PAIRS)]
        begin = case * size * count
        segments = [decode(hay_ids[begin + i * size : begin + (i + 1) * size]) for i in range(count)]
        at_a, at_b = case % 2, count - 1 - (case % 3)  # two different segments, varied by case
        for at, fact in ((at_a, first), (at_b, second)):
            middle = segments[at].rfind(". ", 0, len(segments[at]) // 2) + 1
            segments[at] = f"{segments[at][:middle]} {fact} {segments[at][middle:].lstrip()}"
        segments = [s.strip() + "\n" for s in segments]
        order = sorted(bm25_rank(asked, segments)[: p.multidoc_k])  # document order
        question = bench_data.Question(f"needle2:{case}", asked, [" and ".join(keywords)])
        doc = bench_data.Document(f"needle2:{case}", "".join(segments), 0, [question],
                                  {"facts_in": [at_a, at_b], "routed": order})
        routed = [StoredDocument(bench, segments[i], f"nd{case}-{i}") for i in order]
        extra = {"routed_gold": len({at_a, at_b} & set(order)), "gold_paragraphs": 2, "keywords": list(keywords)}
        answer_question(bench, "multidoc-needle", doc, question, routed,
                        _chunk_context(bench, "\n".join(segments)), extra)
        for row in bench.rows:
            if row["qid"] == question.id:
                row["both"] = float(all(k in row["answer"].lower() for k in keywords))
        for d in routed:
            d.unlink()
        bench.say(f"multidoc-needle {case + 1}/{p.multidoc_needle_cases}: facts in segments {at_a} and {at_b}, "
                  f"routed {order}")


def run_multidoc(bench) -> None:
    run_hotpotqa(bench)
    if bench.preset.multidoc_needle_cases:
        run_needle(bench)
    bench.mark_memory("multidoc")


def merge_runs(parts: list[Path], out_dir: Path) -> Path:
    """One results.json (and results.md) from runs over disjoint question ranges (``multidoc_first``). A part is a
    run's output folder, or the checkpoint file of a run that did not finish (its rows only); at least one part
    must be a finished run (its meta is kept)."""
    from .report import render

    runs = []
    for part in map(Path, parts):
        finished = part / "results.json"
        runs.append(json.loads(finished.read_text()) if finished.exists() else
                    {"meta": None, **json.loads(part.read_text())})
    base = next(r for r in runs if r["meta"] is not None)
    merged = dict(base)
    for key in ("rows", "documents", "variants", "indexing", "decode", "ttft", "disk"):
        merged[key] = [item for run in runs for item in run.get(key, [])]
    questions = {(r["task"], r["qid"]) for r in merged["rows"]}
    meta = dict(base["meta"])
    meta["preset"] = dict(meta["preset"], multidoc_first=0, multidoc_checkpoint="",
                          multidoc_questions=sum(t == "multidoc" for t, _ in questions),
                          multidoc_needle_cases=sum(t == "multidoc-needle" for t, _ in questions))
    meta["merged_from"] = [{"part": str(p), "finished": r["meta"] is not None,
                            "command": (r["meta"] or {}).get("command"), "duration_s": (r["meta"] or {}).get(
                                "duration_s"), "loadavg_at_end": ((r["meta"] or {}).get("machine") or {}).get(
                                "loadavg_at_end")} for p, r in zip(parts, runs)]
    merged["meta"] = meta
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    return render(out_dir / "results.json")


if __name__ == "__main__":  # python -m kvzip_rag.bench.multidoc OUT_DIR RUN_DIR...
    import sys

    print(merge_runs([Path(p) for p in sys.argv[2:]], Path(sys.argv[1])))
