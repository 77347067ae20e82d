"""The ``kvzip-rag`` Typer app and its global options, declared once here (each command lives in its own module).

The global options are parameters of the app's callback only; :class:`Group` also accepts them after the command
name (``kvzip-rag ls --store X``) by moving them before it, so every command reads them from ``ctx.obj``
(:func:`settings_of`) and ``--help`` lists them once, under ``kvzip-rag --help``.
"""

from __future__ import annotations

from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from .settings import (
    BlobTimeoutOpt,
    BlobUrlOpt,
    DbOpt,
    DeviceOpt,
    LevelOpt,
    MatmulOpt,
    ModelOpt,
    RatioOpt,
    Settings,
    StoreOpt,
    ThreadsOpt,
)


def _plain_flags(params: list[Any]) -> list[Any]:
    """Flags take no value: an empty metavar keeps typer's help from showing them as ``<bool>``."""
    for param in params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A command whose help shows flags without a value type."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class Group(TyperGroup):
    """The app: global options are accepted after the command name too (moved before it, so a command's own
    option of the same name, as ``calibrate --model``, keeps its value)."""

    def get_params(self, ctx: typer.Context) -> list[Any]:
        return _plain_flags(super().get_params(ctx))

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, self._hoisted(ctx, list(args)))

    def _hoisted(self, ctx: typer.Context, args: list[str]) -> list[str]:
        valued = {opt for param in self.params if param.param_type_name == "option" and not param.is_flag
                  for opt in param.opts}
        position = 0
        while position < len(args) and args[position].startswith("-") and args[position] != "--":
            position += 2 if args[position] in valued else 1
        if position >= len(args) or args[position] == "--":
            return args
        command = self.get_command(ctx, args[position])
        own = {opt for param in (command.params if command else []) for opt in getattr(param, "opts", [])}
        globals_, rest = [], []
        tail = iter(args[position + 1:])
        for token in tail:
            name = token.split("=", 1)[0]
            if token == "--":
                rest += [token, *tail]
                break
            if name in valued and name not in own:
                globals_.append(token)
                if "=" not in token:
                    globals_.append(next(tail, ""))
            else:
                rest.append(token)
        return [*args[:position], *globals_, args[position], *rest]


class App(typer.Typer):
    """The Typer app whose commands are :class:`Command` s."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any):
        return super().command(*args, cls=cls or Command, **kwargs)


app = App(
    name="kvzip-rag",
    cls=Group,
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
    blob_timeout: BlobTimeoutOpt = None,
    model: ModelOpt = None,
    ratio: RatioOpt = None,
    level: LevelOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    matmul: MatmulOpt = None,
) -> None:
    """Answer questions about documents from KVzip-compressed KV caches.

    Index documents once (prefill, score, keep ~30% of the KV pairs, store them); then every question loads a
    small compressed cache instead of re-reading the document. The options above apply to every command and may
    also follow the command name.
    """
    ctx.obj = Settings(store=store, db=db, blob_url=blob_url, blob_timeout=blob_timeout, model=model, ratio=ratio,
                       level=level, device=device, threads=threads, matmul=matmul)


def settings_of(ctx: typer.Context) -> Settings:
    """The global options of this invocation (set by :func:`main`)."""
    root = ctx.find_root()
    return root.obj if isinstance(root.obj, Settings) else Settings()
