"""``kvzip-rag bench --task precision``: what bfloat16 weight products (:mod:`kvzip_rag.matmul`) cost in quality.

The whole pipeline runs once per precision on the same SQuAD documents and questions: prefill, KVzip scoring and
eviction at the default budget, then each question answered (greedy) and its gold answer teacher-forced. Reported,
paired question by question with 95% intervals that resample documents (as the fidelity task): the gold NLL of
bfloat16 minus float32, the F1 of the greedy answers, and how many answers are the same text.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PRECISIONS = ("float32", "bfloat16")
DEFAULT_QUESTIONS = 120
QUESTIONS_PER_DOC = 10
MAX_NEW_TOKENS = 24


def run_precision(model, data_dir: Path, questions: int = DEFAULT_QUESTIONS, log=print) -> dict:
    """One row per (question, precision): gold NLL, greedy answer and its F1."""
    import kvzip_rag
    from kvzip_rag.budget import DEFAULT_BUDGET
    from kvzip_rag.matmul import use_matmul

    from .data import load_squad
    from .fidelity import teacher_forced
    from .metrics import best_over, f1_score

    count = lambda text: len(model.encode(text))  # noqa: E731
    docs = load_squad(data_dir, count, 10_000, 500, min(900, model.context_limit), QUESTIONS_PER_DOC)
    rows, asked = [], 0
    start = time.perf_counter()
    try:
        for doc in docs:
            if asked >= questions:
                break
            doc.questions = doc.questions[: questions - asked]
            asked += len(doc.questions)
            for matmul in PRECISIONS:
                use_matmul(model.model, matmul)
                cache = kvzip_rag.compress(model, doc.text, ratio=DEFAULT_BUDGET.ratio, level=DEFAULT_BUDGET.level)
                for question in doc.questions:
                    nll = teacher_forced(model, cache, question.question, question.answers[0])["nll"]
                    text = kvzip_rag.answer(model, cache, question.question, max_new_tokens=MAX_NEW_TOKENS).text
                    cache.reset()
                    rows.append({"doc": doc.id, "qid": question.id, "matmul": matmul, "nll": nll, "answer": text,
                                 "f1": best_over(f1_score, text, question.answers)})
            log(f"{doc.id}: {len(doc.questions)} questions ({asked} of {questions}), "
                f"{time.perf_counter() - start:.0f} s")
    finally:
        use_matmul(model.model, "float32")
    return {"task": "precision", "model": model.name, "ratio": DEFAULT_BUDGET.ratio, "level": DEFAULT_BUDGET.level,
            "max_new_tokens": MAX_NEW_TOKENS, "rows": rows, "summary": summarize(rows)}


def paired_difference(rows: list[dict], field: str, samples: int = 2000, seed: int = 0) -> dict:
    """Mean of bfloat16 minus float32 over questions, with a 95% interval resampling documents."""
    by_question: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_question.setdefault(row["qid"], {})[row["matmul"]] = row
    from .fidelity import _cluster_means

    per_doc: dict[str, list[float]] = {}
    for pair in by_question.values():
        if len(pair) == 2:
            per_doc.setdefault(pair["float32"]["doc"], []).append(pair["bfloat16"][field] - pair["float32"][field])
    if not per_doc:
        return {"n": 0, "mean": None, "ci": None}
    docs = sorted(per_doc)
    draws = np.random.default_rng(seed).integers(0, len(docs), size=(samples, len(docs)))
    low, high = np.percentile(_cluster_means(per_doc, draws, docs), [2.5, 97.5])
    differences = [d for values in per_doc.values() for d in values]
    return {"n": len(differences), "docs": len(docs), "mean": float(np.mean(differences)),
            "ci": [float(low), float(high)]}


def summarize(rows: list[dict]) -> dict:
    """Per precision the mean NLL and F1; the paired differences; the share of identical answers."""
    out: dict = {"by_precision": {}}
    for matmul in PRECISIONS:
        mine = [r for r in rows if r["matmul"] == matmul]
        if mine:
            out["by_precision"][matmul] = {"n": len(mine), "nll": float(np.mean([r["nll"] for r in mine])),
                                           "f1": float(np.mean([r["f1"] for r in mine]))}
    out["nll_difference"] = paired_difference(rows, "nll")
    out["f1_difference"] = paired_difference(rows, "f1")
    answers: dict[str, dict[str, str]] = {}
    for row in rows:
        answers.setdefault(row["qid"], {})[row["matmul"]] = row["answer"]
    both = [a for a in answers.values() if len(a) == 2]
    out["same_answer"] = {"n": len(both), "equal": sum(a["float32"] == a["bfloat16"] for a in both)}
    return out


def markdown(result: dict) -> str:
    summary = result["summary"]
    nll, f1, same = summary["nll_difference"], summary["f1_difference"], summary["same_answer"]

    def diff(entry: dict, digits: int) -> str:
        if entry["mean"] is None:
            return "-"
        return f"{entry['mean']:+.{digits}f} [{entry['ci'][0]:+.{digits}f}, {entry['ci'][1]:+.{digits}f}]"

    lines = [f"### bfloat16 weight products: quality against float32 (model {result['model']}, KVzip "
             f"{result['level']} at {result['ratio']:g}, SQuAD, greedy answers of at most "
             f"{result['max_new_tokens']} tokens)", "",
             "| matmul | n | gold NLL | F1 |", "|---|---|---|---|"]
    lines += [f"| {m} | {v['n']} | {v['nll']:.3f} | {v['f1']:.3f} |" for m, v in summary["by_precision"].items()]
    lines += ["", f"Paired, bfloat16 - float32, 95% intervals resampling {nll.get('docs', 0)} documents: gold NLL "
                  f"{diff(nll, 3)} nats (n = {nll['n']}), F1 {diff(f1, 3)}; the same answer text for "
                  f"{same['equal']} of {same['n']} questions."]
    return "\n".join(lines) + "\n"
