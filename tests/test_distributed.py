"""Distributed indexing on a real local Ray cluster (2 worker CPUs) with a tiny random-weight model.

One job indexes a few documents while one worker is killed mid-compression (its document is retried on a fresh
worker); the store must then hold every document with loadable caches equal to in-process compression, no row
without its blob, and a second run must skip everything."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import kvzip_rag
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.store import CacheStore

from conftest import build_tiny
from test_cli import tiny_model_dir  # noqa: F401  (fixture: a tiny model saved as a folder)
from test_store import HARBOUR, ORCHARD

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kvzip-rag[ray]')")
from kvzip_rag.store.distributed import index_documents, init_ray  # noqa: E402

DOCS = [(f"doc-{i}", f"{text} Note number {i}: the {word} ledger is kept in room {100 + i}.")
        for i, (text, word) in enumerate([(HARBOUR, "blue"), (ORCHARD, "green"), (HARBOUR, "red"),
                                          (ORCHARD, "amber"), (HARBOUR, "grey"), (ORCHARD, "white")])]


class TinyModel:
    """Builds the tiny test model inside a worker; with ``die_marker``, the first worker to run its
    ``die_on_call``-th forward pass creates the marker and exits hard (as a killed or crashed process would)."""

    def __init__(self, die_marker: str | None = None, die_on_call: int = 0):
        self.die_marker, self.die_on_call = die_marker, die_on_call

    def __call__(self):
        from transformers import AutoTokenizer

        from kvzip_rag.models import DEFAULT_MODEL, resolve_model_path

        model = build_tiny("llama", AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_MODEL)[1]))
        if self.die_marker:
            calls = [0]

            def maybe_die(_module, _args):
                calls[0] += 1
                if calls[0] == self.die_on_call:
                    try:  # O_EXCL: exactly one worker of the cluster wins the right to die
                        os.close(os.open(self.die_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    except FileExistsError:
                        return
                    os._exit(1)

            model.model.register_forward_pre_hook(maybe_die)
        return model


@pytest.fixture(scope="module")
def ray_cluster(default_model):  # the converted SmolLM2 folder (tokenizer) must exist before workers start
    if ray.is_initialized():
        ray.shutdown()
    tests = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    init_ray(num_cpus=2, object_store_memory=100 * 2**20, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield
    finally:
        ray.shutdown()


def test_local_cluster_workers_keep_our_priority(ray_cluster):
    """Ray's default worker niceness (15) made indexing on Ray yield to every other process on a shared machine."""

    @ray.remote
    def niceness() -> int:
        return os.nice(0)

    assert ray.get(niceness.remote()) == os.nice(0)


def test_ray_index_retries_dead_worker_and_skips_stored(ray_cluster, tmp_path, tiny_llama):
    marker = tmp_path / "died"
    report = index_documents(DOCS, store_path=tmp_path / "store", model=TinyModel(str(marker), die_on_call=3),
                             workers=2, ratio=0.4, progress=False)
    assert marker.exists(), "the fault was never injected"
    assert report.ok and report.retries == 1 and report.workers == 2
    assert sorted(report.indexed) == [d for d, _ in DOCS] and report.skipped == []

    with CacheStore(tmp_path / "store") as store:
        assert len(store) == len(DOCS) and store.verify().ok  # no row points at a missing or partial blob
        for doc_id, text in DOCS[:2]:
            assert store.get_document(doc_id).text == text
            loaded = store.load_cache(doc_id, tiny_llama)  # same weights: the fingerprint check passes
            expected = kvzip_rag.compress(tiny_llama, text, ratio=0.4)
            assert all((a.keys == b.keys).all() and (a.values == b.values).all()
                       for a, b in zip(loaded.layers, expected.layers))
        store.gc(min_age_s=0)  # blobs the killed worker wrote without rows, if any
        assert store.gc(min_age_s=0, dry_run=True).removed == [] and store.verify().ok
        referenced = {c.blob_path for d in store.list_documents() for c in d.caches}
        assert all((store.blob_dir / name).is_file() for name in referenced)

    again = index_documents(DOCS, store_path=tmp_path / "store", model=TinyModel(), workers=1, ratio=0.4,
                            progress=False)
    assert sorted(again.skipped) == [d for d, _ in DOCS] and again.indexed == [] and again.ok


def test_cli_index_on_ray(ray_cluster, tmp_path, tiny_model_dir):
    """``kvzip-rag index --ray``: every worker loads the model folder; the document lands, then is skipped."""
    from typer.testing import CliRunner

    from kvzip_rag.cli import app

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "harbour.txt").write_text(HARBOUR)
    args = ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir), "index", "--ray",
            str(tmp_path / "docs")]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "1 indexed, 0 already stored, 0 failed" in first.output
    with CacheStore(tmp_path / "store") as store:
        assert [d.id for d in store.list_documents()] == ["harbour.txt"] and store.verify().ok
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0 and "0 indexed, 1 already stored" in second.output, second.output


def test_cli_index_on_ray_with_kv_bits(ray_cluster, tmp_path, tiny_model_dir):
    """``--kv-bits`` reaches the Ray workers: the stored cache is the one ``compress(kv_bits=4)`` gives; the same
    bits again are skipped, other bits index the document again (a segment keeps one cache per ratio)."""
    from typer.testing import CliRunner

    from kvzip_rag.cli import app
    from kvzip_rag.models import load_model

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "harbour.txt").write_text(HARBOUR)
    args = ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir), "index", "--ray"]

    def run(bits: int) -> str:
        result = CliRunner().invoke(app, [*args, "--kv-bits", str(bits), str(tmp_path / "docs")])
        assert result.exit_code == 0, result.output
        return result.output

    assert "1 indexed, 0 already stored" in run(4)
    model = load_model(str(tiny_model_dir), device="cpu")
    with CacheStore(tmp_path / "store") as store:
        assert [c.kv_bits for c in store.get_document("harbour.txt").caches] == [4]
        loaded = store.load_cache("harbour.txt", model)
        expected = kvzip_rag.compress(model, HARBOUR, ratio=0.3, kv_bits=4)
        assert loaded.info.kv_bits == 4
        assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                   for a, b in zip(loaded.layers, expected.layers))
    assert "0 indexed, 1 already stored" in run(4)
    assert "1 indexed, 0 already stored" in run(8)
    with CacheStore(tmp_path / "store") as store:
        assert [c.kv_bits for c in store.get_document("harbour.txt").caches] == [8]


def test_cli_index_on_ray_with_matmul(ray_cluster, tmp_path, tiny_model_dir):
    """``--matmul bfloat16`` reaches the Ray workers: the stored cache is the one a bfloat16 load compresses
    here, not the float32 one."""
    from typer.testing import CliRunner

    from kvzip_rag.cli import app
    from kvzip_rag.matmul import bfloat16_matmul_supported
    from kvzip_rag.models import load_model

    if not bfloat16_matmul_supported():
        pytest.skip("this CPU or torch build has no oneDNN bfloat16 matrix instructions")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "harbour.txt").write_text(HARBOUR)
    result = CliRunner().invoke(app, ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir), "index",
                                      "--ray", "--matmul", "bfloat16", str(tmp_path / "docs")])
    assert result.exit_code == 0 and "1 indexed" in result.output, result.output
    previous = torch.get_num_threads()
    try:  # one thread, as each worker (a float32 last bit can round to another bfloat16)
        models = {m: load_model(str(tiny_model_dir), device="cpu", threads=1, matmul=m)
                  for m in ("float32", "bfloat16")}
        with CacheStore(tmp_path / "store") as store:
            loaded = store.load_cache("harbour.txt", models["float32"])
        same = {m: all(torch.equal(a.keys, b.keys) for a, b in zip(
            loaded.layers, kvzip_rag.compress(model, HARBOUR, ratio=0.3).layers)) for m, model in models.items()}
    finally:
        torch.set_num_threads(previous)
    assert same == {"bfloat16": True, "float32": False}


def test_ray_index_refuses_unknown_kv_bits_before_starting(tmp_path):
    with pytest.raises(InvalidArgumentError, match="kv_bits must be one of 16, 8, 4, 3, 2 "):
        index_documents(DOCS, store_path=tmp_path / "store", model="unused", kv_bits=5, progress=False)
