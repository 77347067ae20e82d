"""The ``kvzip-rag`` Typer app and its global options (each command lives in its own module)."""

from __future__ import annotations

import typer

from .settings import (
    BlobUrlOpt,
    DbOpt,
    DeviceOpt,
    LevelOpt,
    ModelOpt,
    RatioOpt,
    Settings,
    StoreOpt,
    ThreadsOpt,
)

app = typer.Typer(
    name="kvzip-rag",
    help="Answer questions about documents from KVzip-compressed KV caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def main(
    ctx: typer.Context,
    store: StoreOpt = None,
    db: DbOpt = None,
    blob_url: BlobUrlOpt = None,
    model: ModelOpt = None,
    ratio: RatioOpt = None,
    level: LevelOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
) -> None:
    """Answer questions about documents from KVzip-compressed KV caches.

    Index documents once (prefill, score, keep ~30% of the KV pairs, store them); then every question loads a
    small compressed cache instead of re-reading the document.
    """
    ctx.obj = Settings(store=store, db=db, blob_url=blob_url, model=model, ratio=ratio, level=level, device=device,
                       threads=threads)


def settings_of(ctx: typer.Context, **overrides) -> Settings:
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    return base.merged(**overrides)
