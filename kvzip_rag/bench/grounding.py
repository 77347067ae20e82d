"""Benchmark task ``grounding`` (``kvzip-rag bench --task grounding``): answers that rest on the documents.

Question sets, all answered through :class:`~kvzip_rag.qa.QAService` over one real store (documents stored once at
ratio 1.0, read at each method's ratio):

- ``squad``: SQuAD questions asked of their own article (``grounding_articles`` articles, one document each).
- ``squad-unanswerable``: the same questions asked of the store without their article (routed among the others).
- ``hotpotqa``: HotpotQA distractor questions, the ``multidoc_k`` paragraphs BM25 routes (of the 10) stored and
  composed (the service's default, parallel).

Methods are entries of :func:`methods`: a name, a ratio, the options given to ``QAService.answer`` and whether
the method abstains. ``free`` is free generation (today's default answer) and ``quote`` quote mode, both with
abstention off (``abstain_threshold=None``); ``free+abstain`` and ``quote+abstain`` are the same answers with the
service's calibrated abstention applied to them (:func:`abstained`: the evidence score of the answer against the
default threshold, exactly what the service does with its default ``abstain_threshold``), so each pair differs only
by abstention and is generated once. Quote mode generates exactly the free answer and snaps it
(:meth:`~kvzip_rag.qa.QAService.quote_result`), so ``quote`` is the ``free`` answer of the same question snapped
(its time the free answer's plus the snapping; its first token the quote, shown once the answer is complete): the
quote - free difference is that of snapping alone. ``chunk-rag`` (LlamaIndex ``VectorStoreIndex`` over the
article's chunks, the top chunks prefilled with the question by the same LLM) is the outside reference on ``squad``.

Per set and method: F1 and contains-gold (mean with a 95% interval, normal approximation), abstention rate (on
``squad`` and ``hotpotqa`` the answerable questions, on ``squad-unanswerable`` the unanswerable ones), citation
accuracy (SQuAD: share of correct answers, contains-gold, whose first citation contains the gold answer, an answer
without citation counting as a miss; HotpotQA:
share of all answers whose citation lies in a gold paragraph), answer tokens, median TTFT and total time; per set
and ratio, the paired F1 difference of ``quote`` minus ``free``.
Rows are written after every question (``grounding.json``, ``grounding.md``), so a run stopped early still reports.
"""

from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import data as bench_data
from . import measure
from .runner import write_outputs
from .metrics import best_over, contains_gold, f1_score, mean, stderr

SETS = ("squad", "squad-unanswerable", "hotpotqa")


@dataclass(frozen=True)
class Method:
    name: str
    ratio: float
    options: dict = field(default_factory=dict)  # keyword arguments of QAService.answer
    abstain: bool = False  # the calibrated abstention applied to the answer of the same options

    @property
    def label(self) -> str:
        return f"{self.name}@{self.ratio:g}"


def methods(ratios: tuple[float, ...]) -> list[Method]:
    """Every method of the run, at every ratio: each answer style without abstention, then with it."""
    styles = (("free", {}), ("quote", {"answer_style": "quote"}))
    return [Method(name + suffix, r, {**options, "abstain_threshold": None}, abstain)
            for r in ratios for name, options in styles for suffix, abstain in (("", False), ("+abstain", True))]


def abstained(result) -> bool:
    """Whether the service's default abstention would replace this answer (its evidence score below the calibrated
    threshold); an answer without recorded evidence is kept, as the service keeps it."""
    from kvzip_rag.abstain import default_calibration

    score = result.evidence_score
    return score is not None and score < default_calibration().threshold


def interval(values: list[float]) -> dict:
    """Mean and a 95% normal-approximation interval."""
    m, se = mean(values), stderr(values)
    half = 1.96 * se if se is not None else None
    return {"mean": m, "lo": m - half if half is not None else None, "hi": m + half if half is not None else None,
            "n": len(values)}


class GroundingTask:
    def __init__(self, model, preset, data_dir: Path, out_dir: Path, log: Callable[[str], None],
                 embedding: str = "minilm", limit: int | None = None) -> None:
        from kvzip_rag.qa import QAService
        from kvzip_rag.store import CacheStore

        self.model, self.preset, self.data_dir, self.out_dir, self.log = model, preset, data_dir, out_dir, log
        self.limit, self.embedding = limit, embedding
        self._tmp = tempfile.TemporaryDirectory(prefix="kvzip-grounding-")
        self.store = CacheStore(self._tmp.name)
        self.methods = methods(tuple(preset.grounding_ratios))
        self.services = {r: QAService(self.store, model, ratio=r) for r in {m.ratio for m in self.methods}}
        self.rows: list[dict] = []
        self.held_out = 0  # SQuAD questions left out because the abstention was calibrated on them
        self.skipped: dict[str, str] = {}
        self.t0 = time.perf_counter()

    def say(self, message: str) -> None:
        self.log(f"[{time.perf_counter() - self.t0:7.1f}s] grounding {message}")

    # -------------------------------------------------------------------------------- data
    def squad(self) -> list[bench_data.Document]:
        from kvzip_rag.abstain import default_calibration

        p = self.preset
        count = lambda text: len(self.model.encode(text))
        fitted = default_calibration().fitted_on.get("question_ids", [])  # abstention measured on held-out questions
        docs = bench_data.load_squad(self.data_dir, count, p.grounding_articles, p.grounding_min_tokens,
                                     p.grounding_max_tokens, p.grounding_questions_per_doc, exclude=set(fitted))
        self.held_out = len(fitted)
        for doc in docs:
            self.store.add_document(self.model, doc.text, doc_id=doc.id, ratio=1.0,
                                    max_segment_tokens=p.grounding_max_tokens + 64)
        self.say(f"{len(docs)} SQuAD articles stored")
        return docs

    def chunk_retriever(self, text: str):
        if "chunk-rag" in self.skipped:
            return None
        try:
            from .retrieval import ChunkRetriever, make_embedding

            if not hasattr(self, "_embed"):
                self._embed = make_embedding(self.embedding)
        except Exception as error:  # the optional bench extra is not installed
            self.skipped["chunk-rag"] = f"{type(error).__name__}: {error}"
            return None
        p = self.preset
        return ChunkRetriever(text, self._embed, lambda s: len(self.model.encode(s)), p.chunk_tokens,
                              p.chunk_overlap, p.top_k)

    # -------------------------------------------------------------------------------- answering
    def ask(self, set_name: str, question: bench_data.Question, doc_id: str, doc_ids: list[str], k: int,
            gold_docs: set[str] | None = None) -> None:
        from kvzip_rag.abstain import DEFAULT_ABSTAIN_TEXT

        # an abstaining method reads the answer of the same options, a quote the free answer of the same options
        answered: dict[tuple, tuple] = {}
        for method in self.methods:
            options = dict(method.options)
            quoting = options.pop("answer_style", "free") == "quote"
            key = (method.ratio, tuple(sorted(options.items())))
            service = self.services[method.ratio]
            if key not in answered:
                start = time.perf_counter()
                result = service.answer(question.question, k, doc_ids=doc_ids,
                                        max_new_tokens=self.preset.grounding_max_new_tokens, **options)
                total = time.perf_counter() - start
                meta = result.metadata()
                answered[key] = (result, meta["answer_tokens"],
                                 (result.retrieve_s or 0.0) + result.cache_load_s + meta["ttft_s"], total)
            if quoting and (key, "quote") not in answered:  # as the service's quote mode (a copy: the free row stays)
                result, _, _, total = answered[key]
                start = time.perf_counter()
                result = service.quote_result(copy.copy(result))
                total += time.perf_counter() - start  # the quote is shown once complete: its first token then
                answered[key, "quote"] = (result, len(self.model.encode(result.candidate)), total, total)
            result, tokens, first, total = answered[(key, "quote") if quoting else key]
            dropped = method.abstain and abstained(result)
            cited = [] if dropped else [c.as_dict() for c in result.citations]
            self.add(set_name, question, doc_id, method.label, DEFAULT_ABSTAIN_TEXT if dropped else result.text,
                     tokens, first, total, result.abstained or dropped, cited,
                     None if not cited or gold_docs is None else float(cited[0]["doc_id"] in gold_docs),
                     {"evidence_features": result.evidence_features, "evidence_score": result.evidence_score,
                      "unsupported_numbers": [] if dropped else list(result.unsupported_numbers),
                      "answered_from": [t.doc_id for t in result.used],
                      "evidence_sentences": self.evidence_sentences(method.ratio, result)})

    def evidence_sentences(self, ratio: float, result) -> list[list] | None:
        """Every sentence the answer's recorded evidence weighs, ``[doc_id, segment, start, end, weight]``
        heaviest first (``None`` without evidence): a citation rule can be re-scored on the rows."""
        from kvzip_rag.evidence import sentence_weights

        evidence = result.best.answer.evidence
        if evidence is None:
            return None
        service = self.services[ratio]
        used = [result.best.target, *result.best.also]
        documents = [(t, t.text or service.stored_text(t) or "") for t in used]
        return [[t.doc_id, t.segment_index, start, end, weight]
                for weight, t, _, start, end in sentence_weights(evidence, documents, service.model.tokenizer)]

    def add(self, set_name, question, doc_id, method, text, tokens, ttft_s, total_s, abstained, citations,
            citation_in_gold=None, grounding: dict | None = None) -> None:
        """One answer's row; ``citations`` as dicts, best first (``None``: a method that never cites);
        ``grounding``: what the abstention decision read (kept so it can be re-scored, e.g. by a refit)."""
        citation = citations[0] if citations else None
        golds = question.answers
        row = {"set": set_name, "qid": question.id, "doc": doc_id, "method": method, "question": question.question,
               "answer": text, "gold": golds, "f1": best_over(f1_score, text, golds),
               "contains": best_over(contains_gold, text, golds), "abstained": bool(abstained),
               "answer_tokens": tokens, "ttft_s": ttft_s, "total_s": total_s, "citation": citation,
               "citations": citations,
               "citation_has_gold": (best_over(contains_gold, citation["text"], golds) if citation else None),
               "citation_in_gold": citation_in_gold, **(grounding or {})}
        self.rows.append(row)

    def chunk_rag(self, question: bench_data.Question, doc_id: str, retriever) -> None:
        start = time.perf_counter()
        gen, _, _ = measure.chunk_answer(self.model, retriever.context, question.question,
                                         self.preset.grounding_max_new_tokens)
        self.add("squad", question, doc_id, "chunk-rag", gen.text, gen.tokens, gen.ttft_s,
                 time.perf_counter() - start, False, None)  # chunk RAG cites nothing

    def hotpot_items(self) -> list[tuple]:
        """(question, stored ids, gold ids among them, routed paragraph indices, paragraph texts) per item."""
        from .multidoc import bm25_rank, load_hotpotqa, paragraph_text

        p = self.preset
        out = []
        for item in load_hotpotqa(self.data_dir, p.grounding_hotpot):
            texts = [paragraph_text(title, sentences) for title, sentences in item["context"]]
            order = bm25_rank(item["question"], texts)[: p.multidoc_k]
            gold_titles = {title for title, _ in item["supporting_facts"]}
            ids, gold = [], set()
            for i in order:
                title = item["context"][i][0]
                doc_id = f"hotpotqa:{item['_id']}:{i}"
                ids.append(doc_id)
                if title in gold_titles:
                    gold.add(doc_id)
            out.append((bench_data.Question(item["_id"], item["question"], [item["answer"]]), ids, gold, order,
                        texts))
        return out

    def run(self) -> dict:
        p = self.preset
        docs = self.squad()
        # round-robin over the articles: a run stopped by its budget still covers every article
        squad_qs = [(q, doc) for rank in range(p.grounding_questions_per_doc) for doc in docs
                    for q in doc.questions[rank : rank + 1]]
        hotpot = self.hotpot_items()
        limit = self.limit or 10**9
        squad_qs, hotpot = squad_qs[:limit], hotpot[:limit]
        all_ids = [doc.id for doc in docs]
        retrievers = {}
        budget = p.grounding_budget_minutes
        for n in range(p.grounding_first_round, max(len(squad_qs), len(hotpot))):
            if budget is not None and time.perf_counter() - self.t0 > budget * 60:
                self.skipped["over_budget"] = f"stopped after {n} question rounds ({budget} min)"
                break
            if n < len(squad_qs):
                question, doc = squad_qs[n]
                self.ask("squad", question, doc.id, [doc.id], 1)
                self.ask("squad-unanswerable", question, doc.id, [d for d in all_ids if d != doc.id], 1)
                if doc.id not in retrievers:
                    retrievers[doc.id] = self.chunk_retriever(doc.text)
                if retrievers[doc.id] is not None:
                    self.chunk_rag(question, doc.id, retrievers[doc.id])
            if n < len(hotpot):
                question, ids, gold, order, texts = hotpot[n]
                for doc_id, i in zip(ids, order):
                    self.store.add_document(self.model, texts[i], doc_id=doc_id, ratio=1.0)
                self.ask("hotpotqa", question, ids[0], ids, len(ids), gold)
            self.write()
            self.say(f"{n + 1}/{max(len(squad_qs), len(hotpot))} question rounds")
        results = self.write()
        self._tmp.cleanup()
        return results

    # -------------------------------------------------------------------------------- results
    def write(self) -> dict:
        from dataclasses import asdict

        results = {"meta": {"model": self.model.name, "preset": asdict(self.preset), "limit": self.limit,
                            "duration_s": time.perf_counter() - self.t0, "skipped": self.skipped,
                            "calibration_questions_excluded": self.held_out,
                            "methods": [{"label": m.label, "options": m.options} for m in self.methods]},
                   "summary": summarize(self.rows), "rows": self.rows}
        write_outputs(self.out_dir, "grounding", results, markdown(results))  # a checkpoint after every round
        return results


def merge(paths: list[Path], out_dir: Path) -> dict:
    """One result from runs of the same task split by ``grounding_first_round`` (decoding is greedy, so a
    question's rows do not depend on the run): their rows, the first run's row where two runs answered the same
    question, summarized and written to ``out_dir`` (``grounding.json``, ``.md``)."""
    import json

    runs = [json.loads(Path(path).read_text()) for path in paths]
    rows: dict[tuple, dict] = {}
    for run in runs:
        for row in run["rows"]:
            rows.setdefault((row["set"], row["qid"], row["method"]), row)
    meta = {**runs[0]["meta"], "duration_s": sum(run["meta"]["duration_s"] for run in runs),
            "skipped": {f"{path}: {key}": value for path, run in zip(paths, runs)
                        for key, value in run["meta"]["skipped"].items()},
            "merged": [str(path) for path in paths]}
    results = {"meta": meta, "summary": summarize(list(rows.values())), "rows": list(rows.values())}
    write_outputs(out_dir, "grounding", results, markdown(results))
    return results


def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(rows: list[dict]) -> dict:
    """Per set and method: quality with intervals, abstention, citation accuracy, length and time; per set, the
    paired F1 difference of ``quote`` minus ``free`` at each ratio (quote mode's target)."""
    table: dict[str, dict[str, dict]] = {}
    for set_name in SETS:
        by_method: dict[str, list[dict]] = {}
        for row in rows:
            if row["set"] == set_name:
                by_method.setdefault(row["method"], []).append(row)
        for method, group in by_method.items():
            correct = [r for r in group if r["contains"]]
            cites = any(r["citations"] is not None for r in group)  # a correct answer without a citation misses
            cited = [r["citation_has_gold"] or 0.0 for r in correct] if cites else []
            in_gold = [r["citation_in_gold"] for r in group if r["citation_in_gold"] is not None]
            checked = [r for r in group if "unsupported_numbers" in r and not r["abstained"]]  # served, checked
            flagged = [r for r in checked if r["unsupported_numbers"]]
            table.setdefault(set_name, {})[method] = {
                "n": len(group), "f1": interval([r["f1"] for r in group]),
                "contains": interval([r["contains"] for r in group]),
                "abstained": mean([float(r["abstained"]) for r in group]),
                "citation_accuracy": mean(cited) if cited else None, "cited_correct": len(cited),
                "citation_in_gold": mean(in_gold) if in_gold else None,
                # answers served with a number none of their documents holds, and how many of those were wrong
                "numbers_flagged": [len(flagged), len(checked), sum(not r["contains"] for r in flagged)]
                if checked else None,
                "answer_tokens": mean([r["answer_tokens"] for r in group]),
                "ttft_s": _median([r["ttft_s"] for r in group]), "total_s": _median([r["total_s"] for r in group]),
            }
    paired = {}
    for set_name, by_method in table.items():
        for method in by_method:
            if not method.startswith("quote@"):
                continue
            free = method.replace("quote@", "free@")
            before = {r["qid"]: r["f1"] for r in rows if r["set"] == set_name and r["method"] == free}
            after = {r["qid"]: r["f1"] for r in rows if r["set"] == set_name and r["method"] == method}
            diffs = [after[q] - before[q] for q in after if q in before]
            if diffs:
                paired.setdefault(set_name, {})[method] = interval(diffs)
    return {"table": table, "quote_minus_free_f1": paired}


def _ci(value: dict) -> str:
    if value["mean"] is None:
        return "-"
    if value["lo"] is None:
        return f"{value['mean']:.3f}"
    return f"{value['mean']:.3f} [{value['lo']:.3f}, {value['hi']:.3f}]"


def _f(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _flagged(value) -> str:
    return "-" if value is None else f"{value[0]}/{value[1]} ({value[2]})"


def markdown(results: dict) -> str:
    summary, meta = results["summary"], results["meta"]
    lines = [f"# Grounding (model `{meta['model']}`, {meta['duration_s'] / 60:.1f} min)", ""]
    if meta.get("skipped"):
        lines += [f"- skipped: {meta['skipped']}", ""]
    lines += [f"- SQuAD questions the abstention was calibrated on, left out: "
              f"{meta.get('calibration_questions_excluded', 0)}", ""]
    header = ["method", "n", "F1 [95% CI]", "contains [95% CI]", "abstained", "citation acc.", "cit. in gold",
              "numbers flagged / served (wrong)", "answer tokens", "TTFT ms", "total ms"]
    for set_name, by_method in summary["table"].items():
        lines += [f"## {set_name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method, q in by_method.items():
            cells = [f"`{method}`", str(q["n"]), _ci(q["f1"]), _ci(q["contains"]), _f(q["abstained"], 2),
                     _f(q["citation_accuracy"], 2) + (f" ({q['cited_correct']})" if q["cited_correct"] else ""),
                     _f(q["citation_in_gold"], 2), _flagged(q.get("numbers_flagged")), _f(q["answer_tokens"], 1),
                     _f(q["ttft_s"] * 1000 if q["ttft_s"] is not None else None, 0),
                     _f(q["total_s"] * 1000 if q["total_s"] is not None else None, 0)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if summary["quote_minus_free_f1"]:
        lines += ["## Quote mode: F1(quote) - F1(free), paired, same questions", ""]
        for set_name, by_method in summary["quote_minus_free_f1"].items():
            for method, value in by_method.items():
                lines.append(f"- {set_name} {method}: {_ci(value)} (n = {value['n']})")
        lines.append("")
    return "\n".join(lines)
