"""The store's guarantees under attack (issue 10) and the shared template prefix (issue 16): each test reproduces a
defect of the old store (recycled ids, swapped blobs, raw errors on full or read-only disks, hostile input)."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

import kvzip_rag
from kvzip_rag.cache import join_prefix, split_prefix
from kvzip_rag.errors import (
    CorruptBlobError,
    DocumentNotFoundError,
    InvalidArgumentError,
    StoreError,
    StoreFullError,
)
from kvzip_rag.store import CacheStore

from conftest import build_tiny

HARBOUR = ("The harbour of Velmora was built in 1731 by the engineer Ansel Brask. Ferries leave for the island of "
           "Tessin every morning at seven. The lighthouse is painted red and white.")
ORCHARD = ("The orchard on Mill Hill grows forty-two varieties of apple. Cider is pressed every October in a barn "
           "beside the river.")


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


def same_layers(a, b) -> None:
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        for name in ("keys", "values", "offsets", "positions", "scores"):
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and torch.equal(tx, ty), name
        assert (x.compressed, x.sliding_window, x.base_length) == (y.compressed, y.sliding_window, y.base_length)


def logits(model, cache, question: str = "Who built the harbour?") -> torch.Tensor:
    ids = model.encode(model.template.question_text(question))
    cache.rewind()
    with torch.inference_mode():
        out = model.forward(ids, cache)
    cache.rewind()
    return out.logits[0, -1]


# ------------------------------------------------------------------------------------------ the shared prefix


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding layers keep the prefix in their window
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_split_and_join_prefix_reproduce_the_cache(family, ratio, smol_tokenizer):
    model = build_tiny(family, smol_tokenizer)
    cache = kvzip_rag.compress(model, HARBOUR * 3, ratio=ratio)
    prefix, body = split_prefix(cache)
    assert prefix.layers == tuple(i for i, layer in enumerate(cache.layers) if layer.compressed)
    assert all(layer.counts.sum() < full.counts.sum() for layer, full in zip(body, cache.layers) if full.compressed)
    joined = join_prefix(prefix, body, cache.info)
    same_layers(cache, joined)
    assert torch.equal(logits(model, cache), logits(model, joined))


def test_store_keeps_one_prefix_per_model_and_loads_exactly(tmp_path, tiny_llama, smol_tokenizer):
    other = build_tiny("gemma3", smol_tokenizer)
    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=1.0)
        store.add_document(tiny_llama, ORCHARD, doc_id="b", ratio=0.3)
        store.add_document(other, ORCHARD, doc_id="c", ratio=0.5)
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM prefixes").scalar() == 2
        # The first document's own prefix is the stored one: at ratio 1.0 the loaded cache is bit-identical.
        memory = kvzip_rag.compress(tiny_llama, HARBOUR, ratio=1.0)
        loaded = store.load_cache("a", tiny_llama)
        same_layers(memory, loaded)
        assert torch.equal(logits(tiny_llama, memory), logits(tiny_llama, loaded))
        # Later documents join the stored prefix: their own agrees to float rounding.
        memory = kvzip_rag.compress(other, ORCHARD, ratio=0.5)
        assert torch.allclose(logits(other, memory), logits(other, store.load_cache("c", other)), atol=1e-4)
        assert store.load_cache("b", tiny_llama, ratio=0.2).info.ratio == 0.2


def test_bytes_at_ratio_03_on_a_200_token_document(tmp_path, tiny_llama):
    words = (HARBOUR + " " + ORCHARD).split()
    text = " ".join(words * 6)
    text = tiny_llama.tokenizer.decode(tiny_llama.encode(text)[:200])
    with CacheStore(tmp_path / "s") as store:
        record = store.add_document(tiny_llama, text, doc_id="d", ratio=0.3)
    cache = record.caches[0]
    assert 195 <= cache.context_length <= 205 and cache.prefix_length > 0
    print(f"\nstored bytes at 0.3: {cache.kv_nbytes} of {cache.full_nbytes} = {cache.kept_fraction:.3f}x "
          f"(shared prefix {cache.prefix_nbytes} bytes, once per model)")
    assert cache.kept_fraction <= 0.31
    assert (cache.kv_nbytes + cache.prefix_nbytes) / cache.full_nbytes > 0.35  # what it was with the prefix inside


def test_an_old_store_is_refused_with_how_to_rebuild(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    with sqlite3.connect(folder / "index.sqlite") as db:  # the schema-1 tables (no store_info)
        db.execute("CREATE TABLE documents (id VARCHAR(255) PRIMARY KEY, content_hash VARCHAR(64), text TEXT)")
        db.execute("CREATE TABLE caches (id INTEGER PRIMARY KEY, blob_path VARCHAR(255))")
    with pytest.raises(StoreError, match="older kvzip-rag.*Rebuild.*index"):
        CacheStore(folder)


# ------------------------------------------------------------------------------------------ identity (issue 10)


def test_recycled_ids_never_serve_another_document(tmp_path, tiny_llama):
    """Two CacheStore objects on one file: A caches X in memory, B replaces X by Y (which used to get X's id)."""
    a, b = CacheStore(tmp_path / "s"), CacheStore(tmp_path / "s")
    try:
        a.add_document(tiny_llama, HARBOUR, doc_id="x", ratio=0.5)
        x = a.load_cache("x", tiny_llama)
        old_id = a.caches_for("x")[0].id
        b.delete_document("x")
        b.add_document(tiny_llama, ORCHARD, doc_id="y", ratio=0.5)
        assert b.caches_for("y")[0].id != old_id  # ids are never reused
        y = a.load_cache("y", tiny_llama)
        assert a.last_read_nbytes > 0  # read from disk, not X from memory
        assert y.info.input_ids == kvzip_rag.compress(tiny_llama, ORCHARD, ratio=0.5).info.input_ids
        assert y.info.input_ids != x.info.input_ids
        # force=True re-add under the same id, same object: the new text is served.
        a.add_document(tiny_llama, HARBOUR + " Extra.", doc_id="y", ratio=0.5, force=True)
        assert a.load_cache("y", tiny_llama).info.input_ids[-3:] != y.info.input_ids[-3:]
        b.add_document(tiny_llama, ORCHARD, doc_id="y", ratio=0.5, force=True)  # through the other object
        assert a.load_cache("y", tiny_llama).info.input_ids == y.info.input_ids
    finally:
        a.close()
        b.close()


def test_a_valid_blob_under_the_wrong_row_is_refused(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s", cache_bytes=0) as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
        store.add_document(tiny_llama, ORCHARD, doc_id="b", ratio=0.5)
        pa = store.blob_dir / store.caches_for("a")[0].blob_path
        pb = store.blob_dir / store.caches_for("b")[0].blob_path
        data_a, data_b = pa.read_bytes(), pb.read_bytes()
        pa.write_bytes(data_b)
        pb.write_bytes(data_a)
        with pytest.raises(CorruptBlobError, match="document 'a' segment 0.*document 'b' segment 0"):
            store.load_cache("a", tiny_llama)
        with pytest.raises(CorruptBlobError, match="document 'b'.*document 'a'"):
            store.load_cache("b", tiny_llama, ratio=0.2)
        assert sorted(p.document_id for p in store.verify().problems) == ["a", "b"]


def test_missing_documents_raise_document_not_found(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
        for call in (lambda: store.load_cache("nope", tiny_llama), lambda: store.recompress("nope", tiny_llama),
                     lambda: store.load_cache("a", tiny_llama, segment=3), lambda: store.load_cache(10**6, tiny_llama)):
            with pytest.raises(DocumentNotFoundError) as caught:
                call()
            assert isinstance(caught.value, KeyError)
        assert store.get_document("nope") is None and store.delete_document("nope") is False


# ------------------------------------------------------------------------------------------ hostile input


def test_pathological_text_fails_fast_and_writes_nothing(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        start = time.perf_counter()
        with pytest.raises(InvalidArgumentError, match="without a space"):
            store.add_document(tiny_llama, "x" * 5_000_000, doc_id="blob")
        assert time.perf_counter() - start < 5
        store_small = CacheStore(tmp_path / "s", max_segments=2)
        with pytest.raises(InvalidArgumentError, match="3 segments.*limit of 2"):
            store_small.add_document(tiny_llama, HARBOUR, doc_id="long", max_segment_tokens=20)
        store_small.close()
        assert len(store) == 0 and not list(store.blob_dir.rglob("*.safetensors"))
        events = []
        store.add_document(tiny_llama, HARBOUR, doc_id="h", max_segment_tokens=20,
                           progress=lambda stage, done, total: events.append((stage, done, total)))
        segments = [e for e in events if e[0] == "segment"]
        assert segments[0] == ("segment", 0, 3) and segments[-1] == ("segment", 3, 3) and len(segments) == 4


@pytest.mark.parametrize("bad", [
    dict(doc_id="bad\udc80id"), dict(text=HARBOUR + "\ud800"), dict(metadata={"k": "v\udfff"}),
    dict(metadata={"k\ud800": 1}), dict(metadata={"deep": nested(5000)}),
    dict(metadata={"n": 10**30}),
])
def test_hostile_arguments_are_invalid_argument_errors(bad, tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        args = dict(doc_id="d", text=HARBOUR, metadata=None) | bad
        with pytest.raises(InvalidArgumentError):
            store.add_document(tiny_llama, args["text"], doc_id=args["doc_id"], metadata=args["metadata"])
        assert len(store) == 0


def test_hostile_queries_and_filters_are_invalid_argument_errors(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="d", metadata={"n": 3}, ratio=0.5)
        for call in (lambda: store.search("harbour \udc80"), lambda: store.search("harbour", metadata={"n": 10**30}),
                     lambda: store.list_documents(metadata={"n": -(10**40)}),
                     lambda: store.search("harbour", metadata={"x": nested(3000)})):
            with pytest.raises(InvalidArgumentError):
                call()
        assert [h.document_id for h in store.search("harbour", metadata={"n": 3})] == ["d"]


# ------------------------------------------------------------------------------------------ full and read-only disks


def _mount(tmp_path: Path, size: str):
    """A real tmpfs of ``size`` (root only): a disk that really fills up."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    yield from _mount(tmp_path, "12m")


@pytest.fixture
def tiny_disk(tmp_path):
    """Under 8 MiB: the old store made no reserve file here, so a delete on the full disk failed."""
    yield from _mount(tmp_path, "3m")


def _fill(folder: Path, leave: int = 0) -> Path:
    """A file that takes all free space on ``folder``'s disk but ``leave`` bytes."""
    filler = folder / "filler.bin"
    free = shutil.disk_usage(folder).free - leave
    with filler.open("ab") as handle:
        try:
            handle.write(b"\0" * max(free, 0))
            handle.flush()
        except OSError:
            pass
    return filler


def test_full_disk_raises_store_full_at_every_level_and_loses_nothing(small_disk, tiny_llama):
    store = CacheStore(small_disk / "s")
    store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    outcomes = []
    for i, leave in enumerate([0, 1024, 4096, 8192, 16384, 32768, 65536, 131072, 262144]):
        filler = _fill(small_disk, leave)
        try:
            store.add_document(tiny_llama, ORCHARD + f" Copy {i}.", doc_id=f"b{i}", ratio=0.5)
            outcomes.append("stored")
        except StoreFullError as error:  # never a raw OSError or SQLAlchemy error
            assert str(small_disk) in str(error) and "full" in str(error) and error.errno == 28
            assert store.get_document(f"b{i}") is None
            outcomes.append("full")
        filler.unlink()
        assert store.verify().ok and store.gc(now=True).removed == []  # nothing half-written, no orphan blob
    assert "full" in outcomes, outcomes
    assert store.search("harbour")[0].document_id == "a"
    store.close()


def orphan_blob(store: CacheStore, name: str, size: int = 10) -> Path:
    """A blob file that no row names, as a crashed or concurrent add leaves it."""
    orphan = store.blob_dir / name[:2] / f"{name}.safetensors"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"x" * size)
    return orphan


def test_full_disk_rm_and_gc_free_space_and_the_store_still_opens(small_disk, tiny_llama):
    store = CacheStore(small_disk / "s")
    store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    store.add_document(tiny_llama, ORCHARD, doc_id="b", ratio=0.5)
    orphan_blob(store, "ab0123", 4096)
    filler = _fill(small_disk, 0)
    assert shutil.disk_usage(small_disk).free < 4096
    assert store.delete_document("a") is True  # rm works on a full disk (the store's reserve file is given back)
    assert store.get_document("a") is None and store.verify().ok
    _fill(small_disk, 0)
    assert store.gc(now=True).removed == ["ab/ab0123.safetensors"]  # and so does gc
    store.close()
    _fill(small_disk, 0)
    with CacheStore(small_disk / "s") as reopened:  # opening a store on a full disk works
        assert reopened.search("orchard")[0].document_id == "b"
        assert reopened.load_cache("b", tiny_llama).info.context_length > 0
        filler.unlink()
        reopened.add_document(tiny_llama, HARBOUR, doc_id="c", ratio=0.5)
        assert reopened.verify().ok and [d.id for d in reopened.list_documents()] == ["b", "c"]


def test_full_small_disk_still_deletes(tiny_disk, tiny_llama):
    store = CacheStore(tiny_disk / "s")
    assert store.reserve.path.stat().st_size > 0  # sized to the small disk, not skipped
    store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    store.add_document(tiny_llama, ORCHARD, doc_id="b", ratio=0.5)
    _fill(tiny_disk, 0)
    assert shutil.disk_usage(tiny_disk).free < 4096
    assert store.delete_document("a") is True
    assert store.get_document("a") is None and store.verify().ok
    store.close()


def test_read_only_store_can_be_searched_and_loaded(small_disk, tiny_llama):
    with CacheStore(small_disk / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    with CacheStore(small_disk / "s") as store:
        assert store.read_only
        assert store.search("harbour")[0].document_id == "a"
        assert store.load_cache("a", tiny_llama).info.context_length > 0
        assert store.gc(dry_run=True).removed == []
        with pytest.raises(StoreError, match="read-only"):
            store.add_document(tiny_llama, ORCHARD, doc_id="b")
        with pytest.raises(StoreError, match="read-only"):
            store.delete_document("a")


def test_explicitly_read_only_store(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    with CacheStore(tmp_path / "s", read_only=True) as store:
        assert store.load_cache("a", tiny_llama).info.context_length > 0
        with pytest.raises(StoreError, match="read-only"):
            store.add_document(tiny_llama, ORCHARD, doc_id="b")
        with pytest.raises(StoreError, match="read-only"):
            store.gc(now=True)


def test_gc_now_removes_young_orphans(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
        orphan_blob(store, "ab0123")
        assert store.gc().removed == []  # younger than the 600 s default: may belong to an add in progress
        assert store.gc(now=True).removed == ["ab/ab0123.safetensors"] and store.verify().ok


def test_cli_gc_now(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from kvzip_rag.cli import app

    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
        orphan = orphan_blob(store, "cd0123")
    runner = CliRunner()
    kept = runner.invoke(app, ["--store", str(tmp_path / "s"), "gc"])
    assert kept.exit_code == 0 and "removed 0" in kept.stdout and orphan.exists()
    removed = runner.invoke(app, ["--store", str(tmp_path / "s"), "gc", "--now"])
    assert removed.exit_code == 0 and "removed 1" in removed.stdout and not orphan.exists()


def test_indexer_on_its_own_and_a_corrupt_shared_prefix_is_reported(tmp_path, tiny_llama):
    from kvzip_rag.store import Indexer

    with CacheStore(tmp_path / "s", cache_bytes=0) as store:
        indexer = Indexer(tiny_llama, store)
        indexer.add(HARBOUR, doc_id="a", ratio=0.5)
        indexer.add(ORCHARD, doc_id="b", ratio=0.5)
        assert store.load_cache("a", tiny_llama).info.context_length > 0 and store.verify().ok
        with store.engine.connect() as connection:
            prefix = connection.exec_driver_sql("SELECT blob_path FROM prefixes").scalar()
        path = store.blob_dir / prefix
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x10
        path.write_bytes(bytes(data))
        assert sorted(p.document_id for p in store.verify().problems) == ["a", "b"]
    with CacheStore(tmp_path / "s") as fresh:  # a new process reads the prefix from disk: refused, not served
        with pytest.raises(CorruptBlobError, match="shared prefix"):
            fresh.load_cache("b", tiny_llama)


class MemoryBlobs:
    """A BlobBackend in a dict: what an object-store backend implements (ranges, whole-object writes)."""

    class _Range:
        def __init__(self, data: bytes):
            self.data, self.size = data, len(data)

        def read(self, start: int, length: int) -> bytes:
            return self.data[start : start + length]

        def close(self) -> None:
            pass

    def __init__(self):
        self.objects: dict[str, tuple[bytes, float]] = {}
        self.ranges = 0

    def open(self, name: str):
        if name not in self.objects:
            raise FileNotFoundError(name)
        self.ranges += 1
        return self._Range(self.objects[name][0])

    def write(self, name: str, data: bytes) -> None:
        self.objects[name] = (bytes(data), time.time())

    def delete(self, name: str) -> None:
        self.objects.pop(name, None)

    def entries(self):
        return [(name, len(data), mtime) for name, (data, mtime) in sorted(self.objects.items())]

    def describe(self, name: str) -> str:
        return f"memory://{name}"


def test_the_store_runs_on_any_blob_backend(tmp_path, tiny_llama):
    blobs = MemoryBlobs()
    with CacheStore(url=f"sqlite:///{tmp_path / 'index.sqlite'}", blobs=blobs) as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
        store.add_document(tiny_llama, ORCHARD, doc_id="b", ratio=0.5)
        assert len(blobs.objects) == 3 and not (tmp_path / "blobs").exists()  # two documents + one prefix
        memory = kvzip_rag.compress(tiny_llama, HARBOUR, ratio=0.5)
        same_layers(memory.at_ratio(0.2), store.load_cache("a", tiny_llama, ratio=0.2))
        assert store.verify().ok
        blobs.write("ff/ff00.safetensors", b"orphan")
        assert store.gc(now=True).removed == ["ff/ff00.safetensors"]
        assert store.delete_document("a") and len(blobs.objects) == 2
