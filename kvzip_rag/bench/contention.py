"""``kvzip-rag bench --task contention``: decode speed under a competing CPU load, Python API beside the CLI.

A 2-core machine shared with other jobs is where torch's default (one OpenMP thread per core) collapses: threads
spin waiting for cores that other processes hold. This task measures decode tokens/s of one answer from a stored
cache through the Python API (:class:`kvzip_rag.qa.QAService`) with torch's default thread count and with the
library's policy (:mod:`kvzip_rag.runtime`), and through the CLI (``kvzip-rag ask``, a subprocess), first on an
idle machine, then with one busy process per core competing.
"""

from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = ("The harbour of Velmora was built in 1731 by the engineer Ansel Brask. Ferries leave for the island of "
        "Tessin every morning at seven. ") * 12
QUESTION = "Who built the harbour of Velmora, and when do the ferries leave?"


def _spin() -> None:  # pragma: no cover - runs in the competing processes
    while True:
        pass


def _api_rate(qa, threads: int, tokens: int) -> float:
    import torch

    torch.set_num_threads(threads)
    result = qa.answer(QUESTION, max_new_tokens=tokens)
    answer = result.best.answer
    return (len(answer.token_ids) - 1) / answer.decode_s if answer.decode_s > 0 else 0.0


def _cli_rate(store: Path, model: str, tokens: int) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("KVZIP_RAG_THREADS", "OMP_NUM_THREADS")}
    run = subprocess.run([sys.executable, "-m", "kvzip_rag.cli", "--store", str(store), "--model", model, "ask",
                          QUESTION, "--max-tokens", str(tokens)], capture_output=True, text=True, env=env,
                         timeout=900)
    found = re.search(r"decode ([0-9.]+) tok/s", run.stderr)
    return float(found.group(1)) if found else float("nan")


def run_contention(model_name: str | None = None, tokens: int = 16, log=print) -> dict:
    """Rows of (interface, threads, load, tokens/s); ``load`` is ``no added load`` or ``+N busy`` processes."""
    import kvzip_rag
    from kvzip_rag.qa import QAService
    from kvzip_rag.runtime import apply_thread_policy

    cores = os.cpu_count() or 1
    model = kvzip_rag.load_model(model_name, threads=1)
    name = model_name or kvzip_rag.DEFAULT_MODEL
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvzip-contention-") as folder:
        qa = QAService(folder, model)
        qa.store.add_document(model, TEXT, doc_id="harbour", ratio=0.3)
        qa.answer(QUESTION, max_new_tokens=2)  # warm up
        for load in ("no added load", f"+{cores} busy"):
            busy = []
            if load != "no added load":
                busy = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(cores)]
                for process in busy:
                    process.start()
                time.sleep(1.0)
            try:
                policy = apply_thread_policy(model.device, None) if load == "no added load" else 1
                for label, threads in (("python api, torch default threads", cores),
                                       ("python api, library policy", policy)):
                    rate = _api_rate(qa, threads, tokens)
                    rows.append({"interface": label, "threads": threads, "load": load, "tokens_per_s": rate})
                    log(f"{label:36s} threads={threads} {load:8s} {rate:6.2f} tok/s")
                rate = _cli_rate(Path(folder), name, tokens)
                rows.append({"interface": "cli (kvzip-rag ask)", "threads": "policy", "load": load,
                             "tokens_per_s": rate})
                log(f"{'cli (kvzip-rag ask)':36s} threads=policy {load:8s} {rate:6.2f} tok/s")
            finally:
                for process in busy:
                    process.terminate()
    return {"task": "contention", "cores": cores, "tokens": tokens, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"## Decode speed under contention ({result['cores']} cores, {result['tokens']} tokens per answer)", "",
             "| interface | threads | load | tokens/s |", "|---|---|---|---|"]
    lines += [f"| {r['interface']} | {r['threads']} | {r['load']} | {r['tokens_per_s']:.2f} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"
