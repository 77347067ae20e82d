"""``inspect``, ``demo`` and ``bench``: pictures of what compression kept, the sample run, the benchmark."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .answering import route
from .app import app, settings_of
from .indexing import index_paths
from .files import SUPPORTED
from .output import answer_figures, compression_line, console, human_bytes, print_table, show, stream_to_console
from .settings import CLIError, handle_errors

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples" / "docs"


@app.command("inspect")
@handle_errors
def inspect_document(
    ctx: typer.Context,
    doc_id: Annotated[str, typer.Argument(help="Document id (see `kvzip-rag ls`).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Folder for the PNG and HTML files.")]
    = Path("kvzip-inspect"),
    question: Annotated[str | None, typer.Option("--question", help="Answer this from the document and mark the "
                                                                     "sentences the answer rests on.")] = None,
) -> None:
    """Draw what compression kept: a PNG heatmap of (layer, kv head) budgets and an HTML view of the tokens."""
    from kvzip_rag.visualize import draw_budget_heatmap, evidence_html, write_token_html

    settings = settings_of(ctx)
    store_ = settings.open_store()
    record = store_.get_document(doc_id)
    if record is None:
        from kvzip_rag.errors import DocumentNotFoundError

        raise DocumentNotFoundError(f"no document {doc_id!r} in the store at {settings.describe_store()} "
                                    "(see `kvzip-rag ls`)")
    if not record.caches:
        raise CLIError(f"document {doc_id!r} has no compressed cache; index it again")
    # The model that built the caches (its tokenizer decodes the HTML view), unless --model says otherwise.
    kv_model = settings.load_model(settings.model or record.caches[0].model_name)
    caches = [
        store_.load_cache(doc_id, kv_model, segment=segment.index, ratio=settings.ratio, level=settings.level)
        for segment in record.segments
    ]
    out.mkdir(parents=True, exist_ok=True)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in doc_id).strip("._") or "document"
    png = draw_budget_heatmap(caches, out / f"{stem}.budgets.png", title=doc_id)
    evidence = ""
    if question is not None:
        from kvzip_rag.qa import QAService, check_question

        result = QAService(store_, kv_model, ratio=settings.ratio, level=settings.level).answer(
            check_question(question), doc_ids=[doc_id], abstain_threshold=None)
        evidence = evidence_html(question, result.text, result.citations,
                                 {s.index: s.text for s in record.segments})
    page = write_token_html(caches, kv_model.tokenizer, out / f"{stem}.tokens.html", title=f"What KVzip kept: {doc_id}",
                            labels=[f"segment {s.index}" for s in record.segments], evidence=evidence)
    kept = sum(c.nbytes for c in caches)
    full = sum(c.full_nbytes for c in caches)
    console.print(f"[bold]{show(doc_id)}[/bold]: {len(caches)} segment(s), KV {human_bytes(kept)} vs "
                  f"{human_bytes(full)} full ({full / max(kept, 1):.1f}x smaller)")
    console.print(f"  budgets heatmap  {show(str(png))}")
    console.print(f"  token view       {show(str(page))}")
    _curve(kv_model, record.caches[0], out / f"{stem}.curve.png")


def _curve(kv_model, cache, path: Path) -> None:
    """The model's measured compression curve with this document's (scorer, ratio, kv_bits) ringed, when the model
    has a curve (kvzip_rag.frontier)."""
    from kvzip_rag.errors import InvalidArgumentError
    from kvzip_rag.frontier import find_curve, plot_curve

    try:
        curve = find_curve(kv_model)
    except InvalidArgumentError:
        console.print("  curve            [dim]none measured for this model (kvzip-rag bench --task fidelity "
                      "--write-curve)[/dim]")
        return
    mine = next((p for p in curve.points if (p.scorer, p.level, p.kv_bits) == (cache.scorer, cache.level,
                                                                                 cache.kv_bits)
                 and abs(p.ratio - cache.ratio) < 1e-9), None)
    console.print(f"  curve            {show(str(plot_curve(curve, path, mine)))}"
                  + (f" ({mine.describe()})" if mine else " [dim](its ratio and bits were not measured)[/dim]"))


@app.command()
@handle_errors
def demo(
    ctx: typer.Context,
    docs: Annotated[Path | None, typer.Option("--docs", file_okay=False, help="Folder of documents with a "
                                              "questions.json (default: examples/docs).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")] = 48,
) -> None:
    """Index the sample documents and answer their questions, with timings and compression figures.

    Re-running it reuses the stored caches.
    """
    settings = settings_of(ctx)
    if docs is None:  # the repository's examples (editable install), else ./examples/docs
        docs = next((c for c in (EXAMPLES_DIR, Path.cwd() / "examples" / "docs") if c.is_dir()), EXAMPLES_DIR)
    folder = docs
    questions_file = folder / "questions.json"
    if not folder.is_dir() or not questions_file.is_file():
        raise CLIError(f"sample documents not found at {folder} (a folder with questions.json); run the demo "
                       "from a clone of the repository or pass --docs")
    questions = json.loads(questions_file.read_text())
    start_all = time.perf_counter()
    console.rule("[bold]kvzip-rag demo[/bold]")
    console.print(f"store: {show(settings.describe_store())}")
    index_paths(settings, sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED))
    kv_model = settings.load_model()
    qa = settings.service(kv_model)
    rows: list[DemoRow] = []
    reprefill: dict[str, float] = {}
    for number, item in enumerate(questions, 1):
        question = item["question"]
        console.print()
        console.print(f"[bold]Q{number}.[/bold] {show(question)}")
        found = _answer(qa, question, max_tokens)
        result = found.answer
        accept = [a.lower() for a in item.get("accept", [item.get("answer", "")]) if a]
        correct = any(a in result.text.lower() for a in accept)
        routed = found.doc_id == item.get("document", found.doc_id)
        verdict = "[green]✓ found[/green]" if correct else "[red]✗ not found[/red]"
        routing = "" if routed else f" [yellow](expected {show(item['document'])})[/yellow]"
        expected = show(item.get("answer", ""))
        console.print(f"   expected: {expected} {verdict} · source {show(found.doc_id)}{routing}")
        console.print(f"   [dim]{answer_figures(result, found.load_s, found.retrieval_s)}[/dim]")
        console.print(f"   [dim]{compression_line(found.cache, found.read_nbytes)}[/dim]")
        if found.doc_id not in reprefill:  # the baseline, once per document: read the whole document again
            reprefill[found.doc_id] = reprefill_seconds(kv_model, found.cache, question)
        rows.append(DemoRow(correct, routed, found, result))
    _demo_summary(rows, reprefill, time.perf_counter() - start_all)


@dataclass
class Found:
    doc_id: str
    answer: object  # kvzip_rag.Answer
    cache: object  # the PackedCache answered from (for figures)
    retrieval_s: float
    load_s: float
    read_nbytes: int
    unsupported_numbers: tuple[str, ...] = ()  # the answer's numbers that none of its documents holds


def _answer(qa, question: str, max_tokens: int) -> Found:
    """One demo question through the core service (the routed best segment answers; tokens stream live, then the
    evidence it rests on, or the abstention)."""
    from .answering import print_evidence

    routing = route(qa, question, 1, None)
    console.print("[bold blue]A:[/bold blue] ", end="")
    stream = qa.stream(question, targets=routing.targets, max_new_tokens=max_tokens)
    stream_to_console(stream)
    print_evidence(stream.result, streamed=True)
    best = stream.result.best
    cache, _, _ = qa.load(best.target)  # served from the store's LRU: for the figures below
    return Found(best.doc_id, best.answer, cache, routing.seconds, best.cache_load_s, best.bytes_loaded,
                 stream.result.unsupported_numbers)


@dataclass
class DemoRow:
    correct: bool
    routed: bool
    found: Found
    result: object  # kvzip_rag.Answer


def reprefill_seconds(model, cache, question: str) -> float:
    """Time to the first token without a stored cache: prefill the whole document and the question again."""
    from kvzip_rag.prefill import prefill

    ids = list(cache.info.input_ids) + model.encode(model.template.question_text(question))
    start = time.perf_counter()
    prefill(model, ids)
    return time.perf_counter() - start


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _demo_summary(rows: list[DemoRow], reprefill: dict[str, float], total_s: float) -> None:
    if not rows:
        return
    first_token = _median([r.found.load_s + r.result.time_to_first_token_s for r in rows])
    baseline = _median(list(reprefill.values())) if reprefill else 0.0
    tokens = sum(max(len(r.result.token_ids) - 1, 0) for r in rows)
    decode = sum(r.result.decode_s for r in rows)
    caches = {r.found.doc_id: r.found.cache for r in rows}  # one per document
    kept_bytes = sum(c.nbytes for c in caches.values())
    full_bytes = sum(c.full_nbytes for c in caches.values())
    table = Table(title="Summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("answers containing the expected text", f"{sum(r.correct for r in rows)}/{len(rows)}")
    table.add_row("questions routed to the right document", f"{sum(r.routed for r in rows)}/{len(rows)}")
    flagged = [f"Q{n} ({', '.join(r.found.unsupported_numbers)})" for n, r in enumerate(rows, 1)
               if r.found.unsupported_numbers]
    table.add_row("numbers not in the documents", show(", ".join(flagged)) if flagged else "none")
    table.add_row("first token from the stored cache",
                  f"{first_token * 1000:.0f} ms (median; cache load + first token)")
    if baseline:
        table.add_row("re-reading the document instead", f"{baseline * 1000:.0f} ms (median prefill of document + "
                                                          f"question: {baseline / max(first_token, 1e-9):.1f}x slower)")
    table.add_row("decode speed", f"{tokens / decode:.1f} tok/s" if decode > 0 else "-")
    table.add_row("KV cache kept vs full", f"{human_bytes(kept_bytes)} vs {human_bytes(full_bytes)} "
                                           f"({full_bytes / max(kept_bytes, 1):.1f}x smaller, {len(caches)} documents)")
    table.add_row("total time", f"{total_s:.1f}s")
    console.print()
    print_table(table)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@handle_errors
def bench(ctx: typer.Context) -> None:
    """Benchmark KVzip against the alternatives (options: kvzip-rag bench --help)."""
    try:
        from kvzip_rag.bench import cli as bench_cli
    except ImportError as error:
        raise CLIError(f"the benchmark is not available in this installation ({error})") from error
    args = list(ctx.args)
    settings = settings_of(ctx)
    if settings.model and "--model" not in args:
        args += ["--model", settings.model]
    if settings.threads and "--threads" not in args:
        args += ["--threads", str(settings.threads)]
    if hasattr(bench_cli, "bench"):
        command = typer.main.get_command(_single(bench_cli.bench))
    elif hasattr(bench_cli, "app"):
        command = typer.main.get_command(bench_cli.app)
    else:
        raise CLIError("kvzip_rag.bench.cli defines no `bench` command")
    # Usage errors and typer.Exit propagate to the outer command, which prints them as for any other command.
    code = command.main(args=args, prog_name="kvzip-rag bench", standalone_mode=False)
    if isinstance(code, int) and code:  # click returns the code of a typer.Exit when not standalone
        raise typer.Exit(code)


def _single(function: Callable) -> typer.Typer:
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command()(function)
    return sub


