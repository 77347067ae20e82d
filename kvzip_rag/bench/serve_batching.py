"""``kvzip-rag bench --task serve`` (in-process part): many users at once, today's serial path beside batching.

Closed-loop clients (1, 2, 4, 8, 16 at once) ask held SQuAD questions over a store of >= 20 paragraphs, each client
sending its next question as soon as its answer is complete, through :meth:`QAService.stream` (routing, loading
and grounding included): once with the serial service (one lock, one answer at a time) and once with
``batching=True`` (:mod:`kvzip_rag.scheduler`), in the same run and process. Per setting: answers/s, generated
tokens/s (over the whole run, and while every client was asking: :func:`steady_rate`), time to first piece and
total latency (p50/p95, as the client sees them), and the peak resident memory sampled while the setting ran.
Greedy answers of both paths are compared question by question. Where the CPU multiplies bfloat16
(:mod:`kvzip_rag.matmul`), both paths run again with ``matmul="bfloat16"`` on the same store, and every row says
its precision: the float32 serial path stays the reference.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

from .report import _f

CLIENTS = (1, 2, 4, 8, 16)
DEFAULT_REQUESTS = 24  # answers per setting (``bench --limit`` sets it)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation (statistics' 'inclusive' method)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class RssPeak:
    """The peak resident memory (MiB) of this process while the block runs, sampled every 20 ms."""

    def __enter__(self) -> RssPeak:
        from .measure import current_rss_mb

        self.peak, self._stop = current_rss_mb() or 0.0, threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, current_rss_mb() or 0.0)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def closed_loop(service, questions: list[str], clients: int, requests: int, options: dict) -> dict:
    """``clients`` threads answering ``requests`` questions in all (round-robin over ``questions``)."""
    taken = iter(range(requests))
    lock = threading.Lock()
    rows: list[dict] = []
    drain: list[float] = []  # when the first client found no question left: from then on fewer clients ask

    def client() -> None:
        first_request = True
        while True:
            with lock:
                i = next(taken, None)
                if i is None:
                    drain.append(time.perf_counter())
                    return
            start = time.perf_counter()
            stream = service.stream(questions[i % len(questions)], **options)
            first = None
            for _ in stream:
                first = first or time.perf_counter()
            end = time.perf_counter()
            answer = stream.result.best.answer
            with lock:
                rows.append({"question": i % len(questions), "text": stream.result.text,
                             "doc_ids": [t.doc_id for t in stream.result.used], "tokens": len(answer.token_ids),
                             "ttft_s": (first or end) - start, "latency_s": end - start, "client_first": first_request,
                             "span": ((first or end) - began, end - began)})
            first_request = False

    with RssPeak() as memory:
        began = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - began
    ttft, latency = [r["ttft_s"] for r in rows], [r["latency_s"] for r in rows]
    # clients start together, so their first questions arrive as one burst; the later ones as answers end
    later = [r["ttft_s"] for r in rows if not r["client_first"]]
    return {
        "clients": clients, "n": len(rows), "wall_s": wall, "answers_per_s": len(rows) / wall,
        "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
        # with fewer questions than clients, some never ask: no time when all of them did
        "steady_tokens_per_s": steady_rate(rows, min(drain) - began) if requests >= clients else None,
        "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
        "ttft_p95_after_first_s": percentile(later, 0.95) if later else None,
        "latency_p50_s": percentile(latency, 0.5), "latency_p95_s": percentile(latency, 0.95),
        "peak_rss_mb": memory.peak, "answers": rows,
    }


def steady_rate(rows: list[dict], until: float) -> float:
    """Generated tokens/s from the start until ``until`` (when the first client ran out of questions), i.e. while
    every client was asking: the tail where the last answers finish with fewer clients is left out (the whole
    run's rate counts it; a serial path has no such tail). Each answer's tokens count as produced evenly between
    its first piece and its end (``span``, seconds from the start)."""
    tokens = 0.0
    for row in rows:
        first, end = row["span"]
        if end <= until:
            tokens += row["tokens"]
        elif first < until:
            tokens += row["tokens"] * (until - first) / (end - first)
    return tokens / until


def default_matmuls() -> tuple[str, ...]:
    """float32, and bfloat16 where this CPU multiplies it."""
    from kvzip_rag.matmul import bfloat16_matmul_supported

    return ("float32", "bfloat16") if bfloat16_matmul_supported() else ("float32",)


def run_serve(model_name: str | None = None, data_dir: Path | None = None, documents: int = 20,
              requests: int = DEFAULT_REQUESTS, max_new_tokens: int = 32, threads: int | None = None, log=print,
              matmuls: tuple[str, ...] | None = None) -> dict:
    """Both paths at every client count and ``matmuls`` precision (default: :func:`default_matmuls`);
    ``requests`` answers per setting."""
    import kvzip_rag
    from kvzip_rag.matmul import use_matmul
    from kvzip_rag.qa import QAService

    from .data import default_data_dir, load_squad

    model = kvzip_rag.load_model(model_name, threads=threads, matmul="float32")  # the store is indexed in float32
    import torch

    docs = load_squad(data_dir or default_data_dir(), lambda text: len(model.encode(text)), docs=documents,
                      min_tokens=1, max_tokens=400, questions_per_doc=1)
    questions = [doc.questions[0].question for doc in docs]
    options = {"max_new_tokens": max_new_tokens}
    settings = []
    with tempfile.TemporaryDirectory(prefix="kvzip-serve-") as folder:
        serial = QAService(folder, model)
        for doc in docs:
            serial.store.add_document(model, doc.text, doc_id=doc.id, ratio=0.3)
        batched = QAService(serial.store, model, batching=True)
        log(f"{len(docs)} documents stored; {torch.get_num_threads()} torch threads")
        for matmul in matmuls or default_matmuls():
            use_matmul(model.model, matmul)
            for service in (serial, batched):
                service.answer(questions[0], max_new_tokens=4)  # warm up (and start the scheduler)
            for clients in CLIENTS:
                for path, service in (("serial", serial), ("batched", batched)):
                    row = {"path": path, "matmul": matmul, **_measure(service, questions, clients, requests, options)}
                    settings.append(row)
                    log(f"{path:8s} {matmul} clients={clients} answers/s={row['answers_per_s']:.2f} "
                        f"tok/s={row['tokens_per_s']:.1f} (all clients asking: {_f(row['steady_tokens_per_s'], 1)}) "
                        f"ttft p50/p95={row['ttft_p50_s']:.2f}/{row['ttft_p95_s']:.2f} s "
                        f"latency p50/p95={row['latency_p50_s']:.2f}/{row['latency_p95_s']:.2f} s "
                        f"batch mean/peak={row['mean_batch']:.1f}/{row['peak_batch']} "
                        f"prefilled together={row['peak_prefill']} "
                        f"rss={row['peak_rss_mb']:.0f} MiB")
    return {"task": "serve", "model": model.name, "threads": torch.get_num_threads(), "documents": len(docs),
            "requests": requests, "max_new_tokens": max_new_tokens, "settings": settings,
            "agreement": agreement(settings)}


def _measure(service, questions: list[str], clients: int, requests: int, options: dict) -> dict:
    """One setting's closed loop, with the batch its scheduler ran (1 for the serial path)."""
    scheduler = service.scheduler
    if scheduler is not None:
        scheduler.peak_batch = scheduler.peak_prefill = scheduler.steps = scheduler.decoded = 0
    row = closed_loop(service, questions, clients, requests, options)
    row["peak_batch"] = scheduler.peak_batch if scheduler is not None else 1
    row["mean_batch"] = scheduler.decoded / max(scheduler.steps, 1) if scheduler is not None else 1.0
    row["peak_prefill"] = scheduler.peak_prefill if scheduler is not None else 1
    return row


def agreement(settings: list[dict], path: str = "batched", reference: str | None = None) -> dict:
    """Greedy answers (text and sources) of ``path`` that equal the serial path's for the same question: in the
    same precision (``reference`` None), else in the ``reference`` precision (its own rows left out)."""
    serial = {(s["matmul"], r["question"]): (r["text"], r["doc_ids"]) for s in settings if s["path"] == "serial"
              for r in s["answers"]}
    compared = [serial[key] == (r["text"], r["doc_ids"]) for s in settings
                if s["path"] == path and s["matmul"] != reference for r in s["answers"]
                if (key := (reference or s["matmul"], r["question"])) in serial]
    return {"compared": len(compared), "equal": sum(compared)}


def speedups(settings: list[dict]) -> list[dict]:
    """Per client count and precision: the batched path's tokens/s over the serial path's in the same precision,
    and over the float32 serial path's (the reference)."""
    serial = {(s["matmul"], s["clients"]): s["tokens_per_s"] for s in settings if s["path"] == "serial"}
    return [{"matmul": s["matmul"], "clients": s["clients"],
             "same": s["tokens_per_s"] / serial[(s["matmul"], s["clients"])],
             "float32": s["tokens_per_s"] / serial[("float32", s["clients"])]}
            for s in settings if s["path"] == "batched"
            and {(s["matmul"], s["clients"]), ("float32", s["clients"])} <= serial.keys()]


def markdown(result: dict) -> str:
    lines = [f"### In-process batching: {result['documents']} SQuAD paragraphs, model {result['model']}, "
             f"{result['threads']} torch threads, {result['requests']} answers per setting, at most "
             f"{result['max_new_tokens']} tokens each", "",
             "| path | matmul | clients | n | answers/s | generated tok/s | tok/s while all clients ask | "
             "TTFT p50 / p95 (s) | TTFT p95 after each client's first (s) | latency p50 / p95 (s) | batch mean / peak | "
             "peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    lines += [f"| {r['path']} | {r['matmul']} | {r['clients']} | {r['n']} | {r['answers_per_s']:.2f} | "
              f"{r['tokens_per_s']:.1f} | "
              f"{_f(r['steady_tokens_per_s'], 1)} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
              f"{_f(r['ttft_p95_after_first_s'], 2)} | "
              f"{r['latency_p50_s']:.2f} / {r['latency_p95_s']:.2f} | "
              f"{r['mean_batch']:.1f} / {r['peak_batch']} | {r['peak_rss_mb']:.0f} |" for r in result["settings"]]
    agree = result["agreement"]
    lines += ["", f"Batched answers equal to the serial path's in the same precision (text and sources, same "
                  f"question): {agree['equal']} of {agree['compared']}."]
    rows = speedups(result["settings"])
    if any(r["matmul"] != "float32" for r in rows):
        other = agreement(result["settings"], "serial", reference="float32")
        lines += [f"Serial answers in bfloat16 matmuls equal to the float32 ones: {other['equal']} of "
                  f"{other['compared']}.", "", "Generated tokens/s of the batched path over the serial path's:", "",
                  "| matmul | clients | over serial, same precision | over serial float32 |", "|---|---|---|---|"]
        lines += [f"| {r['matmul']} | {r['clients']} | {r['same']:.2f}x | {r['float32']:.2f}x |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(result: dict, out_dir: Path) -> Path:
    """Generated tokens/s and p95 latency against concurrent clients, serial beside batched."""
    lines = {f"{path} ({matmul})": [r for r in result["settings"] if (r["path"], r["matmul"]) == (path, matmul)]
             for matmul in dict.fromkeys(r["matmul"] for r in result["settings"]) for path in ("serial", "batched")}
    return concurrency_plot(lines, out_dir / "serve.png")


def concurrency_plot(lines: dict[str, list[dict]], path: Path, where: str = "") -> Path:
    """Tokens/s and p95 latency against concurrent clients, one line per name (with its rows; empty ones skipped,
    their marker kept); ``where`` tags the titles (e.g. "HTTP"). Shared by the in-process and HTTP serve tasks."""
    from kvzip_rag.extras import pyplot

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, rows), marker in zip(lines.items(), "osD^"):
        if rows:
            left.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], marker=marker, label=name)
            right.plot([r["clients"] for r in rows], [r["latency_p95_s"] for r in rows], marker=marker, label=name)
    tag = f" ({where})" if where else ""
    left.set(xlabel="concurrent clients", ylabel="generated tokens/s", title=f"throughput{tag}")
    right.set(xlabel="concurrent clients", ylabel="p95 latency (s)", title=f"latency{tag}")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
