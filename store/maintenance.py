"""Store maintenance: ``verify`` (every byte of every blob, against its row) and ``gc`` (orphan blobs and shared
prefixes no cache uses any more)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from kvzip_rag.errors import BlobStorageError, CorruptBlobError, KVzipError

from .backends import file_sha256
from .blob import BlobReader, ReadStats
from .records import GCReport, VerifyProblem, VerifyReport, cache_record, segment_label
from .schema import Cache, Prefix, Segment
from .validate import doc_id_list


def verify(store, doc_ids: Iterable[str] | None = None) -> VerifyReport:
    """Check every blob (or those of ``doc_ids``): present, a regular file, same sha256 as recorded, valid header
    and checksums, and describing the cache its row says; and every segment has a cache. Every damaged document is
    named and none stops the others (a blob replaced by a folder or a pipe, a path outside the blob folder, a
    missing cache row); only an unreachable object store ends it (``BlobStorageError``). Nothing is changed."""
    from .cachefile import document_header  # these import torch: gc (below) must not
    from .indexer import content_hash
    from .loading import read_cache

    report = VerifyReport()
    with store.read_session() as session:
        stmt = sa.select(Cache, Segment).join(Segment, Segment.id == Cache.segment_id)
        bare = (sa.select(Segment.document_id, Segment.index).outerjoin(Cache, Cache.segment_id == Segment.id)
                .where(Cache.id.is_(None)))
        if doc_ids is not None:
            ids = doc_id_list(doc_ids)
            stmt = stmt.where(Segment.document_id.in_(ids))
            bare = bare.where(Segment.document_id.in_(ids))
        prefixes = {p.id: p for p in session.scalars(sa.select(Prefix))}
        found = [(cache_record(c, s), prefixes.get(c.prefix_id), s.text)
                 for c, s in session.execute(stmt.order_by(Cache.id))]
        uncached = session.execute(bare.order_by(Segment.document_id, Segment.index)).all()
    bad_prefixes = {}
    for row in {p.id: p for _, p, _ in found if p is not None}.values():
        what = f"the shared prefix of model {row.model_name!r}"

        def check_prefix(row=row, what=what) -> None:
            if file_sha256(store.blobs, row.blob_path) != row.sha256:
                raise CorruptBlobError(f"{what} is corrupted (sha256)")
            with BlobReader(store.blobs, row.blob_path, what) as reader:
                reader.verify_payload()

        error = _damage(check_prefix, what)
        if error is not None:
            bad_prefixes[row.id] = error
    for record, prefix_row, text in found:
        report.checked += 1
        label = segment_label(record.document_id, record.segment_index)

        def check(record=record, prefix_row=prefix_row, text=text, label=label) -> None:
            if prefix_row is not None and prefix_row.id in bad_prefixes:
                raise CorruptBlobError(bad_prefixes[prefix_row.id])
            if file_sha256(store.blobs, record.blob_path) != record.sha256:
                raise CorruptBlobError(f"{label} is corrupted: its sha256 differs from the one recorded")
            with BlobReader(store.blobs, record.blob_path, label) as reader:
                reader.verify_payload()
                header = document_header(reader)
            if header.segment_sha256 and header.segment_sha256 != content_hash(text):
                raise CorruptBlobError(f"{label}: the blob was built from another text than its segment's")
            read_cache(store, record, prefix_row, None, None, ReadStats())

        error = _damage(check, label)
        if error is not None:
            report.problems.append(VerifyProblem(record.id, record.document_id, record.segment_index,
                                                 record.blob_path, error))
    for document_id, segment_index in uncached:
        label = segment_label(document_id, segment_index)
        report.problems.append(VerifyProblem(None, document_id, segment_index, None,
                                             f"{label} has no cache (its row is gone): re-index the document"))
    return report


def _damage(check, label: str) -> str | None:
    """What is wrong with one blob, as a message that starts with ``label``; None when ``check()`` passes."""
    try:
        check()
    except BlobStorageError:  # the object store is unreachable or refuses us: not a problem of this blob
        raise
    except (FileNotFoundError, NotADirectoryError):
        return f"{label}: the blob is missing"
    except Exception as error:  # KVzipError, OSError (a folder or device in its place), a damaged tensor...
        text = str(error) or type(error).__name__
        if not isinstance(error, KVzipError):
            text = f"the blob cannot be read ({type(error).__name__}: {text})"
        return text if text.startswith(label) else f"{label}: {text}"
    return None


def collect_garbage(store, *, min_age_s: float, dry_run: bool = False) -> GCReport:
    """Remove blobs (and stale temp files) that no row points to, then shared prefixes no cache uses any more,
    both only when older than ``min_age_s`` (younger ones may belong to an add still in progress in another
    process; 0 is for a quiet store). Reports rows whose blob is missing in ``missing`` (``verify()`` says more).
    Works on a full disk (orphan blobs go first: that frees space before any row is deleted) and, with
    ``dry_run``, on a read-only store (it only reads)."""
    if not dry_run:
        store.require_writable()
    report = GCReport()
    with store.read_session() as session:
        referenced = dict(session.execute(sa.select(Cache.blob_path, Cache.id)).all())
        prefixes = set(session.scalars(sa.select(Prefix.blob_path)))
    clock = time.time()
    entries = list(store.blobs.entries())
    for relative, size, mtime in entries:
        if relative in referenced or relative in prefixes:
            continue
        name = relative.rsplit("/", 1)[-1]
        if not (name.endswith(".safetensors") or name.endswith(".tmp")):
            continue  # not ours (the reserve included): never touch files we did not write
        if clock - mtime < min_age_s:
            continue
        report.removed.append(relative)
        report.freed_nbytes += size
        if not dry_run:
            store.blobs.delete(relative)
    present = {name for name, _, _ in entries}
    report.missing = sorted(cid for rel, cid in referenced.items() if rel not in present)
    _collect_prefixes(store, min_age_s, dry_run, report)
    if not dry_run:
        store.reserve.keep()
    return report


def _unused(cutoff: datetime):
    """Prefix rows no cache references, created before ``cutoff``: the one rule of what gc may remove."""
    return sa.and_(Prefix.created < cutoff, ~sa.exists().where(Cache.prefix_id == Prefix.id))


def _collect_prefixes(store, min_age_s: float, dry_run: bool, report: GCReport) -> None:
    """Delete unused prefix rows (each in its own transaction that re-checks the rule), then their blobs.

    Race-safe with writers: a writer takes the prefix it uses with a key-share lock in the very transaction that
    inserts its caches and, if gc removed it meanwhile, stores it again (``Indexer``). So either this delete
    commits first and the writer sees the row gone, or the writer's caches commit first and this delete finds
    them (SQLite serialises the two transactions; on PostgreSQL the foreign key refuses the delete, which is
    then skipped)."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=min_age_s)
    with store.read_session() as session:
        candidates = session.execute(
            sa.select(Prefix.id, Prefix.blob_path, Prefix.nbytes, Prefix.model_name).where(_unused(cutoff))
        ).all()

    def delete(prefix_id: int) -> bool:
        try:
            with store.write_session() as session, session.begin():
                gone = session.execute(sa.delete(Prefix).where(Prefix.id == prefix_id, _unused(cutoff))
                                       .execution_options(synchronize_session=False))
        except sa.exc.IntegrityError:  # a writer's caches reference it now
            return False
        return gone.rowcount == 1

    for prefix_id, blob_path, nbytes, model_name in candidates:
        if not dry_run:
            if not store.reserve.retry(lambda: delete(prefix_id), store.where):
                continue
            store.blobs.delete(blob_path)
        report.removed.append(blob_path)
        report.freed_nbytes += nbytes
        report.prefixes.append(model_name)
