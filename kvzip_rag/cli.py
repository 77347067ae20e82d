"""``kvzip-rag``: index documents into compressed KV caches, then ask questions about them.

    kvzip-rag demo                                   # index examples/docs and answer examples/docs/questions.json
    kvzip-rag index notes/ manual.pdf                # .txt .md .html .htm .pdf, files and folders
    kvzip-rag ask "How do I descale the machine?"    # streams the answer, then sources, timings, compression
    kvzip-rag chat                                   # follow-up questions about one document
    kvzip-rag ls | rm DOC_ID | inspect DOC_ID --out pictures/

Options that apply to every command may go before or after the command name; each has an environment variable:
``--store`` / ``KVZIP_RAG_STORE``, ``--db`` / ``KVZIP_RAG_DB``, ``--model`` / ``KVZIP_RAG_MODEL``, ``--ratio`` /
``KVZIP_RAG_RATIO``, ``--level`` / ``KVZIP_RAG_LEVEL``, ``--device`` / ``KVZIP_RAG_DEVICE``, ``--threads`` /
``KVZIP_RAG_THREADS``. Errors a user can fix print one red line on stderr and exit with code 1 (usage errors: 2).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, ClassVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .errors import KVzipError

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def say(*objects, **options) -> None:
    """Print to stderr (notes, progress, timings) after flushing stdout, so piped output keeps its order."""
    console.file.flush()
    err_console.print(*objects, **options)


def print_table(table) -> None:
    """Tables on stdout; when stdout is not a terminal, as wide as they need (no 80-column folding)."""
    if console.is_terminal:
        console.print(table)
    else:
        width = console.measure(table, options=console.options.update_width(400)).maximum
        Console(file=console.file, width=max(width, 40), highlight=False).print(table)


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

    def merged(self, **overrides) -> Settings:
        values = {k: getattr(self, k) for k in ("store", "db", "model", "ratio", "level", "device", "threads")}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return Settings(**values)

    # -- the model -----------------------------------------------------------------------------------------

    def load_model(self, name: str | None = None):
        choose_threads(self.threads, self.device)
        return load_model_cached(name or self.model, self.device)

    # -- the store -----------------------------------------------------------------------------------------

    def open_store(self):
        if self._store is None:
            from kvzip_rag.store import CacheStore

            try:
                if self.db:  # rows in that database, blobs in the store folder
                    blob_dir = (self.store or default_store_path()) / "blobs"
                    self._store = CacheStore(url=self.db, blob_dir=blob_dir)
                else:
                    self._store = CacheStore(self.store or default_store_path())
            except KVzipError:
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


def choose_threads(threads: int | None, device: str | None) -> None:
    """The library's thread policy (:mod:`kvzip_rag.runtime`), applied before the model loads."""
    import torch

    from .runtime import apply_thread_policy

    apply_thread_policy(device or ("cuda" if torch.cuda.is_available() else "cpu"), threads)


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
        import torch

        loaded = _MODELS[key]
        count = torch.get_num_threads()
        threads = f", {count} thread{'s' if count > 1 else ''}" if loaded.device.type == "cpu" else ""
        say(f"[dim]model {escape(loaded.name)} on {loaded.device}{threads} "
            f"loaded in {time.perf_counter() - start:.1f}s[/dim]")
    return _MODELS[key]


def _parse_ratio(value: str | None) -> float | None:
    from .budget import check_ratio_level

    if value is None or value == "":
        return None
    try:
        ratio = float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a number; the ratio is the fraction of KV pairs kept, e.g. 0.3")
    try:
        check_ratio_level(ratio, "pair")
    except KVzipError as error:
        raise typer.BadParameter(str(error)) from None
    return ratio


def _check_level(value: str | None) -> str | None:
    from .budget import check_ratio_level

    if value is not None:
        try:
            check_ratio_level(1.0, value)
        except KVzipError as error:
            raise typer.BadParameter(str(error)) from None
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
    help="CPU threads for torch (default: torch's, lowered to the cores the load average leaves free).",
    show_default=False)]


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
            say("[yellow]interrupted[/yellow]")
            raise typer.Exit(130)

    return wrapper


def _fail(message: str, code: int) -> None:
    say(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]")
    raise typer.Exit(code)


def _problem(message: str) -> None:
    say(f"[red]{escape(message)}[/red]")


def _note(message: str) -> None:
    say(f"[yellow]note:[/yellow] {escape(message)}")


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
    """Rich progress: one bar for documents and, for the document being compressed, one bar per stage.

    The stages are those ``compress(progress=)`` and ``CacheStore.add_document(progress=)`` report: ``prefill`` and
    ``score`` (chunks of the current segment) and ``compress`` (segments done). A stage's bar appears, pulsing,
    as soon as the stage starts, so long chunks show the elapsed time while they run.
    """

    STAGES: ClassVar[dict[str, str]] = {"prefill": "prefill", "score": "scoring", "compress": "segments"}
    NEXT: ClassVar[dict[str, str]] = {"prefill": "score"}

    def __init__(self, total_documents: int, scoring: bool = True):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=32),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        )
        self.scoring = scoring  # level "head" has no per-document scoring pass
        self.documents = self.progress.add_task("documents", total=total_documents)
        self.stages: dict[str, int] = {}
        self.completed: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, stage: str, total: int | None) -> int:
        if stage not in self.stages:
            self.stages[stage] = self.progress.add_task("  " + self.STAGES.get(stage, stage), total=total)
        return self.stages[stage]

    def start_document(self, name: str) -> None:
        for task in self.stages.values():
            self.progress.remove_task(task)
        self.stages.clear()
        self.completed.clear()
        self.totals.clear()
        self.progress.update(self.documents, description=f"documents · {escape(name)}")
        self._task("prefill", None)  # pulses until the first chunk is done

    def callback(self, stage: str, done: int, total: int) -> None:
        task = self._task(stage, total)
        if stage in ("prefill", "score") and 0 < done <= self.completed.get(stage, 0):
            self.progress.reset(task, total=total)  # the next segment starts over
        self.completed[stage] = done
        self.progress.update(task, completed=done, total=total)
        self.totals[stage] = total
        following = self.NEXT.get(stage)
        if done >= total and following and (self.scoring or following != "score"):
            following_task = self._task(following, None)
            if following in self.totals and self.completed.get(following, 0) >= self.totals[following]:
                self.progress.reset(following_task, total=None)  # the next segment's pass is starting
                self.completed[following] = 0

    def finish_document(self) -> None:
        self.progress.advance(self.documents)
        if self.progress.tasks[0].finished:
            self.progress.update(self.documents, description="documents")


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
    doc_id: str  # the document answering
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
    doc = hits[0].document_id if hits else doc_id
    return Retrieved(hits, doc, cache, retrieval_s, load_s, store.last_read_nbytes)


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
    kv_bits: Annotated[int, typer.Option("--kv-bits", help="16: keep the model's dtype; 8 or 4: quantize the kept "
                                                           "keys and values (about 3x / 5x smaller blobs).")] = 16,
    store: StoreOpt = None, db: DbOpt = None, model: ModelOpt = None, ratio: RatioOpt = None,
    level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Prefill, score and compress documents into the store (long files are split into segments)."""
    if kv_bits not in (16, 8, 4):
        raise typer.BadParameter(f"--kv-bits takes 16, 8 or 4, got {kv_bits}")
    settings = _settings(ctx, store=store, db=db, model=model, ratio=ratio, level=level, device=device,
                         threads=threads)
    index_paths(settings, paths, doc_id=doc_id, force=force, kv_bits=kv_bits)


def index_paths(settings: Settings, paths: list[Path], doc_id: str | None = None, force: bool = False,
                kv_bits: int = 16) -> None:
    """Index files and folders; a file that cannot be read or compressed is reported and the others go on
    (exit code 1 at the end if any failed)."""
    files = collect_files(paths)
    if doc_id is not None and len(files) != 1:
        raise CLIError(f"--id names one document, but {len(files)} files were given")
    texts, failed = [], []
    for path, name in files:
        try:
            text = extract_text(path)
        except (CLIError, OSError, UnicodeError) as error:
            _problem(f"{path}: {error}")
            failed.append(path)
            continue
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
    with IndexProgress(len(texts), scoring=level != "head") as bars:
        for path, name, text in texts:
            bars.start_document(name)
            before = store.get_document(name)
            if before is not None and before.text != text and not force:
                _problem(f"{path}: document {name!r} is already stored with other text; pass --force to replace it "
                         "or --id to store it under another id")
                failed.append(path)
                bars.finish_document()
                continue
            before_blobs = {c.blob_path for c in before.caches} if before is not None else set()  # ids get reused
            start = time.perf_counter()
            try:
                record = store.add_document(
                    kv_model, text, doc_id=name, metadata={"source": str(path.resolve()), "file": path.name},
                    ratio=ratio, level=level, force=force, progress=bars.callback, kv_bits=kv_bits,
                )
            except KVzipError as error:
                _problem(f"{path}: {error}")
                failed.append(path)
                bars.finish_document()
                continue
            elapsed = time.perf_counter() - start
            bars.finish_document()
            caches = _matching_caches(record, kv_model, ratio, level)
            reused = bool(caches) and all(c.blob_path in before_blobs for c in caches)
            table.add_row(
                escape(name), str(len(record.segments)), str(record.token_count),
                human_bytes(sum(c.kv_nbytes for c in caches)), human_bytes(sum(c.full_nbytes for c in caches)),
                "reused" if reused else f"{elapsed:.1f}s",
            )
    if table.row_count:
        print_table(table)
        console.print(f"[dim]{table.row_count} document(s) at ratio {ratio:g} ({level}) in "
                      f"{time.perf_counter() - start_all:.1f}s[/dim]")
    if failed:
        raise CLIError(f"{len(failed)} file(s) could not be indexed (see above)")


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
    fallback = (f"[cyan]{escape(found.doc_id)}[/cyan] segment 0 (no word of the question matched; answered from "
                "the first segment)")
    lines = ["[bold]sources[/bold]", *(_source_lines(found.hits) or [fallback])]
    lines.append("[bold]timings[/bold]      " + timing_line(found.retrieval_s, found.load_s, result))
    lines.append("[bold]compression[/bold]  " + compression_line(found.cache, found.read_nbytes))
    say("\n".join(lines), soft_wrap=True)


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
    say("[dim]Ask a question; follow-ups stay in the same document. /reset starts over, exit or Ctrl-D quits.[/dim]")
    conversation = None
    while True:
        if interactive:
            say("[bold green]you>[/bold green] ", end="")
            try:
                line = input() + "\n"  # line editing and history where readline is available
            except EOFError:
                break
        else:
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
            say("[dim]conversation reset[/dim]")
            continue
        if not interactive:
            console.print(f"[bold green]you>[/bold green] {escape(question)}")
        try:
            if conversation is None:
                found = retrieve(settings, kv_model, question, k=3, doc_id=doc)
                conversation = kvzip_rag.Conversation(kv_model, found.cache)
                say(f"[dim]talking about {escape(found.doc_id)} · "
                    f"{compression_line(found.cache, found.read_nbytes)}[/dim]")
            elif _window_full(kv_model, conversation, question, max_tokens):
                conversation.reset()
                say("[yellow]the conversation filled the model's window: it starts over from the document[/yellow]")
            console.print("[bold blue]kvzip>[/bold blue] ", end="")
            result = stream_to_console(conversation.stream(question, max_new_tokens=max_tokens))
            tokens = len(result.token_ids)
            rate = (tokens - 1) / result.decode_s if tokens > 1 and result.decode_s > 0 else 0.0
            say(f"[dim]first token {result.time_to_first_token_s * 1000:.0f} ms · "
                f"{rate:.1f} tok/s · turn {len(conversation.turns)}[/dim]")
        except CLIError as error:  # e.g. no document matches: say so and keep the loop going
            say(f"[red]{escape(str(error))}[/red]")


def _window_full(model, conversation, question: str, max_tokens: int) -> bool:
    """Would this turn run past the model's positions (document + earlier turns + question + answer)?"""
    needed = conversation.cache.get_seq_length() + len(model.encode(question)) + 16 + max_tokens
    return needed > model.max_positions


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
    for column in ("segments", "tokens", "ratio", "bits", "bytes", "full bytes", "model"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for record in records:
        kinds: dict[tuple, list] = {}
        for cache in record.caches:
            kinds.setdefault((cache.model_name, cache.ratio, cache.level), []).append(cache)
        if not kinds:
            table.add_row(escape(record.id), str(len(record.segments)), str(record.token_count), "-", "-", "-", "-",
                          "-")
        for (model_name, ratio, level), caches in sorted(kinds.items()):
            bits = "/".join(str(b) for b in sorted({c.kv_bits for c in caches}, reverse=True))
            kept = sum(c.kv_nbytes for c in caches)
            full = sum(c.full_nbytes for c in caches)
            table.add_row(
                escape(record.id), str(len(record.segments)), str(record.token_count),
                f"{ratio:g} {level}", bits, human_bytes(kept), f"{human_bytes(full)} ({full / max(kept, 1):.1f}x)",
                escape(_short_model_name(model_name)),
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
    settings = _settings(ctx, store=store, db=db)
    store_ = settings.open_store()
    unknown = [d for d in doc_ids if d not in store_]
    if unknown:
        raise CLIError(f"no document {', '.join(map(repr, unknown))} in the store at {settings.describe_store()} "
                       "(see `kvzip-rag ls`); nothing was removed")
    for doc_id in doc_ids:
        store_.delete_document(doc_id)
        console.print(f"removed [cyan]{escape(doc_id)}[/cyan]")


@app.command("gc")
@handle_errors
def collect_garbage(
    ctx: typer.Context,
    now: Annotated[bool, typer.Option("--now", help="Also remove orphans younger than 10 minutes: only for a quiet "
                                      "store, where no other process is indexing.")] = False,
    store: StoreOpt = None, db: DbOpt = None,
) -> None:
    """Remove blob files no document points to (left by crashes or interrupted adds); works on a full disk."""
    settings = _settings(ctx, store=store, db=db)
    report = settings.open_store().gc(now=now)
    console.print(f"removed {len(report.removed)} orphan blob(s), freed {human_bytes(report.freed_nbytes)}")
    if report.missing:
        console.print(f"[red]{len(report.missing)} cache(s) have lost their blob file; delete and re-add those "
                      "documents[/red]")


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
    console.print(f"store: {escape(settings.describe_store())}")
    index_paths(settings, sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED))
    kv_model = settings.load_model()
    rows: list[DemoRow] = []
    reprefill: dict[str, float] = {}
    for number, item in enumerate(questions, 1):
        question = item["question"]
        console.print()
        console.print(f"[bold]Q{number}.[/bold] {escape(question)}")
        found = retrieve(settings, kv_model, question, k=3)
        console.print("[bold blue]A:[/bold blue] ", end="")
        result = stream_to_console(kvzip_rag.stream_answer(kv_model, found.cache, question, max_new_tokens=max_tokens))
        accept = [a.lower() for a in item.get("accept", [item.get("answer", "")]) if a]
        correct = any(a in result.text.lower() for a in accept)
        routed = found.doc_id == item.get("document", found.doc_id)
        verdict = "[green]✓ found[/green]" if correct else "[red]✗ not found[/red]"
        routing = "" if routed else f" [yellow](expected {escape(item['document'])})[/yellow]"
        expected = escape(item.get("answer", ""))
        console.print(f"   expected: {expected} {verdict} · source {escape(found.doc_id)}{routing}")
        console.print(f"   [dim]{timing_line(found.retrieval_s, found.load_s, result)}[/dim]")
        console.print(f"   [dim]{compression_line(found.cache, found.read_nbytes)}[/dim]")
        if found.doc_id not in reprefill:  # the baseline, once per document: read the whole document again
            reprefill[found.doc_id] = reprefill_seconds(kv_model, found.cache, question)
        rows.append(DemoRow(correct, routed, found, result))
    _demo_summary(rows, reprefill, time.perf_counter() - start_all)


@dataclass
class DemoRow:
    correct: bool
    routed: bool
    found: Retrieved
    result: object  # kvzip_rag.Answer


def reprefill_seconds(model, cache, question: str) -> float:
    """Time to the first token without a stored cache: prefill the whole document and the question again."""
    from .compress import prefill

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
    settings = _settings(ctx)
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


if __name__ == "__main__":  # pragma: no cover
    app()
