"""The CLI with its blobs in object storage (``--blob-url`` / ``$KVZIP_RAG_BLOB_URL``) on a real S3-compatible server
(SeaweedFS, see s3_server.py): rows in the ``--store`` folder's SQLite file or in PostgreSQL (``--db``), indexing
in process and on a local Ray cluster, then ``ls``, ``ask``, ``verify``, ``rm`` and ``gc`` reading the bucket; and
one clear error line for an unsupported scheme, a missing obstore, refused or missing credentials.

Skips, saying why, where the S3 server (or PostgreSQL, or Ray, for the tests that need them) cannot start."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvzip_rag.cli import app
from kvzip_rag.store import CacheStore
from kvzip_rag.store.objects import ObstoreObjects

from s3_server import s3_blob_url, s3_server  # noqa: F401  (fixtures)
from test_cli import HARBOUR, LIGHTHOUSE, WIDE, tiny_model_dir  # noqa: F401  (fixture)
from test_store_postgres import postgres_url  # noqa: F401  (fixture)

ENV = {**WIDE, "KVZIP_RAG_BLOB_URL": None}
QUESTION = "Who built the harbour of Velmora?"


@pytest.fixture()
def docs(tmp_path) -> Path:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "harbour.txt").write_text(HARBOUR)
    (folder / "lighthouse.md").write_text(LIGHTHOUSE)
    return folder


def objects(url: str) -> list[str]:
    return sorted(name for name, _, _ in ObstoreObjects(url).entries())


def invoke(*args: str, env: dict | None = None):
    result = CliRunner(env=ENV).invoke(app, list(args), env=env)
    assert "Traceback" not in result.output, result.output
    return result


def last_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_blobs_in_s3_rows_in_the_store_folder(s3_blob_url, tiny_model_dir, docs, tmp_path):  # noqa: F811
    folder = tmp_path / "store"
    options = ["--store", str(folder), "--blob-url", s3_blob_url, "--model", str(tiny_model_dir)]
    indexed = invoke(*options, "index", str(docs))
    assert indexed.exit_code == 0, indexed.output
    assert (folder / "index.sqlite").is_file() and not (folder / "blobs").exists()  # rows here, blobs there
    stored = objects(s3_blob_url)
    assert len(stored) == 3 and all(n.endswith(".safetensors") for n in stored)  # 2 caches + the shared prefix

    env = {**ENV, "KVZIP_RAG_STORE": str(folder), "KVZIP_RAG_BLOB_URL": s3_blob_url,
           "KVZIP_RAG_MODEL": str(tiny_model_dir)}  # the same store through the environment
    listing = invoke("ls", env=env)
    assert listing.exit_code == 0 and "harbour.txt" in listing.stdout and "lighthouse.md" in listing.stdout
    assert s3_blob_url in listing.stdout  # the title says where the blobs are
    answer = invoke("ask", QUESTION, "--max-tokens", "4", "--ratio", "0.1", env=env)  # a ranged read of the blob
    assert answer.exit_code == 0, answer.output
    assert "harbour.txt" in answer.stderr and "ratio 0.1" in answer.stderr
    checked = invoke("verify", env=env)
    assert checked.exit_code == 0 and "2 cache(s)" in checked.stdout, checked.output

    # The same rows without --blob-url look for their blobs in the folder: missing, said so (nothing is served)
    local = invoke("--store", str(folder), "verify")
    assert local.exit_code == 1 and "missing" in local.stderr and "2 of 2 cache(s)" in last_line(local)

    # A damaged object is found by verify, naming the document
    with CacheStore(folder, blob_url=s3_blob_url) as opened:
        harbour_key = opened.caches_for("harbour.txt")[0].blob_path
    damaged = ObstoreObjects(s3_blob_url)
    original = damaged.read(harbour_key)
    damaged.write(harbour_key, original[:-10])
    broken = invoke("verify", env=env)
    assert broken.exit_code == 1 and "1 of 2 cache(s)" in last_line(broken), broken.output
    damaged.write(harbour_key, original)

    # rm deletes the document's object; gc --now then removes an orphan and, once no cache uses it, the prefix
    assert invoke("rm", "harbour.txt", env=env).exit_code == 0
    assert len(objects(s3_blob_url)) == 2
    damaged.write("ff/ff00.safetensors", b"left behind by a crash")
    collected = invoke("gc", "--now", env=env)
    assert collected.exit_code == 0 and "removed 1 orphan blob(s)," in collected.stdout, collected.output
    assert invoke("rm", "lighthouse.md", env=env).exit_code == 0
    last = invoke("gc", "--now", env=env)
    assert last.exit_code == 0 and "removed 0 orphan blob(s), and the shared prefix of" in last.stdout, last.output
    assert objects(s3_blob_url) == []


def test_blobs_in_s3_rows_in_postgresql(s3_blob_url, postgres_url, tiny_model_dir, docs):  # noqa: F811
    options = ["--db", postgres_url, "--blob-url", s3_blob_url, "--model", str(tiny_model_dir)]
    indexed = invoke(*options, "index", str(docs / "harbour.txt"))
    assert indexed.exit_code == 0, indexed.output
    assert len(objects(s3_blob_url)) == 2
    listing = invoke(*options, "ls")
    assert listing.exit_code == 0 and "harbour.txt" in listing.stdout
    answer = invoke(*options, "ask", QUESTION, "--max-tokens", "4")
    assert answer.exit_code == 0 and "harbour.txt" in answer.stderr, answer.output
    assert invoke(*options, "verify").exit_code == 0
    assert invoke(*options, "rm", "harbour.txt").exit_code == 0
    assert invoke(*options, "gc", "--now").exit_code == 0 and objects(s3_blob_url) == []


@pytest.fixture()
def ray_with_s3(s3_server, default_model):  # noqa: F811  (default_model: the tokenizer workers read exists)
    """A local Ray cluster whose workers get the S3 variables, as a deployment gives them its credentials."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kvzip-rag[ray]')")
    if ray.is_initialized():
        ray.shutdown()
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": path, **s3_server.env}})
    try:
        yield
    finally:
        ray.shutdown()


def test_index_on_ray_into_s3(ray_with_s3, s3_blob_url, tiny_model_dir, docs, tmp_path):  # noqa: F811
    options = ["--store", str(tmp_path / "store"), "--blob-url", s3_blob_url, "--model", str(tiny_model_dir)]
    indexed = invoke(*options, "index", "--ray", str(docs))
    assert indexed.exit_code == 0, indexed.output
    assert "2 indexed, 0 already stored, 0 failed" in indexed.output
    assert len(objects(s3_blob_url)) == 3 and not (tmp_path / "store" / "blobs").exists()
    checked = invoke(*options, "verify")
    assert checked.exit_code == 0 and "2 cache(s)" in checked.stdout, checked.output
    answer = invoke(*options, "ask", QUESTION, "--max-tokens", "4")
    assert answer.exit_code == 0 and "harbour.txt" in answer.stderr, answer.output


def test_clear_errors(s3_server, s3_blob_url, tiny_model_dir, docs, tmp_path, monkeypatch):  # noqa: F811
    store = ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir)]
    for url in ("ftp://host/caches", "http://host/caches"):
        bad = invoke(*store, "--blob-url", url, "ls")
        assert bad.exit_code == 1 and "not supported" in last_line(bad) and "s3://bucket/prefix" in last_line(bad)
    nobucket = invoke(*store, "--blob-url", "s3://", "ls")
    assert nobucket.exit_code == 1 and "names no bucket" in last_line(nobucket)

    # Refused credentials: the first write fails, naming the variables obstore reads; indexing stops there
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    refused = invoke(*store, "--blob-url", s3_blob_url, "index", str(docs))
    assert refused.exit_code == 1, refused.output
    assert "refused" in last_line(refused) and "AWS_SECRET_ACCESS_KEY" in last_line(refused)
    assert "harbour.txt" not in invoke(*store, "--blob-url", s3_blob_url, "ls").stdout  # no row without a blob
    # No credentials at all: obstore falls back to the instance metadata service (a closed port here)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_METADATA_ENDPOINT", "http://127.0.0.1:1")
    missing = invoke(*store, "--blob-url", s3_blob_url, "index", str(docs / "harbour.txt"))
    assert missing.exit_code == 1 and "no credentials for" in last_line(missing), missing.output
    assert "AWS_ACCESS_KEY_ID" in last_line(missing)

    # Without obstore: the extra to install
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "obstore" else real_find_spec(name, *a))
    extra = invoke(*store, "--blob-url", s3_blob_url, "ls")
    assert extra.exit_code == 1 and "kvzip-rag[s3]" in last_line(extra)
