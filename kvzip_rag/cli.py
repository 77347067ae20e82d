"""``kvzip-rag``: index documents into compressed KV caches, then ask questions about them.

    kvzip-rag demo                                   # index examples/docs and answer examples/docs/questions.json
    kvzip-rag index notes/ manual.pdf                # .txt .md .html .htm .pdf, files and folders
    kvzip-rag ask "How do I descale the machine?"    # streams the answer, then sources, timings, compression
    kvzip-rag chat                                   # follow-up questions about one document
    kvzip-rag ls | rm DOC_ID | inspect DOC_ID --out pictures/

Options that apply to every command may go before or after the command name; each has an environment variable:
``--store`` / ``KVZIP_RAG_STORE``, ``--db`` / ``KVZIP_RAG_DB``, ``--model`` / ``KVZIP_RAG_MODEL``, ``--ratio`` /
``KVZIP_RAG_RATIO``, ``--level`` / ``KVZIP_RAG_LEVEL``, ``--device`` / ``KVZIP_RAG_DEVICE``.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import KVzipError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

SUPPORTED = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html",
             ".htm": "html", ".pdf": "pdf"}
DEFAULT_RATIO = 0.3
DEFAULT_LEVEL = "pair"
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples" / "docs"


class CLIError(Exception):
    """A problem the user can fix (bad path, unknown id...): one red line, exit code ``code``."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


app = typer.Typer(
    name="kvzip-rag",
    help="Answer questions about documents from KVzip-compressed KV caches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


# ------------------------------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """Global options; a command's own options override them."""

    store: Path | None = None
    db: str | None = None
    model: str | None = None
    ratio: float | None = None
    level: str | None = None
    device: str | None = None
    threads: int | None = None
    _store: object = field(default=None, repr=False)

    def merged(self, **overrides) -> "Settings":
        values = {k: getattr(self, k) for k in ("store", "db", "model", "ratio", "level", "device", "threads")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)

    # -- the model -----------------------------------------------------------------------------------------

    def load_model(self, name: str | None = None):
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        return load_model_cached(name or self.model, self.device)

    # -- the store -----------------------------------------------------------------------------------------

    def open_store(self):
        if self._store is None:
            from kvzip_rag.store import CacheStore

            try:
                if self.db:
                    blob_dir = (self.store or default_store_path()) / "blobs"
                    self._store = CacheStore(url=self.db, blob_dir=blob_dir)
                else:
                    self._store = CacheStore(self.store)
            except KVzipError:
                raise
            except Exception as error:  # SQLAlchemy / OS errors: say where, not a traceback
                where = self.db or str(self.store or default_store_path())
                raise CLIError(f"cannot open the store at {where}: {type(error).__name__}: {error}") from error
        return self._store

    def describe_store(self) -> str:
        if self.db:
            from sqlalchemy.engine import make_url

            return make_url(self.db).render_as_string(hide_password=True)
        return str(self.store or default_store_path())


def default_store_path() -> Path:
    env = os.environ.get("KVZIP_RAG_STORE")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("kvzip-rag")) / "store"


_MODELS: dict[tuple[str | None, str | None], object] = {}


def load_model_cached(name: str | None, device: str | None):
    """Load a model once per process (``chat`` and tests call commands repeatedly)."""
    import kvzip_rag

    key = (name or os.environ.get("KVZIP_RAG_MODEL") or kvzip_rag.DEFAULT_MODEL, device)
    if key not in _MODELS:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # our own spinner says what is happening
        with err_console.status(f"Loading model {escape(key[0])}…", spinner="dots"):
            start = time.perf_counter()
            _MODELS[key] = kvzip_rag.load_model(key[0], device=device)
        err_console.print(
            f"[dim]model {escape(_MODELS[key].name)} on {_MODELS[key].device} "
            f"loaded in {time.perf_counter() - start:.1f}s[/dim]"
        )
    return _MODELS[key]


def _parse_ratio(value: str | None) -> float | None:
    if value is None or value == "":
        return None
    try:
        ratio = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number; the ratio is the fraction of KV pairs kept, e.g. 0.3")
    if not 0.0 < ratio <= 1.0:
        raise typer.BadParameter(f"the ratio is the fraction of KV pairs kept and must be in (0, 1], got {ratio}")
    return ratio


def _check_level(value: str | None) -> str | None:
    from .budget import LEVELS

    if value is not None and value not in LEVELS:
        raise typer.BadParameter(f"choose one of {', '.join(LEVELS)}")
    return value


# Shared option types: accepted before the command (global) and after it (per command).
StoreOpt = Annotated[Path | None, typer.Option(
    "--store", envvar="KVZIP_RAG_STORE", file_okay=False,
    help="Store folder (SQLite file + blobs). Default: the user data dir.", show_default=False)]
DbOpt = Annotated[str | None, typer.Option(
    "--db", envvar="KVZIP_RAG_DB", help="SQLAlchemy URL of another database (blobs stay under --store).",
    show_default=False)]
ModelOpt = Annotated[str | None, typer.Option(
    "--model", envvar="KVZIP_RAG_MODEL",
    help="Model alias (smollm2-135m-instruct, gemma3-270m), local folder, .gguf file or hub id.", show_default=False)]
RatioOpt = Annotated[str | None, typer.Option(
    "--ratio", envvar="KVZIP_RAG_RATIO", callback=_parse_ratio, metavar="RATIO",
    help="Fraction of KV pairs kept (0, 1]. index: 0.3; ask/chat: as stored (a lower ratio reads fewer bytes).",
    show_default=False)]
LevelOpt = Annotated[str | None, typer.Option(
    "--level", envvar="KVZIP_RAG_LEVEL", callback=_check_level,
    help="Eviction level: pair (default), uniform or head.", show_default=False)]
DeviceOpt = Annotated[str | None, typer.Option(
    "--device", envvar="KVZIP_RAG_DEVICE", help="cpu, cuda, cuda:1… Default: cuda when available.",
    show_default=False)]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", envvar="KVZIP_RAG_THREADS", min=1,
    help="CPU threads for torch (default: torch's choice; 1 is faster on a busy machine).", show_default=False)]


@app.callback()
def main(
    ctx: typer.Context,
    store: StoreOpt = None,
    db: DbOpt = None,
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
    ctx.obj = Settings(store=store, db=db, model=model, ratio=ratio, level=level, device=device, threads=threads)


def _settings(ctx: typer.Context, **overrides) -> Settings:
    base = ctx.obj if isinstance(ctx.obj, Settings) else Settings()
    return base.merged(**overrides)


def handle_errors(function: Callable) -> Callable:
    """Turn the errors a user can act on into one red line and a non-zero exit code (no traceback)."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise
        except CLIError as error:
            _fail(str(error), error.code)
        except KVzipError as error:
            _fail(str(error), 1)
        except KeyError as error:  # the store's "no document 'x' in this store"
            message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
            _fail(message, 1)
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            _fail(f"{error.strerror or error}: {error.filename}" if error.filename else str(error), 1)
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]")
    raise typer.Exit(code)


def _note(message: str) -> None:
    err_console.print(f"[yellow]note:[/yellow] {escape(message)}")


# ------------------------------------------------------------------------------------------------- reading files


def extract_text(path: Path) -> str:
    """The plain text of a .txt, .md, .html/.htm (BeautifulSoup) or .pdf (pypdf) file."""
    kind = SUPPORTED.get(path.suffix.lower())
    if kind in ("text", "markdown"):
        return path.read_text(encoding="utf-8", errors="replace")
    if kind == "html":
        from bs4 import BeautifulSoup

        soup = BeautifulSoup(path.read_bytes(), "html.parser")
        for tag in soup(["script", "style", "noscript", "template", "head"]):
            tag.decompose()
        title = soup.title.get_text(strip=True) if soup.title else ""
        lines = [line.strip() for line in soup.get_text("\n").splitlines()]
        text = "\n".join(_collapse_blank(lines))
        return f"{title}\n\n{text}" if title and not text.startswith(title) else text
    if kind == "pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(str(path))
            pages = [page.extract_text() or "" for page in reader.pages]
        except (PdfReadError, ValueError, KeyError) as error:
            raise CLIError(f"cannot read PDF {path}: {error}") from error
        return "\n\n".join(p.strip() for p in pages if p.strip())
    raise CLIError(f"unsupported file type {path.suffix!r}: {path}")


def _collapse_blank(lines: list[str]) -> Iterator[str]:
    blank = False
    for line in lines:
        if line:
            blank = False
            yield line
        elif not blank:
            blank = True
            yield ""


def collect_files(paths: list[Path]) -> list[tuple[Path, str]]:
    """(file, document id) for every supported file under ``paths``; ids are paths relative to the folder given."""
    found: list[tuple[Path, str]] = []
    for path in paths:
        if not path.exists():
            raise CLIError(f"no such file or folder: {path}")
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            supported = [p for p in files if p.suffix.lower() in SUPPORTED]
            for skipped in (p for p in files if p.suffix.lower() not in SUPPORTED):
                _note(f"skipping {skipped} (not .txt, .md, .html, .htm or .pdf)")
            if not supported:
                raise CLIError(f"folder {path} holds no .txt, .md, .html, .htm or .pdf files: nothing to index")
            found.extend((p, p.relative_to(path).as_posix()) for p in supported)
        elif path.suffix.lower() in SUPPORTED:
            found.append((path, path.name))
        else:
            _note(f"skipping {path} (not .txt, .md, .html, .htm or .pdf)")
    if not found:
        raise CLIError("none of the given paths is a .txt, .md, .html, .htm or .pdf file: nothing to index")
    return found


# ------------------------------------------------------------------------------------------------- progress


class IndexProgress:
    """Rich progress: one bar for documents, and per document one bar per compression stage."""

    STAGES = {"prefill": "prefill", "score": "scoring", "compress": "segments"}

    def __init__(self, total_documents: int):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=32),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        )
        self.documents = self.progress.add_task("documents", total=total_documents)
        self.stages: dict[str, int] = {}
        self.completed: dict[str, int] = {}

    def __enter__(self) -> "IndexProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def start_document(self, name: str) -> None:
        for task in self.stages.values():
            self.progress.remove_task(task)
        self.stages.clear()
        self.completed.clear()
        self.progress.update(self.documents, description=f"documents · {escape(name)}")

    def callback(self, stage: str, done: int, total: int) -> None:
        label = "  " + self.STAGES.get(stage, stage)
        if stage not in self.stages:
            self.stages[stage] = self.progress.add_task(label, total=total)
        task = self.stages[stage]
        if stage in ("prefill", "score") and done <= self.completed.get(stage, 0):
            self.progress.reset(task, total=total)  # the next segment starts over
        self.completed[stage] = done
        self.progress.update(task, completed=done, total=total)

    def finish_document(self) -> None:
        self.progress.advance(self.documents)
        if self.progress.tasks[0].finished:
            self.progress.update(self.documents, description="documents")


@contextmanager
def stage_progress(callback: Callable[[str, int, int], None]):
    """Report compress()'s prefill and scoring stages while the store compresses segments.

    ``CacheStore.add_document(progress=)`` reports finished segments; the prefill and scoring passes inside each
    segment are reported by ``kvzip_rag.compress.compress(progress=)``. Until the store forwards them, this wraps
    ``compress`` for the duration of one ``add_document`` call (the CLI is single-threaded).
    """
    import importlib

    compress_module = importlib.import_module("kvzip_rag.compress")
    original = compress_module.compress

    @functools.wraps(original)
    def with_progress(*args, **kwargs):
        if kwargs.get("progress") is None:
            kwargs["progress"] = callback
        return original(*args, **kwargs)

    compress_module.compress = with_progress
    try:
        yield
    finally:
        compress_module.compress = original


# ------------------------------------------------------------------------------------------------- formatting


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def compression_line(cache, read_nbytes: int | None = None) -> str:
    info = cache.info
    kept, full = cache.nbytes, cache.full_nbytes
    parts = [
        f"ratio {info.ratio:g} ({info.level})",
        f"KV {human_bytes(kept)} vs {human_bytes(full)} full ({full / max(kept, 1):.1f}x smaller)",
        f"{info.context_length} context tokens",
    ]
    if read_nbytes is not None:
        parts.append("served from memory" if read_nbytes == 0 else f"{human_bytes(read_nbytes)} read from disk")
    return " · ".join(parts)


def timing_line(retrieval_s: float, load_s: float, result) -> str:
    tokens = len(result.token_ids)
    rate = (tokens - 1) / result.decode_s if tokens > 1 and result.decode_s > 0 else 0.0
    return (
        f"retrieval {retrieval_s * 1000:.0f} ms · cache load {load_s * 1000:.0f} ms · "
        f"first token {result.time_to_first_token_s * 1000:.0f} ms · decode {rate:.1f} tok/s ({tokens} tokens)"
    )


# ------------------------------------------------------------------------------------------------- retrieval


@dataclass
class Retrieved:
    hits: list
    cache: object
    retrieval_s: float
    load_s: float
    read_nbytes: int


def retrieve(settings: Settings, model, question: str, k: int = 1, doc_id: str | None = None) -> Retrieved:
    """Route the question to the best segment (full-text search) and load its compressed cache."""
    store = settings.open_store()
    if doc_id is not None and doc_id not in store:
        raise CLIError(f"no document {doc_id!r} in the store at {settings.describe_store()} (see `kvzip-rag ls`)")
    start = time.perf_counter()
    hits = store.search(question, k=max(k, 1), doc_ids=[doc_id] if doc_id else None)
    retrieval_s = time.perf_counter() - start
    if not hits:
        if doc_id is not None:  # the question shares no word with the document: answer from its first segment
            target = doc_id
        elif len(store) == 0:
            raise CLIError(
                f"the store at {settings.describe_store()} holds no documents; index some first: kvzip-rag index PATH"
            )
        else:
            raise CLIError("no indexed document matches the words of this question; rephrase it, or pick a "
                           "document with --doc (see `kvzip-rag ls`)")
    else:
        target = hits[0]
    start = time.perf_counter()
    cache = store.load_cache(target, model, ratio=settings.ratio, level=settings.level)
    load_s = time.perf_counter() - start
    return Retrieved(hits, cache, retrieval_s, load_s, store.last_read_nbytes)


def _source_lines(hits: list, limit: int = 3) -> list[str]:
    lines = []
    for hit in hits[:limit]:
        snippet = " ".join(hit.text.split())[:90]
        lines.append(f"[cyan]{escape(hit.document_id)}[/cyan] segment {hit.segment_index} "
                     f"(score {hit.score:.2f}): [dim]{escape(snippet)}…[/dim]")
    return lines


def stream_to_console(stream) -> object:
    """Print an AnswerStream as it is generated; returns its Answer."""
    for piece in stream:
        console.print(piece, end="", markup=False, soft_wrap=True)
        console.file.flush()
    console.print()
    return stream.result


# ------------------------------------------------------------------------------------------------- commands


@app.command()
@handle_errors
def index(
    ctx: typer.Context,
    paths: Annotated[list[Path], typer.Argument(help="Files and folders (.txt, .md, .html, .htm, .pdf).",
                                                show_default=False)],
    doc_id: Annotated[str | None, typer.Option("--id", help="Document id (one file only). Default: the file's "
                                                            "path relative to the folder given, or its name.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompress documents already stored, and replace a "
                                                        "document whose id exists with other text.")] = False,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, ratio: RatioOpt = None,
    level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Prefill, score and compress documents into the store (long files are split into segments)."""
    settings = _settings(ctx, store=store, db=db, model=model, ratio=ratio, level=level, device=device,
                         threads=threads)
    index_paths(settings, paths, doc_id=doc_id, force=force)


def index_paths(settings: Settings, paths: list[Path], doc_id: str | None = None, force: bool = False) -> None:
    files = collect_files(paths)
    if doc_id is not None and len(files) != 1:
        raise CLIError(f"--id names one document, but {len(files)} files were given")
    texts = []
    for path, name in files:
        text = extract_text(path)
        if not text.strip():
            _note(f"skipping {path}: no text in it")
            continue
        texts.append((path, doc_id or name, text))
    if not texts:
        raise CLIError("the given files hold no text: nothing to index")
    kv_model = settings.load_model()
    store = settings.open_store()
    ratio, level = settings.ratio or DEFAULT_RATIO, settings.level or DEFAULT_LEVEL
    table = Table(title=f"Indexed into {escape(settings.describe_store())}", title_justify="left")
    for column in ("document", "segments", "tokens", "kept KV", "full KV", "time"):
        table.add_column(column, justify="left" if column == "document" else "right")
    start_all = time.perf_counter()
    with IndexProgress(len(texts)) as bars:
        for path, name, text in texts:
            bars.start_document(name)
            before = store.get_document(name)
            before_ids = {c.id for c in before.caches} if before is not None else set()
            start = time.perf_counter()
            with stage_progress(bars.callback):
                record = store.add_document(
                    kv_model, text, doc_id=name, metadata={"source": str(path.resolve()), "file": path.name},
                    ratio=ratio, level=level, force=force, progress=bars.callback,
                )
            elapsed = time.perf_counter() - start
            bars.finish_document()
            caches = _matching_caches(record, kv_model, ratio, level)
            reused = bool(caches) and all(c.id in before_ids for c in caches)
            table.add_row(
                escape(name), str(len(record.segments)), str(record.token_count),
                human_bytes(sum(c.kv_nbytes for c in caches)), human_bytes(sum(c.full_nbytes for c in caches)),
                "reused" if reused else f"{elapsed:.1f}s",
            )
    console.print(table)
    console.print(f"[dim]{len(texts)} document(s) at ratio {ratio:g} ({level}) in "
                  f"{time.perf_counter() - start_all:.1f}s[/dim]")


def _matching_caches(record, model, ratio: float, level: str) -> list:
    return [c for c in record.caches if c.model_fingerprint == model.fingerprint and c.level == level
            and abs(c.ratio - ratio) < 1e-9]


@app.command()
@handle_errors
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.", show_default=False)],
    doc: Annotated[str | None, typer.Option("--doc", help="Answer from this document only.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Segments to retrieve (the best one answers; the others "
                                                      "are listed as sources).")] = 3,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens in the answer.")] = 128,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, ratio: RatioOpt = None,
    level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Answer a question from the best matching compressed cache, streaming the answer."""
    import kvzip_rag

    settings = _settings(ctx, store=store, db=db, model=model, ratio=ratio, level=level, device=device,
                         threads=threads)
    if not question.strip():
        raise CLIError("the question is empty")
    kv_model = settings.load_model()
    found = retrieve(settings, kv_model, question, k=k, doc_id=doc)
    stream = kvzip_rag.stream_answer(kv_model, found.cache, question, max_new_tokens=max_tokens)
    result = stream_to_console(stream)
    _print_answer_footer(found, result)


def _print_answer_footer(found: Retrieved, result) -> None:
    lines = ["[bold]sources[/bold]"] + (
        _source_lines(found.hits) or [f"[cyan]{escape(_doc_of(found))}[/cyan] (no word matched; first segment)"]
    )
    lines.append("[bold]timings[/bold]      " + timing_line(found.retrieval_s, found.load_s, result))
    lines.append("[bold]compression[/bold]  " + compression_line(found.cache, found.read_nbytes))
    err_console.print("\n".join(lines), soft_wrap=True)


def _doc_of(found: Retrieved) -> str:
    return found.hits[0].document_id if found.hits else "?"


@app.command()
@handle_errors
def chat(
    ctx: typer.Context,
    doc: Annotated[str | None, typer.Option("--doc", help="Talk about this document (default: the one the first "
                                                          "question matches).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")] = 128,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, ratio: RatioOpt = None,
    level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Follow-up questions about one document; the conversation stays in its compressed cache.

    Reads one question per line until end of input or "exit"; "/reset" forgets the conversation (the next
    question is routed again).
    """
    import kvzip_rag

    settings = _settings(ctx, store=store, db=db, model=model, ratio=ratio, level=level, device=device,
                         threads=threads)
    kv_model = settings.load_model()
    store_ = settings.open_store()
    if doc is not None and doc not in store_:
        raise CLIError(f"no document {doc!r} in the store at {settings.describe_store()} (see `kvzip-rag ls`)")
    if len(store_) == 0:
        raise CLIError(f"the store at {settings.describe_store()} holds no documents; index some first: "
                       "kvzip-rag index PATH")
    interactive = sys.stdin.isatty()
    err_console.print("[dim]Ask a question; follow-ups stay in the same document. /reset starts over, "
                      "exit or Ctrl-D quits.[/dim]")
    conversation = None
    while True:
        if interactive:
            err_console.print("[bold green]you>[/bold green] ", end="")
        line = sys.stdin.readline()
        if not line:
            break
        question = line.strip()
        if not question:
            continue
        if question.lower() in ("exit", "quit", "/exit", "/quit"):
            break
        if question == "/reset":
            if conversation is not None:
                conversation.reset()
            conversation = None
            err_console.print("[dim]conversation reset[/dim]")
            continue
        if not interactive:
            console.print(f"[bold green]you>[/bold green] {escape(question)}")
        try:
            if conversation is None:
                found = retrieve(settings, kv_model, question, k=3, doc_id=doc)
                conversation = kvzip_rag.Conversation(kv_model, found.cache)
                err_console.print(f"[dim]talking about {escape(_doc_of(found) if found.hits else doc)} · "
                                  f"{compression_line(found.cache, found.read_nbytes)}[/dim]")
            console.print("[bold blue]kvzip>[/bold blue] ", end="")
            result = stream_to_console(conversation.stream(question, max_new_tokens=max_tokens))
            tokens = len(result.token_ids)
            rate = (tokens - 1) / result.decode_s if tokens > 1 and result.decode_s > 0 else 0.0
            err_console.print(f"[dim]first token {result.time_to_first_token_s * 1000:.0f} ms · "
                              f"{rate:.1f} tok/s · turn {len(conversation.turns)}[/dim]")
        except CLIError as error:  # e.g. no document matches: say so and keep the loop going
            err_console.print(f"[red]{escape(str(error))}[/red]")


@app.command("ls")
@handle_errors
def list_documents(
    ctx: typer.Context,
    store: StoreOpt = None, db: DbOpt = None,
) -> None:
    """List stored documents: segments, tokens, ratio, bytes kept vs the full cache."""
    settings = _settings(ctx, store=store, db=db)
    records = settings.open_store().list_documents()
    if not records:
        console.print(f"The store at {escape(settings.describe_store())} is empty; add documents with "
                      "[bold]kvzip-rag index PATH[/bold].")
        return
    table = Table(title=f"{len(records)} document(s) in {escape(settings.describe_store())}", title_justify="left")
    table.add_column("doc id", style="cyan", overflow="fold")
    for column in ("segments", "tokens", "ratio", "bytes", "full bytes", "model"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for record in records:
        kinds: dict[tuple, list] = {}
        for cache in record.caches:
            kinds.setdefault((cache.model_name, cache.ratio, cache.level), []).append(cache)
        if not kinds:
            table.add_row(escape(record.id), str(len(record.segments)), str(record.token_count), "-", "-", "-", "-")
        for (model_name, ratio, level), caches in sorted(kinds.items()):
            kept = sum(c.kv_nbytes for c in caches)
            full = sum(c.full_nbytes for c in caches)
            table.add_row(
                escape(record.id), str(len(record.segments)), str(record.token_count),
                f"{ratio:g} {level}", human_bytes(kept), f"{human_bytes(full)} ({full / max(kept, 1):.1f}x)",
                escape(model_name),
            )
    console.print(table)


@app.command("rm")
@handle_errors
def remove(
    ctx: typer.Context,
    doc_ids: Annotated[list[str], typer.Argument(help="Document ids (see `kvzip-rag ls`).", show_default=False)],
    store: StoreOpt = None, db: DbOpt = None,
) -> None:
    """Delete documents, their caches and blobs."""
    settings = _settings(ctx, store=store, db=db)
    store_ = settings.open_store()
    unknown = [d for d in doc_ids if d not in store_]
    if unknown:
        raise CLIError(f"no document {', '.join(map(repr, unknown))} in the store at {settings.describe_store()} "
                       "(see `kvzip-rag ls`); nothing was removed")
    for doc_id in doc_ids:
        store_.delete_document(doc_id)
        console.print(f"removed [cyan]{escape(doc_id)}[/cyan]")


@app.command("inspect")
@handle_errors
def inspect_document(
    ctx: typer.Context,
    doc_id: Annotated[str, typer.Argument(help="Document id (see `kvzip-rag ls`).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Folder for the PNG and HTML files.")]
    = Path("kvzip-inspect"),
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, ratio: RatioOpt = None,
    level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Draw what compression kept: a PNG heatmap of (layer, kv head) budgets and an HTML view of the tokens."""
    from .inspect import draw_budget_heatmap, write_token_html

    settings = _settings(ctx, store=store, db=db, model=model, ratio=ratio, level=level, device=device,
                         threads=threads)
    store_ = settings.open_store()
    record = store_.get_document(doc_id)
    if record is None:
        raise CLIError(f"no document {doc_id!r} in the store at {settings.describe_store()} (see `kvzip-rag ls`)")
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
    page = write_token_html(caches, kv_model.tokenizer, out / f"{stem}.tokens.html", title=f"What KVzip kept: {doc_id}",
                            labels=[f"segment {s.index}" for s in record.segments])
    kept = sum(c.nbytes for c in caches)
    full = sum(c.full_nbytes for c in caches)
    console.print(f"[bold]{escape(doc_id)}[/bold]: {len(caches)} segment(s), KV {human_bytes(kept)} vs "
                  f"{human_bytes(full)} full ({full / max(kept, 1):.1f}x smaller)")
    console.print(f"  budgets heatmap  {escape(str(png))}")
    console.print(f"  token view       {escape(str(page))}")


@app.command()
@handle_errors
def demo(
    ctx: typer.Context,
    docs: Annotated[Path | None, typer.Option("--docs", file_okay=False, help="Folder of documents with a "
                                              "questions.json (default: examples/docs).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")] = 48,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, ratio: RatioOpt = None,
    level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Index the sample documents and answer their questions, with timings and compression figures.

    Re-running it reuses the stored caches.
    """
    import kvzip_rag

    settings = _settings(ctx, store=store, db=db, model=model, ratio=ratio, level=level, device=device,
                         threads=threads)
    folder = docs or EXAMPLES_DIR
    questions_file = folder / "questions.json"
    if not folder.is_dir() or not questions_file.is_file():
        raise CLIError(f"sample documents not found at {folder} (a folder with questions.json); run the demo "
                       "from a clone of the repository or pass --docs")
    questions = json.loads(questions_file.read_text())
    start_all = time.perf_counter()
    console.rule("[bold]kvzip-rag demo[/bold]")
    console.print(f"store: {escape(settings.describe_store())}")
    index_paths(settings, sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED))
    kv_model = settings.load_model()
    rows = []
    for number, item in enumerate(questions, 1):
        question = item["question"]
        console.print()
        console.print(f"[bold]Q{number}.[/bold] {escape(question)}")
        found = retrieve(settings, kv_model, question, k=3)
        console.print("[bold blue]A:[/bold blue] ", end="")
        result = stream_to_console(kvzip_rag.stream_answer(kv_model, found.cache, question, max_new_tokens=max_tokens))
        accept = [a.lower() for a in item.get("accept", [item.get("answer", "")]) if a]
        correct = any(a in result.text.lower() for a in accept)
        source = _doc_of(found)
        routed = source == item.get("document", source)
        console.print(
            f"   expected: {escape(item.get('answer', ''))} "
            + ("[green]✓ found[/green]" if correct else "[red]✗ not found[/red]")
            + f" · source {escape(source)}" + ("" if routed else " [yellow](expected " + escape(item['document']) + ")[/yellow]")
        )
        console.print(f"   [dim]{timing_line(found.retrieval_s, found.load_s, result)}[/dim]", soft_wrap=True)
        console.print(f"   [dim]{compression_line(found.cache, found.read_nbytes)}[/dim]", soft_wrap=True)
        rows.append((question, correct, routed, found, result))
    _demo_summary(rows, time.perf_counter() - start_all)


def _demo_summary(rows: list, total_s: float) -> None:
    if not rows:
        return
    correct = sum(r[1] for r in rows)
    routed = sum(r[2] for r in rows)
    ttft = sorted(r[4].time_to_first_token_s for r in rows)[len(rows) // 2]
    load = sorted(r[3].load_s for r in rows)[len(rows) // 2]
    tokens = sum(len(r[4].token_ids) - 1 for r in rows)
    decode = sum(r[4].decode_s for r in rows)
    kept = {id(r[3].cache): r[3].cache for r in rows}
    caches = list(kept.values())
    table = Table(title="Summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("answers containing the expected text", f"{correct}/{len(rows)}")
    table.add_row("questions routed to the right document", f"{routed}/{len(rows)}")
    table.add_row("median cache load / first token", f"{load * 1000:.0f} ms / {ttft * 1000:.0f} ms")
    table.add_row("decode speed", f"{tokens / decode:.1f} tok/s" if decode > 0 else "-")
    kept_bytes = sum(c.nbytes for c in caches)
    full_bytes = sum(c.full_nbytes for c in caches)
    table.add_row("KV bytes kept vs full cache", f"{human_bytes(kept_bytes)} vs {human_bytes(full_bytes)} "
                                                 f"({full_bytes / max(kept_bytes, 1):.1f}x smaller)")
    table.add_row("total time", f"{total_s:.1f}s")
    console.print()
    console.print(table)


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
    settings = _settings(ctx)
    if settings.model and "--model" not in args:
        args += ["--model", settings.model]
    if hasattr(bench_cli, "bench"):
        command = typer.main.get_command(_single(bench_cli.bench))
    elif hasattr(bench_cli, "app"):
        command = typer.main.get_command(bench_cli.app)
    else:
        raise CLIError("kvzip_rag.bench.cli defines no `bench` command")
    try:
        command.main(args=args, prog_name="kvzip-rag bench", standalone_mode=False)
    except typer.Exit:
        raise
    except Exception as error:
        import click

        if isinstance(error, click.exceptions.Exit):
            raise typer.Exit(error.exit_code)
        if isinstance(error, click.ClickException):
            error.show()
            raise typer.Exit(error.exit_code)
        raise


def _single(function: Callable) -> typer.Typer:
    sub = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    sub.command()(function)
    return sub


if __name__ == "__main__":  # pragma: no cover
    app()
