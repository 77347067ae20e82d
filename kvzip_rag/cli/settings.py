"""Global options, the store and model they name, and the error boundary of every command (one red line)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from kvzip_rag.budget import DEFAULT_BUDGET, LEVELS, Budget
from kvzip_rag.errors import KVzipError

from .output import fail, say, show


DEFAULT_BLOB_TIMEOUT = 5.0  # seconds: interactive commands fail fast when the object store is down


class CLIError(Exception):
    """A problem the user can fix (bad path, unknown id...): one red line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


class NoStoreError(CLIError):
    """The store named by the options does not exist (and the command does not create one)."""


@dataclass
class Settings:
    """Global options; a command's own options override them."""

    store: Path | None = None
    db: str | None = None
    blob_url: str | None = None
    blob_timeout: float | None = None
    model: str | None = None
    ratio: float | None = None
    level: str | None = None
    device: str | None = None
    threads: int | None = None
    matmul: str | None = None
    _store: object = field(default=None, repr=False)

    def index_budget(self) -> Budget:
        """What ``index`` compresses at: ``--ratio``/``--level`` where given, else the package's default budget."""
        return Budget(self.ratio or DEFAULT_BUDGET.ratio, self.level or DEFAULT_BUDGET.level)

    def load_model(self, name: str | None = None):
        return load_model_cached(name or self.model, self.device, self.threads, self.matmul)

    def store_location(self) -> dict:
        """Where the store is, as ``CacheStore`` arguments: rows in ``--db``, else in the ``--store`` folder's
        SQLite file; blobs at ``--blob-url`` (the folder's ``blobs/`` is then not used), else in that folder."""
        from kvzip_rag.qa import default_store_path
        from kvzip_rag.store.cache_store import BLOB_DIR_NAME

        folder = self.store or default_store_path()
        rows = {"url": self.db} if self.db else {"path": folder}
        if not self.blob_url:
            return {**rows, "blob_dir": folder / BLOB_DIR_NAME}
        return {**rows, "blob_url": self.blob_url, "blob_timeout": self.blob_timeout or DEFAULT_BLOB_TIMEOUT}

    def open_store(self, create: bool = False):
        """The store; one that does not exist yet is created only with ``create`` (``index``): a command that
        reads or deletes refuses it and creates nothing (no folder, database or blob folder)."""
        if self._store is None:
            from kvzip_rag.store import CacheStore

            try:
                if not create:
                    self._require_existing()
                self._store = CacheStore(**self.store_location())
            except (KVzipError, CLIError):
                raise
            except ModuleNotFoundError as error:  # the database driver
                raise CLIError(
                    f"cannot open the store at {self.describe_store()}: the database driver {error.name!r} is not "
                    "installed (for PostgreSQL: pip install 'kvzip-rag[postgres]' and a postgresql+psycopg2:// URL)"
                ) from error
            except Exception as error:  # SQLAlchemy / OS errors: say where, not a traceback
                first_line = (str(error).strip().splitlines() or [""])[0]
                raise CLIError(
                    f"cannot open the store at {self.describe_store()}: {type(error).__name__}: {first_line}"
                ) from error
        return self._store

    def _require_existing(self) -> None:
        """NoStoreError when the rows' database is not there; CLIError when a ``--blob-url`` folder is not (the
        blob URL is checked first, as opening the store would: a bad scheme, obstore missing)."""
        from kvzip_rag.qa import default_store_path
        from kvzip_rag.store.blob import LocalBlobs
        from kvzip_rag.store.cache_store import DB_NAME
        from kvzip_rag.store.objects import open_objects
        from kvzip_rag.store.schema import parse_url

        blobs = open_objects(self.blob_url) if self.blob_url else None  # creates nothing
        if self.db:
            parsed = parse_url(self.db)
            local = parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:")
            database = Path(parsed.database).expanduser() if local else None
        else:
            database = (self.store or default_store_path()) / DB_NAME
        if database is not None and not database.is_file():
            raise NoStoreError(f"the store at {self.describe_store()} holds no documents: it does not exist yet "
                               "(nothing was created); index some first: kvzip-rag index PATH")
        if isinstance(blobs, LocalBlobs) and not blobs.root.is_dir():
            raise CLIError(f"the blob folder {blobs.root} does not exist; check --blob-url (kvzip-rag index "
                           "creates it)")

    def service(self, model=None, **options):
        """The core QA service over this store and model (loads the model unless given); ``options``: more
        ``QAService`` arguments (``batching=True`` for the server)."""
        from kvzip_rag.qa import QAService

        model = model or self.load_model()  # the model first: its errors come before the store's
        return QAService(self.open_store(), model, ratio=self.ratio, level=self.level, **options)

    def describe_store(self) -> str:
        blobs = f" (blobs at {self.blob_url})" if self.blob_url else ""
        if self.db:
            from kvzip_rag.store.schema import parse_url

            return parse_url(self.db).render_as_string(hide_password=True) + blobs
        from kvzip_rag.qa import default_store_path

        return str(self.store or default_store_path()) + blobs


_MODELS: dict[tuple, object] = {}


def load_model_cached(name: str | None, device: str | None, threads: int | None, matmul: str | None = None):
    """Load a model once per process (``chat`` and tests call commands repeatedly), with the thread policy."""
    import kvzip_rag
    from kvzip_rag.matmul import resolve_matmul
    from kvzip_rag.runtime import apply_thread_policy

    from .output import err_console

    key = (name or os.environ.get("KVZIP_RAG_MODEL") or kvzip_rag.DEFAULT_MODEL, device, resolve_matmul(matmul))
    if key not in _MODELS:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own spinner says what is happening
        with err_console.status(f"Loading model {show(key[0])}…", spinner="dots"):
            start = time.perf_counter()
            _MODELS[key] = kvzip_rag.load_model(key[0], device=device, threads=threads, matmul=key[2])
        loaded = _MODELS[key]
        count = apply_thread_policy(loaded.device, threads)
        threads_note = f", {count} thread{'s' if count > 1 else ''}" if loaded.device.type == "cpu" else ""
        threads_note += ", bfloat16 matmuls" if key[2] == "bfloat16" else ""
        say(f"[dim]model {show(loaded.name)} on {loaded.device}{threads_note} "
            f"loaded in {time.perf_counter() - start:.1f}s[/dim]")
    else:
        apply_thread_policy(_MODELS[key].device, threads)
    return _MODELS[key]


def _parse_ratio(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        ratio = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number; the ratio is the fraction of KV pairs kept, e.g. 0.3")
    try:
        Budget(ratio, None)
    except KVzipError as error:
        raise typer.BadParameter(str(error)) from None
    return ratio


def _check_level(value: str | None) -> str | None:
    if value is not None:
        try:
            Budget(None, value)
        except KVzipError as error:
            raise typer.BadParameter(str(error)) from None
    return value


# Shared option types: accepted before the command (global) and after it (per command).
StoreOpt = Annotated[Path | None, typer.Option(
    "--store", envvar="KVZIP_RAG_STORE", file_okay=False,
    help="Store folder (SQLite file + blobs). Default: the user data dir.", show_default=False)]
BlobTimeoutOpt = Annotated[float | None, typer.Option(
    "--blob-timeout", envvar="KVZIP_RAG_BLOB_TIMEOUT", min=0.1, metavar="SECONDS",
    help=f"With an object-storage --blob-url: seconds to wait for the server to connect or answer, with a few "
         f"quick retries (default {DEFAULT_BLOB_TIMEOUT:g}: a server that is down fails in seconds, not minutes).",
    show_default=False)]
DbOpt = Annotated[str | None, typer.Option(
    "--db", envvar="KVZIP_RAG_DB", help="SQLAlchemy URL of another database (blobs: --blob-url, else under --store).",
    show_default=False)]
BlobUrlOpt = Annotated[str | None, typer.Option(
    "--blob-url", envvar="KVZIP_RAG_BLOB_URL",
    help="Keep the cache blobs in object storage (s3://bucket/prefix; pip install 'kvzip-rag\\[s3]'; credentials "
         "from the AWS_* variables) or another folder (file:///path). Rows stay in --db, else in the --store folder's "
         "SQLite file. One prefix per store: gc removes what this store's rows do not name.",
    show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", envvar="KVZIP_RAG_MODEL",
    help="Model alias (smollm2-135m-instruct, gemma3-270m), local folder, .gguf file or hub id.", show_default=False)]
RatioOpt = Annotated[str | None, typer.Option(
    "--ratio", envvar="KVZIP_RAG_RATIO", callback=_parse_ratio, metavar="RATIO",
    help=f"Fraction of KV pairs kept (0, 1]. index: {DEFAULT_BUDGET.ratio:g}; ask/chat: as stored (a lower ratio "
         "reads fewer bytes).",
    show_default=False)]
LevelOpt = Annotated[str | None, typer.Option(
    "--level", envvar="KVZIP_RAG_LEVEL", callback=_check_level,
    help=f"Eviction level: {', '.join(LEVELS)} (index: {DEFAULT_BUDGET.level}; ask/chat: as stored).",
    show_default=False)]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", envvar="KVZIP_RAG_DEVICE", help="cpu, cuda, cuda:1… Default: cuda when available.",
    show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", envvar="KVZIP_RAG_THREADS", min=1,
    help="CPU threads for torch (default: torch's, lowered to the cores the load average leaves free).",
    show_default=False)]
MatmulOpt = Annotated[str | None, typer.Option(
    "--matmul", envvar="KVZIP_RAG_MATMUL",
    help="Precision of the model's weight products on CPU: float32 (default) or bfloat16 (CPUs with AMX or "
         "AVX512-BF16: a batch of questions decodes for about the price of one; see the README's Serving).",
    show_default=False)]


def for_cli(message: str) -> str:
    """Library messages that name a Python call, told as the CLI command that does it."""
    if "recompress()" in message:
        message = message.replace("call recompress() for this model", "re-index it with this model: kvzip-rag "
                                  "index PATH --force --model MODEL")
        message = message.replace("recompress() it", "re-index it at that ratio and level: kvzip-rag index PATH "
                                  "--force --ratio RATIO --level LEVEL (or ask at the stored ratio or lower)")
    return message


def handle_errors(function: Callable) -> Callable:
    """Every error a user can act on (ours, OS and database errors) becomes one red line and exit code 1."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except CLIError as error:
            fail(str(error), error.code)
        except KVzipError as error:  # DocumentNotFoundError, StoreError, StoreFullError, ...
            fail(for_cli(str(error)), 1)
        except KeyError as error:  # a store that still raises a bare KeyError for a missing document
            fail(error.args[0] if error.args and isinstance(error.args[0], str) else str(error), 1)
        except OSError as error:  # full disk, permissions, missing files
            where = f": {error.filename}" if getattr(error, "filename", None) else ""
            fail(f"{error.strerror or error}{where}", 1)
        except KeyboardInterrupt:
            say("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)
        except Exception as error:
            if type(error).__module__.startswith("sqlalchemy"):  # the database refused (disk full, locked, gone)
                first_line = (str(error).strip().splitlines() or [""])[0]
                fail(f"the store's database failed: {type(error).__name__}: {first_line}", 1)
            raise

    return wrapper
