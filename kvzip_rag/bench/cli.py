"""``kvzip-rag bench``: run the benchmark and write results.json, results.md and PNG plots.

The main CLI registers the command with ``app.command("bench")(bench)``; ``run_bench`` is the plain function.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from .presets import get_preset, parse_overrides
from .tasks import DEFAULT_TASKS, TASKS

def run_bench(
    preset: str = "quick",
    data_dir: Path | None = None,
    out_dir: Path = Path("bench-out"),
    model: str | None = None,
    tasks: tuple[str, ...] | list[str] = DEFAULT_TASKS,
    embedding: str = "minilm",
    threads: int | None = None,
    loaded_model=None,
    preset_overrides: dict | None = None,
    command: str | None = None,
    log=None,
    limit: int | None = None,
) -> dict:
    """Run the benchmark's ``tasks`` (:data:`~.tasks.TASKS`) and write their results (results.json, results.md and
    PNG plots for the tasks that share them; ``<task>.json``/``<task>.md`` for the others); returns the results.

    ``preset``: ``quick`` or ``full``; ``data_dir`` defaults to ``$KVZIP_RAG_DATA`` or ``../shared/data``;
    ``model``: an alias/path for ``kvzip_rag.load_model`` (default model when None); ``loaded_model``: an already
    wrapped ``KVzipModel`` (tests); ``embedding``: ``minilm`` (chunk retrieval with all-MiniLM-L6-v2, needs
    ``kvzip-rag[bench]``) or ``hashing`` (dependency-free, for tests); ``threads``: torch intra-op threads;
    ``limit``: at most this many questions per set in the grounding task (quick runs), answers per setting in the
    serve task, the first conversations in the conversations task.
    """
    import torch

    from .data import default_data_dir
    from .tasks import Context, run_tasks

    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if threads:
        torch.set_num_threads(threads)
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise typer.BadParameter(f"unknown task(s) {sorted(unknown)}; choose from {', '.join(TASKS)}")
    settings = get_preset(preset, **(preset_overrides or {}))
    data_dir = Path(data_dir) if data_dir else default_data_dir()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"benchmark data folder {data_dir} not found (set --data or KVZIP_RAG_DATA)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    context = Context(settings, data_dir, out_dir, model, loaded_model, log, embedding, limit, threads)
    return run_tasks(tasks, context, command if command is not None else invoked_command())


def invoked_command() -> str | None:
    """The command line this process runs as, for the report (``None`` when not the benchmark's CLI)."""
    if sys.argv[1:2] == ["bench"]:
        return "kvzip-rag bench " + " ".join(sys.argv[2:])
    if Path(sys.argv[0]).parts[-2:] == ("bench", "cli.py"):
        return "python -m kvzip_rag.bench.cli " + " ".join(sys.argv[1:])
    return None


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Smoke-test sizes: a few minutes on a small CPU.")] = False,
    full: Annotated[bool, typer.Option("--full", help="Report sizes: about 20-25 minutes on an idle 2-core "
                                                       "CPU; no new document is started after 24 minutes.")] = False,
    data: Annotated[Path | None, typer.Option("--data", help="Data folder (default $KVZIP_RAG_DATA or "
                                                             "../shared/data).")] = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder for results.json, results.md and plots.")]
    = Path("bench-out"),
    model: Annotated[str | None, typer.Option("--model", help="Model alias, folder, .gguf or hub id.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", help=f"Run only this task (repeatable): "
                                                                  f"{', '.join(TASKS)} (default: "
                                                                  f"{', '.join(DEFAULT_TASKS)}). contention: decode "
                                                                  "speed under a competing CPU load; scale: 10^6 "
                                                                  "segments, S3, Ray; conversations: scripted chats; "
                                                                  "serve: concurrent clients, serial beside batched "
                                                                  "decoding; serve-http: TTFT through kvzip-rag serve "
                                                                  "beside the Python API; precision: bfloat16 weight "
                                                                  "products against float32.")]
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
                                                                     "per question set (quick runs); serve task: "
                                                                     "answers per setting (default 24); "
                                                                     "precision task: questions (default 120); "
                                                                     "conversations task: the first N "
                                                                     "conversations.")] = None,
    write_curve: Annotated[bool, typer.Option("--write-curve", help="fidelity task: store the measured bytes/NLL "
                                                                    "curve as the model's calibration, read by "
                                                                    "kvzip-rag index --target-bytes / "
                                                                    "--max-nll-loss.")] = False,
) -> None:
    """Benchmark KVzip against the full cache, other scorers, re-prefilling and chunk retrieval."""
    if quick and full:
        raise typer.BadParameter("choose one of --quick and --full")
    if write_curve and "fidelity" not in (task or ()):
        raise typer.BadParameter("--write-curve stores the fidelity task's curve: add --task fidelity")
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
    try:
        results = run_bench(preset="full" if full else "quick", data_dir=data, out_dir=out, model=model,
                            tasks=tuple(task) if task else DEFAULT_TASKS, threads=threads, preset_overrides=overrides,
                            limit=limit)
    except FileNotFoundError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if write_curve:
        from kvzip_rag.frontier import write_curve as store_curve
        from kvzip_rag.frontier import written

        typer.echo(written(*store_curve(results)))
    for name in dict.fromkeys(task or ()):  # a standalone task's report is short: shown as well as written
        if TASKS[name].standalone:
            typer.echo("\n".join(TASKS[name].section(results[name])))


def _gpu(model: str | None, data: Path | None, out: Path, max_length: int | None) -> None:
    from .data import default_data_dir
    from .gpu import GPUUnavailableError, run_gpu_bench

    command = invoked_command() or ""
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
