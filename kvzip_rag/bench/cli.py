"""``kvzip-rag bench``: run the benchmark and write results.json, results.md and PNG plots.

The main CLI registers the command with ``app.command("bench")(bench)``; ``run_bench`` is the plain function.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .presets import get_preset, parse_overrides

TASKS = ("squad", "needle", "narrativeqa")
EXTRA_TASKS = ("fidelity", "grounding", "multidoc", "quant", "scale")  # run only when asked for with --task


def run_bench(
    preset: str = "quick",
    data_dir: Path | None = None,
    out_dir: Path = Path("bench-out"),
    model: str | None = None,
    tasks: tuple[str, ...] | list[str] = TASKS,
    embedding: str = "minilm",
    threads: int | None = None,
    loaded_model=None,
    preset_overrides: dict | None = None,
    command: str | None = None,
    log=None,
    limit: int | None = None,
) -> dict:
    """Run the benchmark; returns the results dict and writes ``out_dir/{results.json,results.md,*.png}``.

    ``preset``: ``quick`` or ``full``; ``data_dir`` defaults to ``$KVZIP_RAG_DATA`` or ``../shared/data``;
    ``model``: an alias/path for ``kvzip_rag.load_model`` (default model when None); ``loaded_model``: an already
    wrapped ``KVzipModel`` (tests); ``embedding``: ``minilm`` (chunk retrieval with all-MiniLM-L6-v2, needs
    ``kvzip-rag[bench]``) or ``hashing`` (dependency-free, for tests); ``threads``: torch intra-op threads;
    ``limit``: at most this many questions per set in the grounding task (quick runs).
    """
    import torch

    import kvzip_rag

    from . import report
    from .data import default_data_dir
    from .runner import Bench, write_json

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if threads:
        torch.set_num_threads(threads)
    unknown = set(tasks) - set(TASKS) - set(EXTRA_TASKS)
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS + EXTRA_TASKS)}")
    settings = get_preset(preset, **(preset_overrides or {}))
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"benchmark data folder {data_dir} not found (set --data or KVZIP_RAG_DATA)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "scale" in tasks:
        from .scale import run_scale_task

        scale = run_scale_task(settings, data_dir, out_dir, model, loaded_model, log)
        tasks = tuple(t for t in tasks if t != "scale")
        if not tasks:
            return {"scale": scale}
    if "grounding" in tasks:
        from .grounding import run_grounding_task

        grounding = run_grounding_task(settings, data_dir, out_dir, model, loaded_model, log, embedding, limit)
        log(f"grounding done: {out_dir / 'grounding.md'}")
        tasks = tuple(t for t in tasks if t != "grounding")
        if not tasks:
            return {"grounding": grounding}
    start = time.perf_counter()
    kv_model = loaded_model or kvzip_rag.load_model(model)
    log(f"model {kv_model.name} loaded in {time.perf_counter() - start:.1f}s; preset {settings.name}; "
        f"data {data_dir}; output {out_dir}")
    bench = Bench(kv_model, settings, data_dir, embedding=embedding, log=log)
    results = bench.run(tuple(tasks))
    if command is None and sys.argv[1:2] == ["bench"]:
        command = "kvzip-rag bench " + " ".join(sys.argv[2:])
    elif command is None and Path(sys.argv[0]).parts[-2:] == ("bench", "cli.py"):
        command = "python -m kvzip_rag.bench.cli " + " ".join(sys.argv[1:])
    results["meta"]["command"] = command
    write_json(results, out_dir / "results.json")
    (out_dir / "results.md").write_text(report.markdown(results, command))
    report.plots(results, out_dir)
    log(f"done in {results['meta']['duration_s'] / 60:.1f} min: {out_dir / 'results.md'}")
    return results


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Smoke-test sizes: a few minutes on a small CPU.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Report sizes: about 20-25 minutes on an idle 2-core "
                                                       "CPU; no new document is started after 24 minutes.")] = False,
    data: Annotated[Path | None, typer.Option("--data", help="Data folder (default $KVZIP_RAG_DATA or "
                                                             "../shared/data).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for results.json, results.md and plots.")]
    = Path("bench-out"),
    model: Annotated[str | None, typer.Option("--model", help="Model alias, folder, .gguf or hub id.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help="Run only this task (repeatable): squad, "
                                                                  "needle, narrativeqa; fidelity, grounding, multidoc, quant (only when named); "
                                                                  "or contention "
                                                                  "(decode speed under a competing CPU load, Python API beside the "
                                                                  "CLI); or scale (10^6 segments, S3, Ray; only when named); or "
                                                                  "conversations (scripted chats: turns answered from the "
                                                                  "labelled document); or serve (concurrent clients, "
                                                                  "serial beside batched decoding).")]
    = None,
    threads: Annotated[int | None, typer.Option("--threads", help="Torch CPU threads.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a preset field, name=python-literal "
                                                                "(repeatable), e.g. --set squad_docs=2 "
                                                                "--set 'needle_cases=((4096, 0.5),)'.")] = None,
    preset: Annotated[str | None, typer.Option("--preset", help="quick, full, or gpu: CUDA bf16 decode latency vs "
                                                               "context length (needs --model <local folder>).")]
    = None,
    max_length: Annotated[int | None, typer.Option("--max-length", help="gpu preset: longest context (default: "
                                                                       "the model's window).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="grounding task: at most this many questions "
                                                                     "per question set (quick runs).")] = None,
) -> None:
    """Benchmark KVzip against the full cache, other scorers, re-prefilling and chunk retrieval."""
    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full")
    if preset == "gpu":
        _gpu(model, data, out, max_length)
        return
    if preset is not None:
        if preset not in ("quick", "full") or (quick and preset != "quick") or (full and preset != "full"):
            raise typer.BadParameter(f"--preset is one of quick, full, gpu (and agrees with --quick/--full), got {preset!r}")
        quick, full = preset == "quick", preset == "full"
    try:
        overrides = parse_overrides(set_)
        get_preset("quick", **overrides)  # validate names before loading anything
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    if task and "contention" in task:  # a separate measurement: decode speed under a competing CPU load
        import json

        from .contention import markdown, run_contention

        result = run_contention(model, log=lambda message: typer.echo(message, err=True))
        out.mkdir(parents=True, exist_ok=True)
        (out / "contention.json").write_text(json.dumps(result, indent=2))
        (out / "contention.md").write_text(markdown(result))
        typer.echo(markdown(result))
        return
    if task and "serve" in task:  # a separate measurement: concurrent clients, serial beside batched decoding
        _serve_batching(model, data, out, threads)
        return
    if task and "conversations" in task:  # a separate measurement: chat routing over scripted conversations
        _conversations(model, data, out, threads)
        return
    try:
        run_bench(preset="full" if full else "quick", data_dir=data, out_dir=out, model=model,
                  tasks=tuple(task) if task else TASKS, threads=threads, preset_overrides=overrides, limit=limit)
    except FileNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


def _serve_batching(model: str | None, data: Path | None, out: Path, threads: int | None) -> None:
    import json

    from .serve_batching import markdown, plot, run_serve

    result = run_serve(model, data, threads=threads, log=lambda message: typer.echo(message, err=True))
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_batching.json").write_text(json.dumps(result, indent=2))
    (out / "serve_batching.md").write_text(markdown(result))
    plot(result, out)
    typer.echo(markdown(result))


def _conversations(model: str | None, data: Path | None, out: Path, threads: int | None) -> None:
    import json

    import kvzip_rag

    from .conversations import conversation_figures, markdown

    if threads:
        import torch

        torch.set_num_threads(threads)
    out.mkdir(parents=True, exist_ok=True)
    try:
        result = conversation_figures(kvzip_rag.load_model(model), out, data_dir=data,
                                      log=lambda message: typer.echo(message, err=True))
    except FileNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    (out / "conversations.json").write_text(json.dumps(result, indent=1))
    (out / "conversations.md").write_text(markdown(result))
    typer.echo(markdown(result))


def _gpu(model: str | None, data: Path | None, out: Path, max_length: int | None) -> None:
    from .data import default_data_dir
    from .gpu import GPUUnavailableError, run_gpu_bench

    command = "kvzip-rag bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else ""
    try:
        if model is None:
            raise FileNotFoundError("the gpu preset needs --model <local model folder> (it never downloads)")
        run_gpu_bench(Path(model), Path(data) if data else default_data_dir(), out, max_length=max_length,
                      command=command, log=lambda message: print(message, file=sys.stderr, flush=True))
    except (GPUUnavailableError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


app = typer.Typer(add_completion=False, help="kvzip-rag benchmark")
app.command("bench")(bench)

if __name__ == "__main__":
    app()
