"""CacheStore: lifecycle, crash safety, concurrency, hostile ids and metadata, routing on SQuAD."""

from __future__ import annotations

import multiprocessing
import os
import random
import sqlite3
from pathlib import Path

import pytest
import torch

import kvzip_rag
from kvzip_rag.errors import CorruptBlobError, EmptyDocumentError, InvalidArgumentError, ModelMismatchError
from kvzip_rag.store import CacheStore, SearchHit
from kvzip_rag.store.ranking import search_segments

from conftest import build_tiny

HARBOUR = (
    "The harbour of Velmora was built in 1731 by the engineer Ansel Brask. It has two breakwaters, the northern one "
    "made of granite and the southern one of basalt.\n\nFerries leave for the island of Tessin every morning at "
    "seven. The lighthouse at the end of the northern breakwater is painted red and white, and its lamp can be seen "
    "from eighteen nautical miles away.\n\nEvery August the town holds a regatta in which fishing boats race around "
    "the harbour, and the winner receives a silver anchor."
)
ORCHARD = (
    "The orchard on Mill Hill grows forty-two varieties of apple. The oldest tree, a Bramley planted in 1899, still "
    "bears fruit.\n\nCider is pressed every October in a barn beside the river, and the press is driven by a "
    "waterwheel restored in 1987."
)


def blob_files(store: CacheStore) -> set[str]:
    return {p.relative_to(store.blob_dir).as_posix() for p in store.blob_dir.rglob("*") if p.is_file()}


def row_paths(store: CacheStore) -> set[str]:
    """Blobs the rows point at: every cache's, and the shared template prefix of each model that has caches."""
    import sqlalchemy as sa

    from kvzip_rag.store.schema import Prefix

    with store.engine.connect() as connection:
        prefixes = set(connection.execute(sa.select(Prefix.blob_path)).scalars())
    return {c.blob_path for d in store.list_documents() for c in d.caches} | prefixes


@pytest.fixture
def store(tmp_path):
    with CacheStore(tmp_path / "store") as s:
        yield s


# ------------------------------------------------------------------------------------------------ round trip


def test_loaded_cache_reproduces_the_in_memory_logits(store, tiny_llama):
    record = store.add_document(tiny_llama, HARBOUR, doc_id="harbour", ratio=0.4)
    assert len(record.segments) == 1 and len(record.caches) == 1
    memory = kvzip_rag.compress(tiny_llama, HARBOUR, ratio=0.4)
    loaded = store.load_cache("harbour", tiny_llama)
    ids = tiny_llama.encode(tiny_llama.template.question_text("When do ferries leave?"))
    with torch.inference_mode():
        a = tiny_llama.forward(ids, memory)
        b = tiny_llama.forward(ids, loaded)
    assert torch.equal(a.logits, b.logits)
    loaded.rewind()
    assert kvzip_rag.answer(tiny_llama, loaded, "When do ferries leave?", max_new_tokens=8).token_ids == \
        kvzip_rag.answer(tiny_llama, memory, "When do ferries leave?", max_new_tokens=8).token_ids
    # The template prefix is stored once per model and template: a document's own bytes exclude it.
    cache = record.caches[0]
    assert cache.kv_nbytes + cache.prefix_nbytes == memory.nbytes and cache.full_nbytes == memory.full_nbytes


def test_lower_ratio_load_equals_at_ratio_and_reads_fewer_bytes(store, tiny_llama):
    text = " ".join([HARBOUR.replace("\n\n", " ")] * 6)
    store.add_document(tiny_llama, text, doc_id="long", ratio=0.8)
    memory = kvzip_rag.compress(tiny_llama, text, ratio=0.8)
    store.load_cache("long", tiny_llama)
    full_bytes = store.last_read_nbytes
    low = store.load_cache("long", tiny_llama, ratio=0.2)
    low_bytes = store.last_read_nbytes
    expected = memory.at_ratio(0.2)
    assert low.info == expected.info
    for a, b in zip(low.layers, expected.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert torch.equal(a.offsets, b.offsets) and torch.equal(a.positions, b.positions)
    assert low_bytes < 0.6 * full_bytes, (low_bytes, full_bytes)
    print(f"\nbytes read: ratio 0.8 -> {full_bytes}, ratio 0.2 -> {low_bytes}")
    with pytest.raises(InvalidArgumentError, match="recompress"):
        store.load_cache("long", tiny_llama, ratio=0.9)


def test_lru_serves_repeats_from_memory_with_fresh_tails(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s", cache_bytes=10 << 20) as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.5)
        first = store.load_cache("h", tiny_llama)
        assert store.last_read_nbytes > 0
        chat = kvzip_rag.Conversation(tiny_llama, first)
        chat.ask("Who built the harbour?", max_new_tokens=3)
        assert first.tail_length > 0
        second = store.load_cache("h", tiny_llama)
        assert store.last_read_nbytes == 0  # from memory
        assert second is not first and second.tail_length == 0 and first.tail_length > 0
        assert torch.equal(second.layers[0].keys, first.layers[0].keys)
    with CacheStore(tmp_path / "s", cache_bytes=0) as store:  # no memory budget: always from disk
        store.load_cache("h", tiny_llama)
        store.load_cache("h", tiny_llama)
        assert store.last_read_nbytes > 0


# ------------------------------------------------------------------------------------------------ lifecycle


def test_readding_identical_content_is_a_noop(store, tiny_llama):
    first = store.add_document(tiny_llama, HARBOUR, doc_id="h", metadata={"v": 1}, ratio=0.3)
    files = blob_files(store)
    again = store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3)
    assert again.caches == first.caches and blob_files(store) == files
    assert again.metadata == {"v": 1}
    # Without an id, the id is the content hash: adding twice stores once.
    a = store.add_document(tiny_llama, ORCHARD, ratio=0.3)
    b = store.add_document(tiny_llama, ORCHARD, ratio=0.3)
    assert a.id == b.id and a.caches == b.caches and len(store) == 2
    # Another ratio of the same content adds caches, keeps the first ones.
    more = store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.6)
    assert {c.ratio for c in more.caches} == {0.3, 0.6}
    # force recompresses (new blob, old one removed).
    forced = store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3, force=True)
    old = {c.blob_path for c in first.caches}
    assert not old & {c.blob_path for c in forced.caches}
    assert not old & blob_files(store)
    # Other text under an existing id needs force.
    with pytest.raises(InvalidArgumentError, match="force=True"):
        store.add_document(tiny_llama, ORCHARD, doc_id="h")
    replaced = store.add_document(tiny_llama, ORCHARD, doc_id="h", force=True)
    assert replaced.text == ORCHARD and blob_files(store) == row_paths(store)


def test_delete_removes_rows_and_blobs(store, tiny_llama):
    store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3)
    store.add_document(tiny_llama, ORCHARD, doc_id="o", ratio=0.3)
    assert store.search("ferries Tessin", k=1)[0].document_id == "h"
    assert store.delete_document("h") is True
    assert store.get_document("h") is None and "h" not in store
    assert all(hit.document_id == "o" for hit in store.search("ferries Tessin harbour orchard", k=5))
    assert store.caches_for("h") == [] and blob_files(store) == row_paths(store)
    assert store.delete_document("h") is False
    with pytest.raises(KeyError):
        store.load_cache("h", tiny_llama)


def test_empty_document_writes_nothing(store, tiny_llama):
    for text in ("", "  \n\t "):
        with pytest.raises(EmptyDocumentError):
            store.add_document(tiny_llama, text, doc_id="empty")
    assert len(store) == 0 and blob_files(store) == set()


def test_long_documents_are_segmented_and_each_segment_routes(store, tiny_llama):
    text = "\n\n".join([HARBOUR, ORCHARD] * 3)
    record = store.add_document(tiny_llama, text, doc_id="both", ratio=0.3, max_segment_tokens=90)
    assert len(record.segments) > 3 and len(record.caches) == len(record.segments)
    assert all(s.token_count <= 90 for s in record.segments)
    assert all(record.text[s.char_start : s.char_end] == s.text for s in record.segments)
    hit = store.search("Bramley apple tree planted", k=1)[0]
    assert "Bramley" in hit.text
    cache = store.load_cache(hit, tiny_llama)
    assert cache.info.context_length == record.segments[hit.segment_index].token_count
    assert store.caches_for("both", segment=hit.segment_index)[0].segment_id == hit.segment_id


def test_recompress_and_models(store, tiny_llama, smol_tokenizer):
    store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3)
    other = build_tiny("llama", smol_tokenizer, seed=7)
    with pytest.raises(ModelMismatchError, match="recompress"):
        store.load_cache("h", other)
    store.recompress("h", other, ratio=0.5)
    assert len(store.caches_for("h")) == 2 and len(store.caches_for("h", other)) == 1
    assert store.load_cache("h", other).info.model_fingerprint == other.fingerprint
    assert store.load_cache("h", tiny_llama).info.model_fingerprint == tiny_llama.fingerprint
    store.recompress("h", tiny_llama, ratio=0.8)
    assert sorted(c.ratio for c in store.caches_for("h", tiny_llama)) == [0.3, 0.8]
    assert store.load_cache("h", tiny_llama, ratio=0.2).info.ratio == 0.2  # served from the 0.3 blob
    assert store.load_cache("h", tiny_llama).info.ratio == 0.8  # no ratio: the best stored one
    store.recompress("h", tiny_llama, ratio=0.6, replace=True)
    assert [c.ratio for c in store.caches_for("h", tiny_llama)] == [0.6]
    assert len(store.caches_for("h", other)) == 1  # other models' caches are kept
    assert blob_files(store) == row_paths(store)
    with pytest.raises(KeyError):
        store.recompress("nope", tiny_llama)


# ------------------------------------------------------------------------------------------------ integrity


def test_corrupted_blobs_are_named_and_reported(tmp_path, tiny_llama):
    with CacheStore(tmp_path / "s") as store:
        store.add_document(tiny_llama, HARBOUR, doc_id="harbour guide", ratio=0.5)
        store.add_document(tiny_llama, ORCHARD, doc_id="orchard", ratio=0.5)
        assert store.verify().ok and store.verify().checked == 2
        path = store.blob_dir / store.caches_for("harbour guide")[0].blob_path
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[:-3], data[:7]):
        path.write_bytes(broken)
        with CacheStore(tmp_path / "s") as store:  # a fresh store: nothing in memory
            with pytest.raises(CorruptBlobError, match="document 'harbour guide' segment 0"):
                store.load_cache("harbour guide", tiny_llama)
            report = store.verify()
            assert [p.document_id for p in report.problems] == ["harbour guide"]
    flipped = bytearray(data)
    flipped[len(data) - 100] ^= 0x10
    path.write_bytes(bytes(flipped))
    with CacheStore(tmp_path / "s") as store:
        with pytest.raises(CorruptBlobError, match="document 'harbour guide'.*checksum"):
            store.load_cache("harbour guide", tiny_llama)
        report = store.verify()
        assert not report.ok and report.problems[0].document_id == "harbour guide"
        assert "harbour guide" in report.problems[0].error
        assert store.load_cache("orchard", tiny_llama).info.context_length > 0  # the rest is fine
        path.unlink()
        assert "missing" in store.verify().problems[0].error
        assert store.gc(min_age_s=0).missing == [store.caches_for("harbour guide")[0].id]


def test_blob_swapped_for_another_models_blob_is_refused(store, tiny_llama, smol_tokenizer):
    other = build_tiny("llama", smol_tokenizer, seed=3)
    store.add_document(tiny_llama, HARBOUR, doc_id="mine", ratio=0.5)
    store.add_document(other, ORCHARD, doc_id="theirs", ratio=0.5)
    mine = store.blob_dir / store.caches_for("mine")[0].blob_path
    theirs = store.blob_dir / store.caches_for("theirs")[0].blob_path
    mine.write_bytes(theirs.read_bytes())
    with pytest.raises(CorruptBlobError, match="document 'mine'.*document 'theirs'"):
        store.load_cache("mine", tiny_llama)
    assert [p.document_id for p in store.verify().problems] == ["mine"]


# ------------------------------------------------------------------------------------------------ hostile input


@pytest.mark.parametrize("call, reason", [
    (lambda s, m: s.search("ferries", k=2, doc_ids=3), "doc_ids is a document id or a list"),
    (lambda s, m: s.search("ferries", k=2, doc_ids=["harbour", ("harbour", 2**63)]), "a document id is a string"),
    (lambda s, m: s.search("ferries", k=2, doc_ids="\ud800"), "lone surrogate"),
    (lambda s, m: s.verify(doc_ids=True), "doc_ids is a document id or a list"),
    (lambda s, m: s.get_document(["harbour"]), "a document id is a non-empty string"),
    (lambda s, m: s.delete_document(3), "a document id is a non-empty string"),
    (lambda s, m: s.load_cache("harbour", m, segment=2**63), "segment must be an integer"),
    (lambda s, m: s.load_cache("harbour", m, segment="0"), "segment must be an integer"),
    (lambda s, m: s.load_cache(2**63, m), "a cache id must be an integer"),
    (lambda s, m: s.load_cache("\ud800", m), "lone surrogate"),
], ids=["search-int", "search-tuple", "search-surrogate", "verify-bool", "get-list", "delete-int", "segment-huge",
        "segment-str", "cache-id-huge", "load-surrogate"])
def test_ids_of_the_wrong_type_or_range_are_one_line_errors(store, tiny_llama, call, reason):
    """Ids and indexes are checked where the store takes them: never a TypeError, OverflowError or SQL error."""
    store.add_document(tiny_llama, HARBOUR, doc_id="harbour", ratio=0.3)
    with pytest.raises(InvalidArgumentError, match=reason) as caught:
        call(store, tiny_llama)
    assert "\n" not in str(caught.value)
    assert [d.id for d in store.list_documents()] == ["harbour"]  # nothing lost


@pytest.mark.parametrize("arguments, reason", [
    ({"path": 3}, "a store folder is a path"), ({"url": "notaurl"}, "not one SQLAlchemy can read"),
    ({"url": b"sqlite://"}, "a database url is a string"), ({"max_segments": 0}, "max_segments must be"),
    ({"cache_bytes": -1}, "cache_bytes must be"), ({"engine_options": "pool_size=3"}, "engine_options is a dict"),
], ids=["path-int", "url-unparsable", "url-bytes", "max-segments-0", "cache-bytes-negative", "engine-options-str"])
def test_a_store_opened_with_wrong_arguments_is_a_one_line_error_and_creates_nothing(tmp_path, arguments, reason):
    arguments = {"path": tmp_path / "s", **arguments} if "url" not in arguments else arguments
    with pytest.raises(InvalidArgumentError, match=reason):
        CacheStore(**arguments)
    assert not (tmp_path / "s").exists()


def test_ids_and_metadata_never_become_paths_or_sql(store, tiny_llama, tmp_path):
    evil_id = "../../etc/passwd"
    evil_meta = {"title": "O'Brien \"quoted\"; DROP TABLE documents; --", 'we"ird\'key': "x'\"y", "n": 3,
                 "flag": True, "path": "../../../tmp/x"}
    record = store.add_document(tiny_llama, HARBOUR, doc_id=evil_id, metadata=evil_meta, ratio=0.3)
    assert record.id == evil_id and record.metadata == evil_meta
    outside = {p for p in tmp_path.rglob("*")} - {p for p in store.path.rglob("*")} - {store.path}
    assert outside == set()  # nothing written beside the store folder
    for relative in blob_files(store):
        assert "passwd" not in relative and ".." not in relative
        assert Path(relative).name.endswith(".safetensors") and len(Path(relative).name) == 32 + 12
    store.add_document(tiny_llama, ORCHARD, doc_id="o", metadata={"title": "plain", "n": "3", "flag": 1})
    assert [d.id for d in store.list_documents(metadata={"title": evil_meta["title"]})] == [evil_id]
    assert [d.id for d in store.list_documents(metadata={'we"ird\'key': "x'\"y"})] == [evil_id]
    assert [d.id for d in store.list_documents(metadata={"n": 3})] == [evil_id]  # JSON types compared exactly
    assert [d.id for d in store.list_documents(metadata={"n": "3"})] == ["o"]
    assert [d.id for d in store.list_documents(metadata={"flag": True})] == [evil_id]
    assert [d.id for d in store.list_documents(limit=1, offset=1)] == ["o"]
    for page in ({"limit": 0}, {"limit": 2**63}, {"offset": -1}, {"offset": 2**63}, {"limit": True}, {"limit": 1.5}):
        with pytest.raises(InvalidArgumentError, match=next(iter(page))):  # one line, never a database error
            store.list_documents(**page)
    assert [h.document_id for h in store.search("ferries", k=3, metadata={"title": evil_meta["title"]})] == [evil_id]
    assert store.search("ferries", k=3, metadata={"title": "nope"}) == []
    assert store.search("ferries", k=3, doc_ids=["o"]) == []
    for query in ['"', "'; DROP TABLE segments; --", "NEAR(ferries seven)", "ferr*", "AND OR NOT", "^ferries",
                  "ferries) OR (1=1", "", "   ", "\x00"]:
        hits = store.search(query, k=3)
        assert all(isinstance(h, SearchHit) for h in hits)
    assert len(store) == 2 and store.get_document(evil_id).text == HARBOUR
    assert store.load_cache(evil_id, tiny_llama).info.context_length > 0
    assert store.delete_document(evil_id) and blob_files(store) == row_paths(store)


def test_portable_search_fallback(store, tiny_llama):
    store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3)
    store.add_document(tiny_llama, ORCHARD, doc_id="o", ratio=0.3)
    with store.read_session() as session:
        ranked = search_segments(session, "Which apple variety was planted in 1899?", 5, method="terms")
        assert ranked and ranked[0][0] == store.get_document("o").segments[0].id
        assert search_segments(session, "100%_ sure \\ '", 5, method="terms") == []


# ------------------------------------------------------------------------------------------------ crashes


def test_failed_writes_leave_no_row_and_no_blob(store, tiny_llama, monkeypatch):
    import kvzip_rag.store.backends as blob

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    with monkeypatch.context() as patch:  # the rename of the blob fails
        patch.setattr(blob.os, "replace", boom)
        with pytest.raises(OSError, match="simulated"):
            store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3)
    assert store.get_document("h") is None and blob_files(store) == set()

    from sqlalchemy.orm import Session

    original_flush = Session.flush

    def failing_flush(self, *args, **kwargs):
        if any(type(o).__name__ == "Document" for o in self.new):
            raise RuntimeError("row insert failed (simulated)")
        return original_flush(self, *args, **kwargs)

    with monkeypatch.context() as patch:  # the row insert fails after the blob was written
        patch.setattr(Session, "flush", failing_flush)
        with pytest.raises(RuntimeError, match="simulated"):
            store.add_document(tiny_llama, HARBOUR + " More.", doc_id="h", ratio=0.3, max_segment_tokens=40)
    # Only the shared template prefix (committed on its own, before the document) stays.
    assert store.get_document("h") is None and blob_files(store) == row_paths(store) and len(row_paths(store)) == 1
    store.add_document(tiny_llama, HARBOUR, doc_id="h", ratio=0.3)
    assert store.verify().ok


def _tokenizer():
    from transformers import AutoTokenizer

    from kvzip_rag.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path(kvzip_rag.DEFAULT_MODEL)[1])


def _crash_worker(store_dir: str, where: str) -> None:
    """Add a 3-segment document and die (os._exit: no cleanup, no rollback code) at ``where``."""
    import kvzip_rag.store.backends as blob
    from sqlalchemy.orm import Session

    model = build_tiny("llama", _tokenizer())
    store = CacheStore(store_dir)
    if where == "rename":  # during the second blob's write: one complete blob and one temp file left
        original, calls = os.replace, []

        def replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                os._exit(3)
            return original(src, dst)

        blob.os.replace = replace
    else:  # inside the transaction, after the rows were sent and before COMMIT
        original_flush = Session.flush

        def flush(self, *args, **kwargs):
            result = original_flush(self, *args, **kwargs)
            if any(type(o).__name__ == "Document" for o in self.identity_map.values()):
                os._exit(3)
            return result

        Session.flush = flush
    store.add_document(model, HARBOUR, doc_id="crash", ratio=0.3, max_segment_tokens=40)
    os._exit(0)  # not reached


def test_crash_leaves_no_row_pointing_at_a_partial_blob_and_gc_cleans_up(tmp_path, tiny_llama):
    store_dir = tmp_path / "s"
    with CacheStore(store_dir) as store:
        store.add_document(tiny_llama, ORCHARD, doc_id="kept", ratio=0.3)
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_crash_worker, args=(str(store_dir), w)) for w in ("rename", "commit")]
    for p in processes:
        p.start()
    for p in processes:
        p.join(120)
        assert p.exitcode == 3
    with CacheStore(store_dir) as store:
        assert store.get_document("crash") is None and [d.id for d in store.list_documents()] == ["kept"]
        assert store.verify().ok
        leftovers = blob_files(store) - row_paths(store)
        assert any(name.endswith(".tmp") for name in leftovers)  # the interrupted write
        assert any(name.endswith(".safetensors") for name in leftovers)  # blobs whose rows never committed
        assert store.gc().removed == []  # young orphans may belong to an add in progress: kept by default
        report = store.gc(min_age_s=0)
        assert sorted(report.removed) == sorted(leftovers) and report.freed_nbytes > 0
        assert blob_files(store) == row_paths(store) and store.verify().ok
        store.add_document(tiny_llama, HARBOUR, doc_id="crash", ratio=0.3, max_segment_tokens=40)
        assert store.verify().ok
        with sqlite3.connect(store_dir / "index.sqlite") as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# ------------------------------------------------------------------------------------------------ concurrency


def _indexing_worker(store_dir: str, worker: int, count: int, barrier, times) -> None:
    import time

    model = build_tiny("llama", _tokenizer())
    with CacheStore(store_dir) as store:
        barrier.wait(120)  # start writing together (process start-up takes seconds and varies)
        started = time.time()
        for i in range(count):
            text = f"Report {worker}-{i}. " + (HARBOUR if i % 2 else ORCHARD) + f" Filed by clerk {worker} as {i}."
            store.add_document(model, text, doc_id=f"w{worker}-{i}", metadata={"worker": worker}, ratio=0.3)
            # Both workers also add the same shared document: exactly one copy must survive.
            if i == count // 2:
                store.add_document(model, "Shared notice. " + HARBOUR, doc_id="shared", ratio=0.3)
        times.put((started, time.time()))


def test_two_processes_indexing_at_once_lose_nothing(tmp_path, tiny_llama):
    store_dir = tmp_path / "s"
    CacheStore(store_dir).close()
    context = multiprocessing.get_context("spawn")
    count = 12
    barrier, times = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_indexing_worker, args=(str(store_dir), w, count, barrier, times))
                 for w in (1, 2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(180)
        assert p.exitcode == 0
    (start_a, end_a), (start_b, end_b) = times.get(timeout=5), times.get(timeout=5)
    assert start_a < end_b and start_b < end_a  # the two writers really overlapped
    with CacheStore(store_dir) as store:
        ids = {d.id for d in store.list_documents()}
        assert ids == {f"w{w}-{i}" for w in (1, 2) for i in range(count)} | {"shared"}
        assert all(len(d.caches) == len(d.segments) == 1 for d in store.list_documents())
        assert len(store.list_documents(metadata={"worker": 2})) == count
        assert store.verify().ok and store.gc(min_age_s=0).removed == []
        assert blob_files(store) == row_paths(store)
        assert store.search("clerk 2 as 5", k=1)[0].document_id == "w2-5"
        assert store.load_cache("w1-3", tiny_llama).info.model_fingerprint == tiny_llama.fingerprint


# ------------------------------------------------------------------------------------------------ routing


def test_routing_finds_the_squad_article(tmp_path, tiny_llama, squad):
    """24 articles indexed through the store (tiny model, cheap scorer: routing is pure full-text search)."""
    with CacheStore(tmp_path / "s") as store:
        for article in squad:
            text = "\n\n".join(p["context"] for p in article["paragraphs"])
            store.add_document(tiny_llama, text, doc_id=article["title"], metadata={"title": article["title"]},
                               ratio=0.1, scorer="keynorm")
        questions = [(a["title"], q["question"]) for a in squad for p in a["paragraphs"] for q in p["qas"]]
        sample = random.Random(0).sample(questions, 100)
        hits = 0
        for title, question in sample:
            found = store.search(question, k=1)
            hits += bool(found) and found[0].document_id == title
        rate = hits / len(sample)
        segments = sum(len(d.segments) for d in store.list_documents())
        print(f"\nSQuAD routing: top-1 article for {hits}/{len(sample)} questions ({rate:.0%}); "
              f"{len(squad)} articles, {segments} segments")
        assert rate >= 0.8
        # Filters narrow the search to one article.
        title, question = sample[0]
        assert {h.document_id for h in store.search(question, k=5, doc_ids=[title])} == {title}
        assert {h.document_id for h in store.search(question, k=5, metadata={"title": title})} == {title}
