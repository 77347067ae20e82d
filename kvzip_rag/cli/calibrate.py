"""``kvzip-rag calibrate``: train a model's kvzip-fast gate on a folder of text (registered by kvzip_rag.cli.app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app


@app.command("calibrate")
def calibrate(
    data: Annotated[Path, typer.Option("--data", help="Folder of .txt/.md files to calibrate on (not the "
                                                      "documents you will evaluate on).")],
    model: Annotated[str | None, typer.Option("--model", help="Model alias, folder, .gguf or hub id "
                                                              "(default: the default model).")] = None,
    segment_tokens: Annotated[int, typer.Option(help="Tokens per calibration segment.")] = 1024,
    max_segments: Annotated[int, typer.Option(help="Most segments to score with KVzip (each ~3 prefills).")] = 10,
    holdout: Annotated[int, typer.Option(help="Segments kept out of training to measure the gate.")] = 2,
    threads: Annotated[int | None, typer.Option(help="Torch CPU threads.")] = None,
) -> None:
    """Score a calibration corpus with KVzip and fit the kvzip-fast gate; saved beside the converted model."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    import kvzip_rag
    from kvzip_rag.scorers.fast_calibration import calibrate as run_calibration
    from kvzip_rag.scorers.fast_calibration import read_corpus
    from kvzip_rag.errors import KVzipError
    from kvzip_rag.scorers.fast_gate import gate_path

    console = Console(stderr=True)
    try:
        with console.status("Loading model…"):
            loaded = kvzip_rag.load_model(model, threads=threads)
        texts = read_corpus(data, loaded, segment_tokens, max_segments)
        columns = (TextColumn("KVzip scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("segments"),
                   TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn())
        with Progress(*columns, console=console) as bar:
            task = bar.add_task("score", total=len(texts))
            gate = run_calibration(loaded, texts, holdout, lambda done, total: bar.update(task, completed=done))
        path = gate.save(gate_path(loaded))
    except KVzipError as error:
        console.print(f"[red]error:[/red] {error}")
        raise typer.Exit(1) from error
    meta = gate.meta
    console.print(f"gate for {loaded.name} ({loaded.fingerprint}) written to {path}")
    console.print(f"{meta['segments']} segments, {meta['tokens']} tokens, {meta['seconds']}s; held-out rank "
                  f"correlation with KVzip {meta.get('heldout_rho_global_gate')} (key-norm "
                  f"{meta.get('heldout_rho_global_keynorm')}), kept-set overlap at 0.3 "
                  f"{meta.get('heldout_kept_overlap_0.3_gate')}")
