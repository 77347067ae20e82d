"""``kvzip-rag bench --task serve-http``, concurrency part: closed-loop clients (1, 2, 4, 8, 16 at once) through the
HTTP server: ``kvzip-rag serve`` (serial), ``serve --batching``, and Ray Serve with 1 and 2 replicas (``serve --ray
--replicas N``, batching inside each replica, each its own local Ray cluster). Every server is a separate process
over the same store of held SQuAD paragraphs, all running side by side and taking turns row by row; each client
streams its question with the ``openai`` client and asks the next as soon as its answer is complete. Per row: answers/s, generated tokens/s (the server's usage counts), TTFT and
latency p50/p95 as the client sees them, and the peak resident memory of the server's whole process tree (for Ray:
every process of its local cluster), sampled every 250 ms.

``budget_s`` bounds the sweep: once spent, no new row starts and the rows done are kept (``cut`` says so).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .serve_batching import concurrency_plot, percentile

CLIENTS = (1, 2, 4, 8, 16)
SERVERS = {"serial": (), "batched": ("--batching",), "ray-1": ("--batching", "--ray", "--replicas", "1"),
           "ray-2": ("--batching", "--ray", "--replicas", "2")}


class TreeRssPeak:
    """Peak resident memory (MiB) of a process and all its descendants while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0.0

    def sample(self) -> float:
        import psutil

        try:
            root = psutil.Process(self.pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0
        for process in processes:
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20

    def __enter__(self) -> TreeRssPeak:
        self._stop = threading.Event()

        def run() -> None:
            while True:
                self.peak = max(self.peak, self.sample())
                if self._stop.wait(0.25):
                    return

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def http_answer(client, question: str, tokens: int) -> dict:
    """One streamed answer: time to its first text piece, to its end, and its generated tokens."""
    start = time.perf_counter()
    first, count = None, 0
    for chunk in client.chat.completions.create(model="kvzip-rag", messages=[{"role": "user", "content": question}],
                                                max_tokens=tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            count = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"ttft_s": first if first is not None else latency, "latency_s": latency, "tokens": count}


def closed_loop(url: str, pid: int, questions: list[str], clients: int, requests: int, tokens: int) -> dict:
    """``clients`` threads, each with its own openai client, answering ``requests`` questions in all."""
    import openai

    taken = iter(range(requests))
    lock = threading.Lock()
    rows: list[dict] = []
    failures: list[str] = []

    def client() -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
        while True:
            with lock:
                i = next(taken, None)
            if i is None:
                return
            try:
                row = http_answer(api, questions[i % len(questions)], tokens)
            except openai.OpenAIError as error:
                with lock:
                    failures.append(f"{type(error).__name__}: {error}"[:200])
                continue
            with lock:
                rows.append(row)

    with TreeRssPeak(pid) as memory:
        start = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - start
    ttft, latency = [r["ttft_s"] for r in rows], [r["latency_s"] for r in rows]
    found = {"clients": clients, "n": len(rows), "failed": len(failures), "wall_s": wall,
             "answers_per_s": len(rows) / wall, "tokens_per_s": sum(r["tokens"] for r in rows) / wall,
             "peak_rss_mb": memory.peak, "errors": failures[:3]}
    if rows:
        found.update(ttft_p50_s=percentile(ttft, 0.5), ttft_p95_s=percentile(ttft, 0.95),
                     latency_p50_s=percentile(latency, 0.5), latency_p95_s=percentile(latency, 0.95))
    return found


def start_server(store: Path, model: str | None, threads: int, options: tuple[str, ...], log,
                 wait_s: float = 600) -> tuple[subprocess.Popen, str]:
    """``kvzip-rag serve`` with ``options`` in a new process (its own local Ray cluster for ``--ray``), once it
    answers /health."""
    import socket

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "kvzip_rag.cli", "--store", str(store), "--threads", str(threads),
               *(["--model", model] if model else []), "serve", *options, "--port", str(port)]
    said = tempfile.TemporaryFile()  # the command says "serving" once every replica is up (/health answers sooner)
    server = subprocess.Popen(command, stderr=said, env={**os.environ, "RAY_ADDRESS": "", "COLUMNS": "200"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            said.seek(0)
            last = said.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"kvzip-rag serve {' '.join(options)} exited with code {server.returncode}: "
                               + " / ".join(last))
        try:
            said.seek(0)
            if b"serving" in said.read():
                httpx.get(f"{url}/health", timeout=5).raise_for_status()
                log(f"server {' '.join(options) or '(serial)'} up at {url}")
                return server, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(server)
    raise RuntimeError(f"kvzip-rag serve {' '.join(options)} did not answer /health within {wait_s:.0f} s")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (the server finishes what is in flight and, for Ray, stops its cluster), then kill if stuck."""
    server.terminate()
    try:
        server.wait(120)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def run_sweep(store: Path, questions: list[str], model_name: str | None = None, threads: int = 1,
              requests: int = 16, tokens: int = 16, clients: tuple[int, ...] = CLIENTS,
              servers: tuple[str, ...] = tuple(SERVERS), budget_s: float | None = None, log=print) -> dict:
    """Every server in ``servers`` (keys of :data:`SERVERS`) at every client count, ``requests`` answers per row.
    The servers run side by side (an idle one costs memory, not CPU) and take turns row by row, so a shared
    machine's load drifting during the run falls on all of them alike."""
    deadline = time.monotonic() + budget_s if budget_s is not None else None
    rows: list[dict] = []
    cut = False
    running: dict[str, tuple[subprocess.Popen, str]] = {}
    try:
        for name in servers:
            running[name] = start_server(store, model_name, threads, SERVERS[name], log)
            closed_loop(running[name][1], running[name][0].pid, questions, 1, 1, 2)  # warm up: the first call
        for count in clients:
            for name, (server, url) in running.items():
                if deadline is not None and time.monotonic() > deadline:
                    cut = True
                    break
                row = {"server": name, **closed_loop(url, server.pid, questions, count, max(requests, count), tokens)}
                rows.append(row)
                log(f"{name:8s} clients={count:2d} n={row['n']} failed={row['failed']} "
                    f"answers/s={row['answers_per_s']:.3f} tok/s={row['tokens_per_s']:.1f} "
                    f"ttft p50/p95={row.get('ttft_p50_s', float('nan')):.2f}/{row.get('ttft_p95_s', float('nan')):.2f}"
                    f" latency p50/p95={row.get('latency_p50_s', float('nan')):.2f}/"
                    f"{row.get('latency_p95_s', float('nan')):.2f} rss={row['peak_rss_mb']:.0f} MiB")
            if cut:
                break
    finally:
        for server, _ in running.values():
            stop_server(server)
    rows.sort(key=lambda r: (list(SERVERS).index(r["server"]), r["clients"]))
    return {"threads": threads, "requests": requests, "max_tokens": tokens, "rows": rows, "cut": cut}


def markdown(sweep: dict) -> str:
    lines = [f"Closed-loop clients through the HTTP server (openai client, streaming), {sweep['threads']} torch "
             f"thread(s) per server process or replica, at most {sweep['max_tokens']} tokens per answer, "
             f"max({sweep['requests']}, clients) answers per row" + (" (budget-cut: rows missing)" if sweep["cut"]
                                                                      else "") + ".", "",
             "| server | clients | n | failed | answers/s | generated tok/s | TTFT p50 / p95 (s) | "
             "latency p50 / p95 (s) | peak RSS, process tree (MiB) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        times = (f"{r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | {r['latency_p50_s']:.2f} / "
                 f"{r['latency_p95_s']:.2f}") if r["n"] else "n/a | n/a"
        lines.append(f"| {r['server']} | {r['clients']} | {r['n']} | {r['failed']} | {r['answers_per_s']:.3f} | "
                     f"{r['tokens_per_s']:.1f} | {times} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def plot(sweep: dict, out_dir: Path) -> Path:
    """Generated tokens/s and p95 latency against concurrent clients, one line per server."""
    lines = {name: [r for r in sweep["rows"] if r["server"] == name and r["n"]] for name in SERVERS}
    return concurrency_plot(lines, out_dir / "serve_http.png", "HTTP")
