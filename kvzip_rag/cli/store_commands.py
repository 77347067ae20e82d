"""Commands that need no model: ``ls``, ``rm``, ``gc``, ``verify`` (they never import the model stack)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app, settings_of
from kvzip_rag.errors import OrphanBlobWarning

from .output import console, human_bytes, note, print_table, problem, show
from .settings import CLIError, NoStoreError, handle_errors


@app.command("ls")
@handle_errors
def list_documents(ctx: typer.Context) -> None:
    """List stored documents: segments, tokens, ratio, bytes kept vs the full cache."""
    settings = settings_of(ctx)
    try:
        records = settings.open_store().list_documents()
    except NoStoreError:  # nothing to list, and nothing is created
        records = []
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
) -> None:
    """Delete documents, their caches and blobs."""
    settings = settings_of(ctx)
    store_ = settings.open_store()
    unknown = [d for d in doc_ids if d not in store_]
    if unknown:
        raise CLIError(f"no document {', '.join(map(repr, unknown))} in the store at {settings.describe_store()} "
                       "(see `kvzip-rag ls`); nothing was removed")
    for doc_id in doc_ids:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", OrphanBlobWarning)
            store_.delete_document(doc_id)
        console.print(f"removed [cyan]{show(doc_id)}[/cyan]")
        for warning in caught:  # the document is gone; a blob the object store kept is gc's to remove
            note(str(warning.message))


@app.command("gc")
@handle_errors
def collect_garbage(
    ctx: typer.Context,
    now: Annotated[bool, typer.Option("--now", help="Also remove what is younger than 10 minutes (only when no "
                                                    "other process is indexing into this store).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would be removed, remove nothing.")] = False,
) -> None:
    """Remove cache blobs that no document points to (left by interrupted indexing), and the shared template
    prefix of a model no stored document uses any more; frees disk (or bucket) space.

    By default only what is older than 10 minutes goes: a younger blob or prefix may belong to an `index` still
    running in another process. `--now` removes them all (use it on a quiet store).
    """
    settings = settings_of(ctx)
    report = settings.open_store().gc(now=now, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    prefixes = f", and the shared prefix of {', '.join(map(show, report.prefixes))}" if report.prefixes else ""
    console.print(f"{verb} {len(report.removed) - len(report.prefixes)} orphan blob(s){prefixes}, "
                  f"{human_bytes(report.freed_nbytes)}")
    if report.missing:
        console.print(f"[yellow]{len(report.missing)} cache row(s) point at a missing blob: re-index those "
                      "documents (kvzip-rag index PATH --force)[/yellow]")


@app.command("verify")
@handle_errors
def verify(
    ctx: typer.Context,
    doc_ids: Annotated[list[str] | None, typer.Argument(help="Document ids (default: all).", show_default=False)]
    = None,
) -> None:
    """Read every cache blob (and the shared prefixes) back and check it against its row: present, same sha256,
    valid checksums, built from its segment's text. Exit code 1 when any is damaged or missing."""
    settings = settings_of(ctx)
    store = settings.open_store()
    unknown = [d for d in doc_ids or [] if d not in store]
    if unknown:
        raise CLIError(f"no document {', '.join(map(repr, unknown))} in the store at {settings.describe_store()} "
                       "(see `kvzip-rag ls`); nothing was verified")
    report = store.verify(doc_ids or None)
    for item in report.problems:
        problem(item.error)
    if report.problems:
        bad = sum(item.cache_id is not None for item in report.problems)
        rowless = len(report.problems) - bad
        without = f", {rowless} segment(s) without a cache" if rowless else ""
        documents = len({item.document_id for item in report.problems})
        raise CLIError(f"{bad} of {report.checked} cache(s) damaged or missing{without}, in {documents} "
                       "document(s): re-index those documents (kvzip-rag index PATH --force)")
    console.print(f"{report.checked} cache(s) in {show(settings.describe_store())} verified")
