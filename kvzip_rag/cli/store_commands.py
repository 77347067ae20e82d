"""Commands that need no model: ``ls``, ``rm``, ``gc`` (they never import the model stack)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app, settings_of
from .output import console, human_bytes, print_table, show
from .settings import CLIError, DbOpt, StoreOpt, handle_errors


@app.command("ls")
@handle_errors
def list_documents(ctx: typer.Context, store: StoreOpt = None, db: DbOpt = None) -> None:
    """List stored documents: segments, tokens, ratio, bytes kept vs the full cache."""
    settings = settings_of(ctx, store=store, db=db)
    records = settings.open_store().list_documents()
    if not records:
        console.print(f"The store at {show(settings.describe_store())} is empty; add documents with "
                      "[bold]kvzip-rag index PATH[/bold].")
        return
    table = Table(title=f"{len(records)} document(s) in {show(settings.describe_store())}", title_justify="left")
    table.add_column("doc id", style="cyan", overflow="fold")
    for column in ("segments", "tokens", "ratio", "bits", "bytes", "full bytes", "model"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for record in records:
        kinds: dict[tuple, list] = {}
        for cache in record.caches:
            kinds.setdefault((cache.model_name, cache.ratio, cache.level), []).append(cache)
        if not kinds:
            table.add_row(show(record.id), str(len(record.segments)), str(record.token_count), "-", "-", "-", "-",
                          "-")
        for (model_name, ratio, level), caches in sorted(kinds.items()):
            bits = "/".join(str(b) for b in sorted({c.kv_bits for c in caches}, reverse=True))
            kept = sum(c.kv_nbytes for c in caches)
            full = sum(c.full_nbytes for c in caches)
            table.add_row(
                show(record.id), str(len(record.segments)), str(record.token_count),
                f"{ratio:g} {show(level)}", bits, human_bytes(kept), f"{human_bytes(full)} ({full / max(kept, 1):.1f}x)",
                show(_short_model_name(model_name)),
            )
    print_table(table)


def _short_model_name(name: str) -> str:
    """Aliases as they are; a model folder or file by its last path component."""
    return Path(name).name if ("/" in name or os.sep in name) and Path(name).exists() else name


@app.command("rm")
@handle_errors
def remove(
    ctx: typer.Context,
    doc_ids: Annotated[list[str], typer.Argument(help="Document ids (see `kvzip-rag ls`).", show_default=False)],
    store: StoreOpt = None, db: DbOpt = None,
) -> None:
    """Delete documents, their caches and blobs."""
    settings = settings_of(ctx, store=store, db=db)
    store_ = settings.open_store()
    unknown = [d for d in doc_ids if d not in store_]
    if unknown:
        raise CLIError(f"no document {', '.join(map(repr, unknown))} in the store at {settings.describe_store()} "
                       "(see `kvzip-rag ls`); nothing was removed")
    for doc_id in doc_ids:
        store_.delete_document(doc_id)
        console.print(f"removed [cyan]{show(doc_id)}[/cyan]")


@app.command("gc")
@handle_errors
def collect_garbage(
    ctx: typer.Context,
    now: Annotated[bool, typer.Option("--now", help="Also remove orphan blobs younger than 10 minutes (only when "
                                                    "no other process is indexing into this store).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed, remove nothing.")] = False,
    store: StoreOpt = None, db: DbOpt = None,
) -> None:
    """Remove cache blobs that no document points to (left by interrupted indexing); frees disk space.

    By default only blobs older than 10 minutes go: a younger one may belong to an `index` still running in
    another process. `--now` removes them all (use it on a quiet store).
    """
    settings = settings_of(ctx, store=store, db=db)
    report = settings.open_store().gc(min_age_s=0, dry_run=dry_run) if now else \
        settings.open_store().gc(dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    console.print(f"{verb} {len(report.removed)} orphan blob(s), {human_bytes(report.freed_nbytes)}")
    if report.missing:
        console.print(f"[yellow]{len(report.missing)} cache row(s) point at a missing blob: re-index those "
                      "documents (kvzip-rag index PATH --force)[/yellow]")
