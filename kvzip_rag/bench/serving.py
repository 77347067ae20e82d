"""``kvzip-rag bench --task serve-http``: what HTTP costs. One client at a time asks held SQuAD questions over a store of
20 documents (one paragraph of each of the first 20 articles), through the Python API (:class:`QAService.stream`)
and through ``kvzip-rag serve`` (a separate process, the ``openai`` client streaming), interleaved question by
question so both see the same machine load; then ``kvzip-rag ask --server`` as a user runs it (a new process per
question), each beside the same question through the openai client.

Then the concurrency sweep (:mod:`.serve_sweep`): closed-loop clients through the serial, batched and Ray Serve
(1 and 2 replicas) servers.

Time to first token (TTFT) is measured by the caller: from the call (the request) to the first text piece, so it
includes routing, loading the cache and the question's prefill. Ratios are per question (paired), reported as the
median with a 95% bootstrap interval (:func:`kvzip_rag.bench.metrics.median_interval`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .metrics import median_interval

DOCUMENTS = 20


def _held(data_dir: Path) -> list[tuple[str, str, str]]:
    """``(doc_id, text, question)``: the first paragraph of each of the first articles, and its first question."""
    articles = json.loads((data_dir / "squad" / "dev-v1.1-even-articles.json").read_text())["data"]
    return [(a["title"], a["paragraphs"][0]["context"], a["paragraphs"][0]["qas"][0]["question"])
            for a in articles[:DOCUMENTS]]


def _api_ttft(qa, question: str, tokens: int) -> float:
    start = time.perf_counter()
    first = None
    for _ in qa.stream(question, max_new_tokens=tokens):
        first = first or time.perf_counter() - start
    return first if first is not None else float("nan")


def _http_ttft(client, question: str, tokens: int) -> float:
    start = time.perf_counter()
    first = None
    for chunk in client.chat.completions.create(model="kvzip-rag", messages=[{"role": "user", "content": question}],
                                                max_tokens=tokens, stream=True):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
    return first if first is not None else float("nan")


def _cli(url: str, question: str, tokens: int) -> tuple[float, float]:
    """``(first token seen by the CLI after its request, the whole command's wall time)``."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "kvzip_rag.cli", "ask", question, "--server", url, "--max-tokens",
                          str(tokens)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "COLUMNS": "200"})
    wall = time.perf_counter() - start
    found = re.search(r"first token ([0-9.]+) s", run.stderr)
    return (float(found.group(1)) if found else float("nan")), wall


def _summary(values: list[float]) -> dict:
    found = median_interval([v for v in values if v == v])
    return {"n": len(values), "median": found[0], "low": found[1], "high": found[2]} if found else {"n": len(values)}


def run_serve(model_name: str | None, data_dir: Path, threads: int = 2, tokens: int = 16, rounds: int = 2,
              log=print, overhead: bool = True, sweep: dict | None = None) -> dict:
    """Over a store of the held paragraphs: with ``overhead``, TTFT in-process vs through the server (``rounds``
    passes over the held questions) and ``ask --server``; with ``sweep`` (:func:`.serve_sweep.run_sweep`'s options),
    the concurrency sweep over the servers (under ``"sweep"``)."""
    import kvzip_rag
    from kvzip_rag.qa import QAService

    from .serve_sweep import run_sweep

    held = _held(data_dir)
    model = kvzip_rag.load_model(model_name, threads=threads)
    result = {"model": model.name, "threads": threads, "max_tokens": tokens, "documents": len(held)}
    with tempfile.TemporaryDirectory(prefix="kvzip-serve-bench-") as folder:
        qa = QAService(folder, model)
        start = time.perf_counter()
        for doc_id, text, _ in held:
            qa.store.add_document(model, text, doc_id=doc_id, ratio=0.3)
        log(f"indexed {len(held)} documents in {time.perf_counter() - start:.1f} s")
        if overhead:
            result.update(_overhead(qa, Path(folder), model_name, held, threads, tokens, rounds, log))
        if sweep is not None:
            result["sweep"] = run_sweep(Path(folder), [q for _, _, q in held], model_name, log=log, **sweep)
    return result


def _overhead(qa, store: Path, model_name: str | None, held: list[tuple[str, str, str]], threads: int, tokens: int,
              rounds: int, log) -> dict:
    import openai

    from .serve_sweep import start_server, stop_server

    server, url = start_server(store, model_name, threads, (), log)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        _api_ttft(qa, held[0][2], 2), _http_ttft(client, held[0][2], 2)  # warm both
        api, http = [], []
        for round_ in range(rounds):
            for n, (_, _, question) in enumerate(held):
                if (n + round_) % 2 == 0:  # alternate which path goes first
                    http.append(_http_ttft(client, question, tokens))
                    api.append(_api_ttft(qa, question, tokens))
                else:
                    api.append(_api_ttft(qa, question, tokens))
                    http.append(_http_ttft(client, question, tokens))
            log(f"round {round_ + 1}: api median {sorted(api)[len(api) // 2]:.3f} s, "
                f"http {sorted(http)[len(http) // 2]:.3f} s")
        cli, cli_http = [], []  # the same questions through the openai client, paired
        for _, _, question in held[:10]:
            cli_http.append(_http_ttft(client, question, tokens))
            cli.append(_cli(url, question, tokens))
    finally:
        stop_server(server)
    return {
        "api_ttft_s": _summary(api), "http_ttft_s": _summary(http),
        "http_over_api": _summary([h / a for h, a in zip(http, api)]),
        "cli_first_token_s": _summary([c[0] for c in cli]), "cli_wall_s": _summary([c[1] for c in cli]),
        "cli_over_http": _summary([c[0] / h for c, h in zip(cli, cli_http)]),
    }


def markdown(result: dict) -> str:
    def row(label: str, key: str, unit: str = " s") -> str:
        found = result[key]
        if "median" not in found:
            return f"| {label} | n/a | {found['n']} |"
        return (f"| {label} | {found['median']:.3f}{unit} [{found['low']:.3f}, {found['high']:.3f}] | "
                f"{found['n']} |")

    from .serve_sweep import markdown as sweep_markdown

    sweep = sweep_markdown(result["sweep"]) if "sweep" in result else ""
    if "api_ttft_s" not in result:
        return sweep
    return "\n".join([
        f"Model {result['model']}, {result['threads']} threads, {result['documents']} documents (ratio 0.3), "
        f"{result['max_tokens']} answer tokens, one client at a time; median [95% bootstrap interval].",
        "",
        "| measure | median | n |",
        "|---|---|---|",
        row("TTFT, Python API (QAService.stream)", "api_ttft_s"),
        row("TTFT, HTTP server (openai client, streaming)", "http_ttft_s"),
        row("HTTP / API TTFT, paired per question", "http_over_api", "x"),
        row("`ask --server`: first token after its request", "cli_first_token_s"),
        row("`ask --server` first token / HTTP TTFT, paired per question", "cli_over_http", "x"),
        row("`ask --server`: whole command (process start to exit)", "cli_wall_s"),
        "",
    ]) + sweep
