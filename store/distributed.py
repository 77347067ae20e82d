"""Indexing fanned out on Ray: documents spread over actors that each load the model once and write to one store.

    >>> from kvzip_rag.store.distributed import index_documents
    >>> report = index_documents(docs, store_url="postgresql+psycopg2://...", blob_url="s3://bucket/caches",
    ...                          model="smollm2-135m-instruct", address="auto")

Each actor (one per GPU where the cluster has GPUs, else one per CPU, with one torch thread) loads the model once,
then compresses documents and stores them through the store's :class:`~.indexer.Indexer`, which writes the
blobs first and the rows last in one transaction: a worker that dies mid-document leaves at most blobs no row
points to (removed by ``CacheStore.gc``), never a row without its blob. The driver hands documents out one at a time (a slow document
never holds up a whole shard), replaces a dead actor and retries its document up to ``max_retries`` times.
Re-running the same job skips documents already stored with the same text and caches of this model and settings.
Ray is an optional extra: ``pip install 'kvzip-rag[ray]'``.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kvzip_rag.budget import DEFAULT_BUDGET
from kvzip_rag.errors import ClusterError, InvalidArgumentError, KVzipError
from kvzip_rag.extras import require

@dataclass(frozen=True)
class Job:
    """One document to index."""

    doc_id: str
    text: str
    metadata: dict = field(default_factory=dict)


@dataclass
class IndexReport:
    indexed: list[str] = field(default_factory=list)  # compressed and stored by this run
    skipped: list[str] = field(default_factory=list)  # already stored with the same text and settings
    failed: dict[str, str] = field(default_factory=dict)  # doc id -> error
    retries: int = 0  # documents handed out again after their worker died
    workers: int = 0
    startup_s: float = 0.0  # until every worker had its model loaded
    indexing_s: float = 0.0  # from then until the last document was stored
    busy_s: float = 0.0  # wall time workers spent on documents, summed
    cpu_s: float = 0.0  # CPU time they got meanwhile, summed (below busy_s: they waited for a core)

    @property
    def ok(self) -> bool:
        return not self.failed


def _require_ray():
    require("ray", "ray", "distributed indexing")
    import ray

    return ray


def init_ray(address: str | None = None, **options):
    """Connect to the Ray cluster at ``address``, or start a local one whose workers run at normal priority.

    Ray starts its workers at niceness 15, so on a shared machine indexing on Ray yielded to every other process
    (2 workers got ~0.5 core each beside one niced job) where plain indexing runs at 0. ``RAY_worker_niceness`` set
    by the user wins.
    """
    ray = _require_ray()
    if address is None:
        os.environ.setdefault("RAY_worker_niceness", "0")
        if not os.environ.get("RAY_ADDRESS"):
            _check_temp_dir(options.get("_temp_dir"))
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, **options)
    except Exception as error:  # Ray raises bare Exception, RuntimeError, ConnectionError, OSError...
        ray.shutdown()
        first_line = (str(error).strip().splitlines() or [""])[0]
        where = f"join the Ray cluster at {address}" if address else "start a local Ray cluster"
        raise ClusterError(f"could not {where}: {type(error).__name__}: {first_line}") from error
    return ray


def _check_temp_dir(temp_dir: str | None) -> None:
    """A local cluster keeps its sockets and logs under the temp folder, used by processes that run in other
    folders: a relative one makes them time out after half a minute, so it is refused at once."""
    for name, value in (("_temp_dir", temp_dir), ("RAY_TMPDIR", os.environ.get("RAY_TMPDIR")),
                        ("TMPDIR", os.environ.get("TMPDIR"))):
        if value:
            if not os.path.isabs(value):
                raise ClusterError(f"{name}={value!r} is a relative path: a local Ray cluster cannot start with it; "
                                   f"set {name} to an absolute folder, or join a running cluster (its address)")
            return


def _content_id(text: str) -> str:
    from .indexer import content_hash

    return content_hash(text)[:32]


class IndexWorker:
    """The body of one Ray actor: a model and a store, opened once, then one document per call."""

    def __init__(self, model, store_options: dict, settings: dict, threads: int = 1):
        import torch

        from kvzip_rag.models import load_model

        from .cache_store import CacheStore

        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else None
        self.model = model() if callable(model) else load_model(model, device=device, threads=threads)
        self.store = CacheStore(**store_options)
        self.indexer = self.store.indexer(self.model)
        self.settings = settings

    def _stored(self, job: Job) -> bool:
        record = self.store.get_document(job.doc_id)
        if record is None or record.text != job.text:
            return False
        kind = self.indexer.kind(self.settings["ratio"], self.settings["level"], self.settings["scorer"],
                                 self.settings["kv_bits"])
        have = {c.segment_id for c in record.caches if kind.matches(c)}
        return bool(record.segments) and all(s.id in have for s in record.segments)

    def index(self, job: Job) -> tuple[str, str, str, float, float]:
        """``(doc_id, "indexed" | "skipped" | "failed", error, wall s, CPU s)``; errors of the document itself are
        returned, not raised, so only a dead worker looks like a dead worker."""
        start, start_cpu = time.perf_counter(), time.process_time()
        try:
            if not self.settings.get("force") and self._stored(job):
                status, error = "skipped", ""
            else:
                self.indexer.add(job.text, doc_id=job.doc_id, metadata=job.metadata or None,
                                 ratio=self.settings["ratio"], level=self.settings["level"],
                                 scorer=self.settings["scorer"], force=self.settings.get("force", False),
                                 kv_bits=self.settings["kv_bits"])
                status, error = "indexed", ""
        except KVzipError as failure:
            status, error = "failed", f"{type(failure).__name__}: {failure}"
        return job.doc_id, status, error, time.perf_counter() - start, time.process_time() - start_cpu

    def pid(self) -> int:
        return os.getpid()


def _as_jobs(documents: Iterable) -> list[Job]:
    jobs, seen = [], set()
    for item in documents:
        if isinstance(item, Job):
            job = item
        elif isinstance(item, str):
            job = Job(_content_id(item), item)
        elif isinstance(item, dict):
            job = Job(item.get("doc_id") or _content_id(item["text"]), item["text"], item.get("metadata") or {})
        else:
            doc_id, text, *rest = item
            job = Job(doc_id or _content_id(text), text, rest[0] if rest else {})
        if job.doc_id in seen:
            raise InvalidArgumentError(f"document id {job.doc_id!r} appears twice in one indexing job")
        seen.add(job.doc_id)
        jobs.append(job)
    return jobs


def index_documents(
    documents: Iterable,
    *,
    store_url: str | None = None,
    store_path: str | os.PathLike | None = None,
    blob_dir: str | os.PathLike | None = None,
    blob_url: str | None = None,
    blob_timeout: float | None = None,
    model=None,
    ratio: float = DEFAULT_BUDGET.ratio,
    level: str = DEFAULT_BUDGET.level,
    scorer: str = "kvzip",
    force: bool = False,
    kv_bits: int = 16,
    address: str | None = None,
    workers: int | None = None,
    threads: int = 1,
    matmul: str | None = None,
    max_retries: int = 2,
    progress: bool = True,
    ray_init: dict | None = None,
) -> IndexReport:
    """Compress and store ``documents`` on a Ray cluster; returns what was indexed, skipped, failed and retried.

    ``documents``: texts, ``(doc_id, text[, metadata])`` tuples, dicts with ``text`` (and ``doc_id``,
    ``metadata``) or :class:`Job` s. The store is opened in every worker from ``store_url`` (an SQLAlchemy URL every
    worker can reach) or ``store_path`` (a folder store on a file system they share), with the blobs in
    ``blob_url`` (``s3://bucket/prefix``; credentials from each worker's environment; ``blob_timeout`` as in
    ``CacheStore``) or ``blob_dir``.
    ``model``: an alias/path for :func:`kvzip_rag.load_model`, or a picklable zero-argument callable returning a
    ``KVzipModel`` (e.g. a custom or test model). ``kv_bits`` 8 or 4 stores quantized caches (as
    ``CacheStore.add_document``); a document stored with other bits is indexed again. ``address``: a running cluster (``"auto"`` or ``ray://...``);
    None starts a local one. ``workers`` defaults to one per GPU, else one per CPU of the cluster. ``matmul``: the
    workers' weight-product precision (:mod:`kvzip_rag.matmul`; default ``KVZIP_RAG_MATMUL`` here, else float32).
    """
    from kvzip_rag.budget import check_ratio_level
    from kvzip_rag.matmul import MATMUL_ENV, resolve_matmul
    from kvzip_rag.quant import check_bits

    ray = _require_ray()
    check_ratio_level(ratio, level)
    check_bits(kv_bits)
    matmul = resolve_matmul(matmul)
    jobs = _as_jobs(documents)
    if (store_url is None) == (store_path is None):
        raise InvalidArgumentError("give the store as store_url= (a database URL) or store_path= (a folder)")
    store_options = {"url": store_url} if store_url is not None else {"path": os.fspath(store_path)}
    if blob_dir is not None:
        store_options["blob_dir"] = os.fspath(blob_dir)
    if blob_url is not None:
        store_options.update(blob_url=blob_url, blob_timeout=blob_timeout)
    settings = {"ratio": float(ratio), "level": level, "scorer": scorer, "force": force, "kv_bits": kv_bits}
    report = IndexReport()
    if not jobs:
        return report
    if not ray.is_initialized():
        init_ray(address, **(ray_init or {}))
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    per_actor = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    count = workers or gpus or max(1, int(resources.get("CPU", 1)))
    count = max(1, min(count, len(jobs)))
    actor_class = ray.remote(max_restarts=0)(IndexWorker).options(
        **per_actor, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads), "KVZIP_RAG_THREADS": str(threads),
                                               MATMUL_ENV: matmul}}
    )

    def spawn():
        return actor_class.remote(model, store_options, settings, threads)

    start = time.perf_counter()
    actors = [spawn() for _ in range(count)]
    report.workers = count
    try:
        ray.get([actor.pid.remote() for actor in actors])  # models loaded: what follows is indexing proper
    except ray.exceptions.RayActorError as error:  # e.g. the model cannot be loaded: every worker would fail
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise KVzipError(f"a Ray indexing worker could not start: {error}") from error
    report.startup_s = time.perf_counter() - start
    queue = deque(jobs)
    attempts: dict[str, int] = {}
    running: dict[Any, tuple[Any, Job]] = {}  # object ref -> (actor, job)

    def submit(actor) -> None:
        if queue:
            job = queue.popleft()
            running[actor.index.remote(job)] = (actor, job)

    try:
        with _Progress(len(jobs), enabled=progress) as bar:
            for actor in actors:
                submit(actor)
            while running:
                done, _ = ray.wait(list(running), num_returns=1)
                ref = done[0]
                actor, job = running.pop(ref)
                try:
                    doc_id, status, error, busy, cpu = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as error:
                    attempts[job.doc_id] = attempts.get(job.doc_id, 0) + 1
                    ray.kill(actor, no_restart=True)
                    actors.remove(actor)
                    if attempts[job.doc_id] > max_retries:
                        report.failed[job.doc_id] = f"its worker died {attempts[job.doc_id]} times: {error}"
                        bar.advance(status="failed")
                    else:
                        report.retries += 1
                        bar.retried()
                        queue.appendleft(job)
                    if queue:
                        actor = spawn()  # the replacement loads the model again
                        actors.append(actor)
                        submit(actor)
                    continue
                except ray.exceptions.RayTaskError as error:  # a bug, not a document problem: report it, go on
                    report.failed[job.doc_id] = str(error.cause if hasattr(error, "cause") else error)
                    bar.advance(status="failed")
                    submit(actor)
                    continue
                report.busy_s += busy
                report.cpu_s += cpu
                if status == "indexed":
                    report.indexed.append(doc_id)
                elif status == "skipped":
                    report.skipped.append(doc_id)
                else:
                    report.failed[doc_id] = error
                bar.advance(status=status)
                submit(actor)
        report.indexing_s = time.perf_counter() - start - report.startup_s
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return report


class _Progress:
    """One rich bar over the whole job, with indexed / skipped / failed / retried counts."""

    def __init__(self, total: int, enabled: bool = True):
        self.enabled, self.total = enabled, total
        self.counts = {"indexed": 0, "skipped": 0, "failed": 0, "retried": 0}

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            self.progress = Progress(TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.__enter__()
            self.task = self.progress.add_task("documents", total=self.total, detail="")
        return self

    def advance(self, status: str) -> None:
        self.counts[status] += 1
        self._show(advance=1)

    def retried(self) -> None:
        self.counts["retried"] += 1
        self._show(advance=0)

    def _show(self, advance: int) -> None:
        if self.enabled:
            detail = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
            self.progress.update(self.task, advance=advance, detail=detail)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)
