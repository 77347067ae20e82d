"""``kvzip-rag index``: files and folders into compressed caches; one bad file never stops the others."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kvzip_rag.budget import Budget
from kvzip_rag.errors import BlobStorageError, KVzipError
from kvzip_rag.frontier import CurvePoint
from kvzip_rag.text import safe_path

from .app import app, settings_of
from .files import collect_files, extract_text
from .output import console, human_bytes, note, print_table, problem, show
from .progress import IndexProgress
from .settings import CLIError, Settings, handle_errors


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
    kv_bits: Annotated[int | None, typer.Option("--kv-bits", help="16 (default): keep the model's dtype; 8 or 4: "
                                                                  "quantize the kept keys and values (about 3x / "
                                                                  "5x smaller blobs); 3: 4-bit keys with 2-bit "
                                                                  "values; 2: 2-bit keys and values.")] = None,
    scorer: Annotated[str | None, typer.Option("--scorer", help="How KV pairs are ranked: kvzip (default; with "
                                                                "--target-bytes / --max-nll-loss, the curve's "
                                                                "choice), kvzip-fast (a calibrated gate, one "
                                                                "prefill), kvzip-structure (punctuation and "
                                                                "whitespace demoted), kvzip-value (weighted by "
                                                                "what each value adds to the output).")] = None,
    target_bytes: Annotated[str | None, typer.Option("--target-bytes", help="Choose ratio and kv_bits from the "
                                                                          "model's measured curve: the best "
                                                                          "fidelity within this many blob bytes per "
                                                                          "document token (900), or this fraction "
                                                                          "of the full fp16 cache (0.02x).")] = None,
    max_nll_loss: Annotated[float | None, typer.Option("--max-nll-loss", help="Choose ratio and kv_bits from the "
                                                                            "model's measured curve: the fewest "
                                                                            "bytes whose gold-answer NLL loss to the "
                                                                            "full cache (95% CI upper end, nats) is "
                                                                            "at most this.")] = None,
    ray: Annotated[bool, typer.Option("--ray", help="Compress on a Ray cluster (kvzip-rag\\[ray]): one worker per "
                                                    "GPU, else per CPU; $RAY_ADDRESS or a local cluster.")] = False,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="The Ray cluster to join (auto, "
                                                                         "ray://head:10001); implies --ray.")] = None,
) -> None:
    """Prefill, score and compress documents into the store (long files are split into segments)."""
    from kvzip_rag.quant import KV_BITS  # imports torch: not at module level (ls, rm, gc must start fast)
    from kvzip_rag.scorers import SCORERS

    if kv_bits is not None and kv_bits not in KV_BITS:
        raise typer.BadParameter(f"--kv-bits takes {', '.join(map(str, KV_BITS[:-1]))} or {KV_BITS[-1]}, "
                                 f"got {kv_bits}")
    if scorer is not None and scorer not in SCORERS:
        raise typer.BadParameter(f"--scorer takes one of {', '.join(SCORERS)}, got {scorer!r}")
    settings = settings_of(ctx)
    point = None
    if target_bytes is not None or max_nll_loss is not None:
        kv_bits, scorer, point = chosen_budget(settings, target_bytes, max_nll_loss, scorer, kv_bits)
    scorer = scorer or "kvzip"
    texts, failed = read_texts(paths, doc_id)
    some_failed = None
    try:
        if ray or ray_address:
            index_texts_on_ray(settings, texts, failed, ray_address, force=force, kv_bits=kv_bits or 16,
                               scorer=scorer)
        else:
            index_texts(settings, texts, failed, force=force, kv_bits=kv_bits or 16, scorer=scorer)
    except CLIError as error:  # some files could not be indexed: the others are stored, and reported first
        some_failed = error
    if point is not None:
        say_stored_bytes(settings, [name for _, name, _ in texts], point, target_bytes)
    if some_failed is not None:
        raise some_failed


def chosen_budget(settings: Settings, target_bytes: str | None, max_nll_loss: float | None, scorer: str | None,
                  kv_bits: int | None) -> tuple[int, str, CurvePoint]:
    """Set ``settings.ratio`` and return the kv_bits, scorer and curve point chosen from the model's curve for
    ``--target-bytes`` / ``--max-nll-loss`` (which exclude ``--ratio`` and ``--kv-bits``; ``scorer`` None: the
    curve chooses it too); says what was chosen."""
    from kvzip_rag.frontier import pick_budget

    if settings.level not in (None, "pair"):
        raise CLIError("--target-bytes / --max-nll-loss choose among pair-level caches: drop --level")
    ratio, bits, scorer, point = pick_budget(settings.load_model(), target_bytes=target_bytes,
                                             max_nll_loss=max_nll_loss, scorer=scorer, ratio=settings.ratio,
                                             kv_bits=kv_bits)
    note(f"chosen from the measured curve: {point.describe()}")
    settings.ratio = ratio
    return bits, scorer, point


def say_stored_bytes(settings: Settings, names: list[str], point: CurvePoint, target_bytes: str | None) -> None:
    """After indexing by a curve point: the bytes per token the named documents' caches at that point take."""
    from kvzip_rag.frontier import stored_against_point

    store = settings.open_store(create=True)
    note(stored_against_point([store.get_document(name) for name in names], point, target_bytes)[0])


def index_texts_on_ray(settings: Settings, texts: list[tuple[Path, str, str]], failed: list[Path],
                       address: str | None, force: bool = False, kv_bits: int = 16, scorer: str = "kvzip") -> None:
    """Index :func:`read_texts`' texts with kvzip_rag.store.distributed (a worker that dies has its document
    retried); ``failed``: the files that could not be read (the exit code says so at the end)."""
    from kvzip_rag.store.distributed import index_documents

    settings.open_store(create=True)  # a bad --db or --blob-url fails here, once, not in every worker
    where = {{"url": "store_url", "path": "store_path"}.get(k, k): v for k, v in settings.store_location().items()}
    budget = settings.index_budget()
    report = index_documents(
        [(name, text, {"source": safe_path(path.resolve()), "file": safe_path(path.name)})
         for path, name, text in texts],
        model=settings.model, ratio=budget.ratio, level=budget.level, force=force, kv_bits=kv_bits, scorer=scorer,
        address=address,
        threads=settings.threads or 1,
        matmul=settings.matmul,
        **where,
    )
    for name, error in report.failed.items():
        problem(f"{name}: {error}")
    console.print(f"[dim]{len(report.indexed)} indexed, {len(report.skipped)} already stored, "
                  f"{len(report.failed)} failed, {report.retries} retried on {report.workers} Ray worker(s), "
                  f"into {show(settings.describe_store())}[/dim]")
    if failed or report.failed:
        raise CLIError(f"{len(failed) + len(report.failed)} file(s) could not be indexed (see above)")


def read_texts(paths: list[Path], doc_id: str | None = None) -> tuple[list[tuple[Path, str, str]], list[Path]]:
    """``(path, document id, text)`` of every readable file with text, and the files that could not be read."""
    files, failed = collect_files(paths)
    if doc_id is not None and len(files) + len(failed) != 1:
        raise CLIError(f"--id names one document, but {len(files) + len(failed)} files were given")
    if doc_id is not None and failed:  # one file whose name is not a valid id: --id gives it one
        files, failed = [(failed[0], doc_id)], []
    texts = []
    for path, name in files:
        try:
            text = extract_text(path)
        except (CLIError, KVzipError, OSError, UnicodeError) as error:
            problem(f"{path}: {error}")
            failed.append(path)
            continue
        if not text.strip():
            note(f"skipping {path}: no text in it")
            continue
        texts.append((path, doc_id or name, text))
    if not texts:
        if failed:
            raise CLIError(f"{len(failed)} file(s) could not be indexed (see above)")
        raise CLIError("the given files hold no text: nothing to index")
    return texts, failed


def index_paths(settings: Settings, paths: list[Path], doc_id: str | None = None, force: bool = False,
                kv_bits: int = 16, scorer: str = "kvzip") -> None:
    """Index files and folders; a file that cannot be read or compressed is reported and the others go on
    (exit code 1 at the end if any failed)."""
    index_texts(settings, *read_texts(paths, doc_id), force=force, kv_bits=kv_bits, scorer=scorer)


def index_texts(settings: Settings, texts: list[tuple[Path, str, str]], failed: list[Path], force: bool = False,
                kv_bits: int = 16, scorer: str = "kvzip") -> None:
    """Index :func:`read_texts`' texts (``failed``: the files it could not read, counted in the exit code)."""
    kv_model = settings.load_model()
    store = settings.open_store(create=True)
    budget = settings.index_budget()
    table = Table(title=f"Indexed into {show(settings.describe_store())}", title_justify="left")
    for column in ("document", "segments", "tokens", "kept KV", "full KV", "time"):
        table.add_column(column, justify="left" if column == "document" else "right")
    start_all = time.perf_counter()
    with IndexProgress(len(texts), scoring=budget.level != "head") as bars:
        for path, name, text in texts:
            bars.start_document(name)
            try:
                row = _index_one(store, kv_model, path, name, text, budget, force, bars.callback, kv_bits, scorer)
            except BlobStorageError:  # the object store refused or failed: every other file would fail alike
                raise
            except (KVzipError, OSError) as error:
                problem(f"{path}: {error}")
                row = None
            bars.finish_document()
            if row is None:
                failed.append(path)
            else:
                table.add_row(*row)
    if table.row_count:
        print_table(table)
        console.print(f"[dim]{table.row_count} document(s) at ratio {budget.ratio:g} ({budget.level}) in "
                      f"{time.perf_counter() - start_all:.1f}s[/dim]")
    if failed:
        raise CLIError(f"{len(failed)} file(s) could not be indexed (see above)")


def _index_one(store, kv_model, path: Path, name: str, text: str, budget: Budget, force: bool,
               progress, kv_bits: int = 16, scorer: str = "kvzip") -> list[str] | None:
    from kvzip_rag.budget import CacheKind, same_ratio, select_cache

    before = store.get_document(name)
    if before is not None and before.text != text and not force:
        problem(f"{path}: document {name!r} is already stored with other text; pass --force to replace it "
                "or --id to store it under another id")
        return None
    before_blobs = {c.blob_path for c in before.caches} if before is not None else set()
    start = time.perf_counter()
    record = store.add_document(kv_model, text, doc_id=name, metadata={"source": safe_path(path.resolve()),
                                                                       "file": safe_path(path.name)},
                                ratio=budget.ratio, level=budget.level, force=force, progress=progress,
                                kv_bits=kv_bits, scorer=scorer)
    elapsed = time.perf_counter() - start
    kind = CacheKind.of_model(kv_model)
    caches = [select_cache([c for c in record.caches if c.segment_index == s.index], kind, budget)
              for s in record.segments]
    caches = [c for c in caches if c is not None and same_ratio(c.ratio, budget.ratio)]
    reused = bool(caches) and all(c.blob_path in before_blobs for c in caches)
    return [show(name), str(len(record.segments)), str(record.token_count),
            human_bytes(sum(c.kv_nbytes for c in caches)), human_bytes(sum(c.full_nbytes for c in caches)),
            "reused" if reused else f"{elapsed:.1f}s"]
