"""The store as a user would deploy it at scale: rows in PostgreSQL, blobs on a real S3-compatible server.

Skips (saying why) where PostgreSQL or the S3 server (SeaweedFS, see s3_server.py) cannot start."""

from __future__ import annotations

import pytest

import kvzip_rag
from kvzip_rag.errors import CorruptBlobError
from kvzip_rag.store import CacheStore
from kvzip_rag.store.objects import ObstoreObjects

from conftest import build_tiny
from s3_server import s3_blob_url, s3_server  # noqa: F401  (fixtures)
from test_store import HARBOUR, ORCHARD
from test_store_postgres import postgres_url  # noqa: F401  (fixture)


def _same(a, b) -> bool:
    return all((x.keys == y.keys).all() and (x.values == y.values).all() and (x.offsets == y.offsets).all()
               for x, y in zip(a.layers, b.layers))


# ~2K tokens (as in issue 14) on a model wide enough (4 layers x 4 KV heads x 64) that keys and values, not the
# blob header, make up the bytes: a head keeps ~600 rows at 0.3, ~200 at 0.1 (read in 32-row checksum blocks).
LONG = " ".join(f"{HARBOUR} Crossing {i} is logged by warden number {7 * i + 3}." for i in range(16))


@pytest.fixture(scope="module")
def wide_model(smol_tokenizer):
    return build_tiny("llama", smol_tokenizer, hidden_size=256, num_attention_heads=4, num_key_value_heads=4,
                      head_dim=64, num_hidden_layers=4, intermediate_size=256, max_position_embeddings=4096)


def test_store_on_postgresql_and_s3(postgres_url, s3_blob_url, wide_model):  # noqa: F811
    tiny_llama = wide_model
    store = CacheStore(url=postgres_url, blob_url=s3_blob_url, cache_bytes=0)
    try:
        assert isinstance(store.blobs, ObstoreObjects)
        store.add_document(tiny_llama, LONG, doc_id="harbour", ratio=0.3)
        store.add_document(tiny_llama, ORCHARD, doc_id="orchard", ratio=0.3)
        assert store.search("When do ferries leave for Tessin?", k=1)[0].document_id == "harbour"
        memory = kvzip_rag.compress(tiny_llama, LONG, ratio=0.3)
        blob_bytes = store.caches_for("harbour")[0].nbytes

        store.blobs.counter.reset()
        assert _same(store.load_cache("harbour", tiny_llama), memory)
        assert store.blobs.counter.nbytes >= 0.9 * blob_bytes  # the whole cache (shared prefix stored apart)

        store.blobs.counter.reset()
        low = store.load_cache("harbour", tiny_llama, ratio=0.1)
        assert _same(low, memory.at_ratio(0.1))
        assert 0 < store.blobs.counter.nbytes <= 0.4 * blob_bytes, (store.blobs.counter.nbytes, blob_bytes)

        # gc: an object no row names (a crashed writer's) goes; the rows' objects stay and still verify
        store.blobs.write("ff/orphan.safetensors", b"left behind by a crash")
        report = store.gc(min_age_s=0)
        assert "ff/orphan.safetensors" in report.removed and not store.blobs.exists("ff/orphan.safetensors")
        assert store.verify().ok

        # a damaged object is reported and refused, naming the document
        key = store.caches_for("orchard")[0].blob_path
        store.blobs.write(key, store.blobs.read(key)[:-10])
        assert [p.document_id for p in store.verify().problems] == ["orchard"]
        with pytest.raises(CorruptBlobError, match="orchard"):
            store.load_cache("orchard", tiny_llama)

        assert store.delete_document("orchard") and not store.blobs.exists(key)
    finally:
        store.close()


def test_llamaindex_over_blobs_in_s3_persists_by_reference(s3_blob_url, tmp_path, tiny_llama):  # noqa: F811
    """``KVzipIndex(store=CacheStore(..., blob_url=...))``: persist() references the store (rows in its SQLite
    file, blobs in the bucket) instead of copying it, and the loaded index answers from the same objects."""
    pytest.importorskip("llama_index.core", reason="llama-index-core is not installed (kvzip-rag[llamaindex])")
    from llama_index.core import Document

    from kvzip_rag import KVzipIndex

    store = CacheStore(tmp_path / "rows", blob_url=s3_blob_url)
    index = KVzipIndex.from_documents([Document(text=HARBOUR, id_="harbour"), Document(text=ORCHARD, id_="orchard")],
                                      model=tiny_llama, store=store)
    question, short = "When do ferries leave for Tessin?", {"max_new_tokens": 4}
    expected = index.as_query_engine(**short).query(question)
    index.persist(tmp_path / "persisted")
    assert not (tmp_path / "persisted" / "kvzip_store").exists()  # nothing copied: the bucket is the store
    loaded = KVzipIndex.load(tmp_path / "persisted", model=tiny_llama)
    assert loaded.store.blob_url == s3_blob_url and loaded.store.blob_dir is None
    again = loaded.as_query_engine(**short).query(question)
    assert again.response == expected.response and again.source_nodes[0].node.ref_doc_id == "harbour"
    loaded.store.close()
    store.close()
