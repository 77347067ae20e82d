"""Fidelity runs over disjoint articles merged into one results.json (its own module: it renders the report, which
imports the fidelity task)."""

from __future__ import annotations

import json
from pathlib import Path

from kvzip_rag.errors import InvalidArgumentError

from .report import render


def merge_runs(parts: list[Path], out_dir: Path) -> Path:
    """One results.json (and results.md, plots) from fidelity runs over disjoint documents (``fidelity_first_article``
    lets a later run extend an earlier one). A part is a run's output folder or the checkpoint file of a run cut
    short (``fidelity_checkpoint``); the first must be a finished run (its meta is kept, with each part's command
    under ``merged_from``). Refused unless every part measured the same model, methods and kvzip-fast gate."""
    runs = []
    for part in map(Path, parts):
        if part.is_dir():
            runs.append(json.loads((part / "results.json").read_text()))
        else:  # a checkpoint (fidelity_checkpoint) of a run cut short: its finished documents
            saved = json.loads(part.read_text())
            runs.append({"meta": {"model_fingerprint": saved["model_fingerprint"], "command": None},
                         "fidelity": saved["fidelity"]})
    base = runs[0]
    if "summary" not in base:
        raise InvalidArgumentError("the first part must be a finished run's folder (its meta is kept)")

    def signature(run: dict) -> tuple:
        gate = {k: v for k, v in run["fidelity"]["gate"].items() if k not in ("calibrated_now", "seconds")}
        return (run["meta"]["model_fingerprint"], frozenset(r["method"] for r in run["fidelity"]["rows"]),
                json.dumps(gate, sort_keys=True))

    if any(signature(run) != signature(base) for run in runs):
        raise InvalidArgumentError("these fidelity runs measured other models, methods or kvzip-fast gates: "
                                   "they cannot be merged")
    docs = [{r["doc"] for r in run["fidelity"]["rows"]} for run in runs]
    if sum(map(len, docs)) != len(set().union(*docs)):
        raise InvalidArgumentError("these fidelity runs share documents: merge runs over disjoint articles")
    merged = dict(base)
    merged["fidelity"] = dict(base["fidelity"], rows=[r for run in runs for r in run["fidelity"]["rows"]],
                              bytes=[b for run in runs for b in run["fidelity"]["bytes"]])
    merged["documents"] = [d for run in runs for d in run.get("documents", [])]
    merged["meta"] = dict(base["meta"], merged_from=[
        {"part": str(p), "command": run["meta"].get("command"), "duration_s": run["meta"].get("duration_s"),
         "documents": len(d), "questions": len({r["qid"] for r in run["fidelity"]["rows"]}),
         "loadavg_at_end": (run["meta"].get("machine") or {}).get("loadavg_at_end")}
        for p, run, d in zip(parts, runs, docs)])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    return render(out_dir / "results.json")


if __name__ == "__main__":  # python -m kvzip_rag.bench.fidelity_merge OUT_DIR RUN_DIR...
    import sys

    print(merge_runs([Path(p) for p in sys.argv[2:]], Path(sys.argv[1])))
