"""The benchmark run: every method on the same model, prompts and documents, in one process.

Methods (names as they appear in the results):

- ``full``: the packed cache at ratio 1.0 (nothing evicted), answered by the engine.
- ``kvzip-{pair,uniform,head}@r``: KVzip at ratio ``r`` (fraction of context KV pairs kept).
- ``{snapkv,h2o,keynorm,random}@r``: the other query-agnostic scorers on the same packed cache.
- ``reprefill``: no stored cache: plain transformers (DynamicCache, SDPA) prefill the whole document and the
  question for every question, then decode greedily.
- ``chunk-rag``: LlamaIndex ``VectorStoreIndex`` over the document's chunks (all-MiniLM-L6-v2), top-k chunks
  prefilled with the question by the same LLM, same prompt layout.

Each document is prefilled and scored once per scorer at ratio 1.0; the cache at a lower ratio and level is then
``PackedCache.at_ratio``, which by construction equals ``compress`` at that ratio (tests/test_bench.py checks it),
so the grid costs one scoring pass per scorer, not one per ratio.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvzip_rag.cache import PackedCache
from kvzip_rag.compression import pack
from kvzip_rag.models import KVzipModel
from kvzip_rag.prefill import prefill_document
from kvzip_rag.scorers import SCORERS, Scorer
from kvzip_rag.scorers.head_calibration import head_scores

from . import data as bench_data
from . import measure
from .metrics import best_over, contains_gold, exact_match, f1_score, needle_hit
from .presets import Preset, main_ratio

Log = Callable[[str], None]


@dataclass(frozen=True)
class Variant:
    name: str
    source: str  # which ratio-1.0 base it is cut from: full, kvzip, kvzip-head or a baseline scorer
    level: str
    ratio: float


def variant_grid(ratios, levels, baselines, baseline_level: str, extra_pair_ratios=()) -> list[Variant]:
    grid = [Variant("full", "full", "pair", 1.0)]
    for level in levels:
        source = "kvzip-head" if level == "head" else "kvzip"
        for r in ratios:
            grid.append(Variant(f"kvzip-{level}@{r:g}", source, level, r))
    for r in extra_pair_ratios:
        if "pair" not in levels or r not in ratios:
            grid.append(Variant(f"kvzip-pair@{r:g}", "kvzip", "pair", r))
    for name in baselines:
        for r in ratios:
            grid.append(Variant(f"{name}@{r:g}", name, baseline_level, r))
    return grid


def _has_prefill_observer(scorer: Scorer) -> bool:
    return type(scorer).prefill_observer is not Scorer.prefill_observer


class PreparedDocument:
    """One document prefilled once (plain, timed) and its ratio-1.0 packed caches, one scorer at a time."""

    def __init__(self, model: KVzipModel, text: str, repeats: int = 1):
        self.model, self.text = model, text
        times = []
        for _ in range(max(repeats, 1)):  # best of ``repeats``: the denominator of every overhead ratio
            self.doc = None
            start = time.perf_counter()
            self.doc = prefill_document(model, text)
            times.append(time.perf_counter() - start)
        self.prefill_s = min(times)
        self.context_length = self.doc.context_length
        self.ids = self.doc.prefix_ids + self.doc.context_ids

    def base(self, source: str) -> tuple[PackedCache, float]:
        """(cache at ratio 1.0 ordered by ``source``'s scores, seconds of scoring beyond the plain prefill)."""
        doc = self.doc
        shape = (len(doc.compressed_layers), doc.num_kv_heads, doc.context_length)
        if source == "full":
            return pack(doc, torch.zeros(shape), 1.0, "pair", "full"), 0.0
        if source == "kvzip-head":  # context-independent head scores, calibrated once per model
            scores = head_scores(self.model)[:, :, None].expand(shape).contiguous()
            return pack(doc, scores, 1.0, "head", "kvzip-head"), 0.0
        scorer = SCORERS[source]()
        if _has_prefill_observer(scorer):  # its own prefill with the observer; the difference is scoring cost
            start = time.perf_counter()
            observed = prefill_document(self.model, self.text, scorer=scorer)
            observed_s = time.perf_counter() - start
            start = time.perf_counter()
            scores = scorer.score(observed)
            scoring_s = observed_s - self.prefill_s + time.perf_counter() - start
            cache = pack(observed, scores, 1.0, "pair", scorer.name)
            del observed
            return cache, scoring_s
        start = time.perf_counter()
        scores = scorer.score(doc)
        scoring_s = time.perf_counter() - start
        return pack(doc, scores, 1.0, "pair", scorer.name), scoring_s

    def caches(self, grid: list[Variant], scoring_s: dict[str, float]) -> Iterator[tuple[Variant, PackedCache]]:
        """Each variant of ``grid`` with its cache, cut from one ratio-1.0 base per source (scored once, its
        scoring seconds put in ``scoring_s``; a base is dropped before the next is scored)."""
        for source in dict.fromkeys(v.source for v in grid):
            base, seconds = self.base(source)
            if source not in ("full", "kvzip-head"):
                scoring_s[source] = seconds
            for variant in (v for v in grid if v.source == source):
                yield variant, cut(base, variant)
            del base


def cut(base: PackedCache, variant: Variant) -> PackedCache:
    if variant.ratio >= 1.0:
        return base
    return base.at_ratio(variant.ratio, variant.level)


def _store():
    try:
        from kvzip_rag.store.cachefile import read_cache, write_cache
    except ImportError:
        return None

    def read_blob(path, model):
        cache = read_cache(path)
        cache.info.check_model(model)
        return cache

    return read_blob, write_cache


def stored_document_bytes(cache: PackedCache) -> int:
    """Bytes of keys and values one document adds to a CacheStore (its template prefix is shared per model)."""
    from kvzip_rag.store.cachefile import encode_document

    return encode_document(cache, shared_prefix=True).kv_nbytes


class Bench:
    def __init__(self, model: KVzipModel, preset: Preset, data_dir: Path, embedding: str = "minilm",
                 log: Log = print):
        self.model, self.preset, self.data_dir, self.embedding_kind = model, preset, Path(data_dir), embedding
        self.log = log
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []  # one per (task, question, method)
        self.documents: list[dict] = []  # prefill / scoring cost per document
        self.variants: list[dict] = []  # bytes per (document, method)
        self.indexing: list[dict] = []  # chunk retrieval indexing
        self.decode: list[dict] = []  # per-token decode latency vs context length
        self.ttft: list[dict] = []  # time to first token: stored cache vs in memory vs re-prefill
        self.disk: list[dict] = []  # blob bytes on disk
        self.memory: dict[str, float | None] = {}
        self.skipped: dict[str, str] = {}
        self._embed = None
        self.embedding_load_s: float | None = None
        self.calibration_s: float | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="kvzip-bench-")

    # ------------------------------------------------------------------ helpers
    @property
    def scratch(self) -> Path:
        """A folder for the run's temporary blobs (removed when the results are taken)."""
        return Path(self._tmp.name)

    def say(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.t0:7.1f}s] {message}")

    def count(self, text: str) -> int:
        return len(self.model.encode(text))

    def embedder(self):
        if self._embed is None:
            from .retrieval import make_embedding

            start = time.perf_counter()
            self._embed = make_embedding(self.embedding_kind)
            self.embedding_load_s = time.perf_counter() - start
        return self._embed

    def add_row(self, task: str, doc: bench_data.Document, question: bench_data.Question, method: str,
                gen: measure.Generation, **extra) -> dict:
        answers = question.answers
        row = {
            "task": task, "doc": doc.id, "qid": question.id, "method": method, "question": question.question,
            "answer": gen.text, "gold": answers, "new_tokens": gen.tokens, "ttft_s": gen.ttft_s,
            "decode_s": gen.decode_s, "s_per_token": gen.s_per_token, "nll": gen.nll,
            "em": best_over(exact_match, gen.text, answers), "f1": best_over(f1_score, gen.text, answers),
            "contains": best_over(contains_gold, gen.text, answers),
        }
        if task == "needle":
            row["hit"] = needle_hit(gen.text)
        row.update(extra)
        self.rows.append(row)
        return row

    def over_budget(self, task: str, doc_id: str) -> bool:
        """The benchmark's time budget (``budget_minutes``) is spent: skip the document and list it."""
        budget = self.preset.budget_minutes
        if budget is None or time.perf_counter() - self.t0 <= budget * 60:
            return False
        self.skipped.setdefault("over_budget", []).append(doc_id)
        self.say(f"{task} {doc_id}: skipped, past the {budget:g}-minute budget")
        return True

    def mark_memory(self, label: str) -> None:
        self.memory[f"peak_rss_mb_after_{label}"] = measure.peak_rss_mb()
        self.memory[f"rss_mb_after_{label}"] = measure.current_rss_mb()

    # ------------------------------------------------------------------ one document, every method
    def run_document(self, task: str, doc: bench_data.Document, grid: list[Variant], max_new_tokens: int,
                     on_variant: Callable[[Variant, PackedCache, PreparedDocument], None] | None = None,
                     on_prepared: Callable[[PreparedDocument], None] | None = None,
                     write_blobs: bool = False) -> PreparedDocument | None:
        model = self.model
        if self.over_budget(task, doc.id):
            return None
        prep = PreparedDocument(model, doc.text, self.preset.prefill_repeats)
        cost = {"task": task, "doc": doc.id, "context_tokens": prep.context_length, "prefill_s": prep.prefill_s,
                "scoring_s": {}}
        self.say(f"{task} {doc.id}: {prep.context_length} tokens, prefill {prep.prefill_s:.2f}s, "
                 f"{len(doc.questions)} questions x {len(grid) + 2} methods")
        if on_prepared:
            on_prepared(prep)
        for variant, cache in prep.caches(grid, cost["scoring_s"]):
            self.variants.append({
                "task": task, "doc": doc.id, "method": variant.name, "context_tokens": prep.context_length,
                "nbytes": cache.nbytes, "full_nbytes": cache.full_nbytes, "kept_ratio": cache.kept_ratio,
            })
            if write_blobs and (variant.source in ("full", "kvzip") and variant.level == "pair"):
                self.record_disk(task, doc, variant, cache, prep.context_length)
            for question in doc.questions:
                gen = measure.packed_answer(model, cache, question.question, max_new_tokens,
                                            gold=question.answers[0])
                self.add_row(task, doc, question, variant.name, gen)
            if on_variant:
                on_variant(variant, cache, prep)
            del cache
        self.documents.append(cost)
        for question in doc.questions:  # no stored cache: the whole document again for every question
            ids = prep.ids + measure.question_ids(model, question.question)
            gen = measure.dense_answer(model, ids, max_new_tokens, gold=question.answers[0])
            self.add_row(task, doc, question, "reprefill", gen, prompt_tokens=len(ids))
        self.run_chunks(task, doc, max_new_tokens)
        return prep

    def chunk_embedder(self):
        """The chunk-retrieval baseline's embedding model, or None when it is unavailable (then skipped, once)."""
        if "chunk-rag" in self.skipped:
            return None
        try:
            return self.embedder()
        except Exception as error:  # the optional extra is not installed
            self.skipped["chunk-rag"] = f"{type(error).__name__}: {error}"
            self.say(f"chunk-rag skipped: {error}")
            return None

    def run_chunks(self, task: str, doc: bench_data.Document, max_new_tokens: int) -> None:
        embed = self.chunk_embedder()
        if embed is None:
            return
        from .retrieval import ChunkRetriever

        p = self.preset
        start = time.perf_counter()
        retriever = ChunkRetriever(doc.text, embed, self.count, p.chunk_tokens, p.chunk_overlap, p.top_k)
        index_s = time.perf_counter() - start
        self.indexing.append({"task": task, "doc": doc.id, "context_tokens": doc.tokens,
                              "chunks": len(retriever.chunks), "index_s": index_s,
                              "tokens_per_s": doc.tokens / index_s if index_s else None})
        for question in doc.questions:
            gen, retrieval_s, prompt_tokens = measure.chunk_answer(self.model, retriever.context, question.question,
                                                                   max_new_tokens, gold=question.answers[0])
            self.add_row(task, doc, question, "chunk-rag", gen, prompt_tokens=prompt_tokens, retrieval_s=retrieval_s)

    def record_disk(self, task, doc, variant: Variant, cache: PackedCache, context_tokens: int) -> None:
        store = _store()
        if store is None:
            self.skipped.setdefault("disk", "kvzip_rag.store.blob not importable")
            return
        _, write_blob = store
        path = self.scratch / "disk.safetensors"
        result = write_blob(cache, path)
        self.disk.append({"task": task, "doc": doc.id, "method": variant.name, "ratio": variant.ratio,
                          "context_tokens": context_tokens, "file_bytes": result.nbytes,
                          "memory_bytes": cache.nbytes, "full_memory_bytes": cache.full_nbytes,
                          "file_bytes_per_token": result.nbytes / context_tokens,
                          "store_document_bytes": stored_document_bytes(cache),
                          "store_vs_full_memory": stored_document_bytes(cache) / cache.full_nbytes})
        path.unlink()

    # ------------------------------------------------------------------ tasks
    def squad(self) -> None:
        p = self.preset
        docs = bench_data.load_squad(self.data_dir, self.count, p.squad_docs, p.squad_min_tokens,
                                     min(p.squad_max_tokens, self.max_context()), p.squad_questions)
        grid = variant_grid(p.ratios, p.levels, p.baselines, p.baseline_level)
        for index, doc in enumerate(docs):
            self.run_document("squad", doc, grid, p.max_new_tokens, write_blobs=index == 0)
        self.mark_memory("squad")

    def narrativeqa(self) -> None:
        p = self.preset
        docs = bench_data.load_narrativeqa(self.data_dir, self.count, p.nqa_docs, p.nqa_questions,
                                           min(p.nqa_max_tokens, self.max_context()))
        grid = variant_grid(p.nqa_ratios, p.levels, p.baselines, p.baseline_level)
        for doc in docs:
            self.run_document("narrativeqa", doc, grid, p.max_new_tokens)
        self.mark_memory("narrativeqa")

    def max_context(self) -> int:
        return self.model.context_limit - len(self.model.encode(self.model.template.prefix)) - 16

    def needle(self) -> None:
        p, model = self.preset, self.model
        haystack = bench_data.essays_text(self.data_dir)
        grid = variant_grid(p.needle_ratios, p.levels, p.baselines, p.baseline_level, p.needle_extra_ratios)
        limit = self.max_context()
        cases = list(dict.fromkeys((min(length, limit), depth) for length, depth in p.needle_cases))
        lengths = sorted({length for length, _ in cases})
        ttft_length = min(lengths, key=lambda n: abs(n - min(p.ttft_length, limit)))
        question = bench_data.Question("needle", bench_data.NEEDLE_QUESTION,
                                       ["eat a sandwich and sit in Dolores Park on a sunny day"])
        encode = model.encode
        decode = lambda ids: model.tokenizer.decode(ids, skip_special_tokens=True)
        seen_lengths: set[int] = set()
        for length, depth in cases:
            target = length
            text = bench_data.needle_haystack(haystack, encode, decode, target, depth)
            while self.count(text) > limit:
                target -= 32
                text = bench_data.needle_haystack(haystack, encode, decode, target, depth)
            doc = bench_data.Document(f"needle:{length}@{depth:g}", text, self.count(text), [question],
                                      {"length": length, "depth": depth})
            first = length not in seen_lengths  # decode latency and TTFT: once per length
            seen_lengths.add(length)
            prompt = measure.question_ids(model, question.question)

            def on_prepared(prep: PreparedDocument, first=first, length=length, prompt=prompt) -> None:
                if first:
                    seconds = measure.dense_decode_latency(model, prep.doc.cache, prompt, p.decode_steps)
                    self.decode.append({"context_tokens": prep.context_length, "method": "dense-full",
                                        "s_per_token": seconds})

            def on_variant(variant: Variant, cache: PackedCache, prep: PreparedDocument, first=first,
                           length=length, prompt=prompt, doc_id=doc.id) -> None:
                if not first:
                    return
                if variant.name == "full" or variant.name == f"kvzip-pair@{main_ratio(p.needle_ratios):g}":
                    label = "packed-full" if variant.name == "full" else variant.name
                    seconds = measure.packed_decode_latency(model, cache, prompt, p.decode_steps)
                    self.decode.append({"context_tokens": prep.context_length, "method": label,
                                        "s_per_token": seconds})
                    if length == ttft_length:
                        self.measure_ttft(variant, cache, prep, doc_id)

            self.run_document("needle", doc, grid, p.needle_max_new_tokens, on_variant=on_variant,
                              on_prepared=on_prepared)
        self.mark_memory("needle")

    def measure_ttft(self, variant: Variant, cache: PackedCache, prep: PreparedDocument, doc_id: str) -> None:
        """Load the stored blob and produce the first token, vs the same from memory (re-prefill is measured by
        the ``reprefill`` method on the same document and question)."""
        p, model = self.preset, self.model
        question = bench_data.NEEDLE_QUESTION
        store = _store()
        row = {"doc": doc_id, "context_tokens": prep.context_length, "method": variant.name, "ratio": variant.ratio}
        memory_times = []
        for _ in range(p.ttft_repeats):
            start = time.perf_counter()
            measure.first_token(model, cache, question)
            memory_times.append(time.perf_counter() - start)
        row["in_memory_first_token_s"] = min(memory_times)
        if store is None:
            self.skipped.setdefault("ttft-store", "kvzip_rag.store.blob not importable")
        else:
            read_blob, write_blob = store
            path = self.scratch / f"ttft-{variant.name}.safetensors"
            written = write_blob(cache, path)
            load, total = [], []
            for _ in range(p.ttft_repeats):
                start = time.perf_counter()
                loaded = read_blob(path, model=model)
                loaded_at = time.perf_counter()
                measure.first_token(model, loaded, question)
                end = time.perf_counter()
                load.append(loaded_at - start)
                total.append(end - start)
                del loaded
            row.update(file_bytes=written.nbytes, load_s=min(load), stored_first_token_s=min(total),
                       note="page cache warm (the blob was just written); best of repeats")
            self.disk.append({"task": "needle", "doc": f"ttft:{prep.context_length}", "method": variant.name,
                              "ratio": variant.ratio, "context_tokens": prep.context_length,
                              "file_bytes": written.nbytes, "memory_bytes": cache.nbytes,
                              "full_memory_bytes": cache.full_nbytes,
                              "file_bytes_per_token": written.nbytes / prep.context_length})
            path.unlink()
        self.ttft.append(row)

    # ------------------------------------------------------------------ whole run
    def start(self) -> None:
        """Before the first task: the memory after the model load, and the head scores calibrated once."""
        self.mark_memory("model_load")
        if "head" in self.preset.levels:
            start = time.perf_counter()
            head_scores(self.model)
            self.calibration_s = time.perf_counter() - start

    def results(self, tasks: list[str], own: dict[str, dict]) -> dict:
        """The run's results: the shared tables, what tasks returned as their own (``own``, by task), and meta (the
        summary over them is the tasks' to add)."""
        self._tmp.cleanup()
        raw = {
            "rows": self.rows, "documents": self.documents, "variants": self.variants, "indexing": self.indexing,
            "decode": self.decode, "ttft": self.ttft, "disk": self.disk, **own,
        }
        meta = {
            "preset": asdict(self.preset),
            "model": self.model.name,
            "model_fingerprint": self.model.fingerprint,
            "device": str(self.model.device),
            "dtype": str(self.model.dtype),
            "torch_threads": torch.get_num_threads(),
            "tasks": list(tasks),
            "data_dir": str(self.data_dir),
            "embedding": self.embedding_kind,
            "embedding_load_s": self.embedding_load_s,
            "head_calibration_s": self.calibration_s,
            "duration_s": time.perf_counter() - self.t0,
            "skipped": self.skipped,
            "memory": self.memory,
            "machine": machine_info(),
        }
        return {"meta": meta, **raw}


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    info = {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": ram, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform(), "loadavg_at_end": load}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(results: dict, path: Path) -> None:
    path.write_text(json.dumps(results, indent=1, default=str))


def write_outputs(out_dir: Path, name: str, results: dict, markdown: str) -> Path:
    """A standalone task's ``<name>.json`` and ``<name>.md`` (written again as it goes, where it checkpoints)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(results, out_dir / f"{name}.json")
    (out_dir / f"{name}.md").write_text(markdown)
    return out_dir / f"{name}.md"
