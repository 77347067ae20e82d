"""The store on a real PostgreSQL server: a throwaway cluster on a unix socket, started and removed by the test.

Skips (saying why) when the server binaries or psycopg2 are missing; CI installs them (apt package ``postgresql``,
extra ``[test]``)."""

from __future__ import annotations

import pytest

import kvzip_rag
from kvzip_rag.errors import CorruptBlobError, ModelMismatchError
from kvzip_rag.store import CacheStore

from conftest import build_tiny
from services import TempPostgres
from test_store import HARBOUR, ORCHARD


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    try:
        server = TempPostgres(options="")
    except (RuntimeError, KeyError) as error:  # no server binaries; root without a 'postgres' user to run it as
        pytest.skip(f"cannot run a PostgreSQL server here: {error}")
    try:
        url = server.start()
    except RuntimeError as error:
        server.stop()
        if str(error).startswith("initdb"):
            pytest.skip(str(error))
        pytest.fail(str(error))
    try:
        yield url
    finally:
        server.stop()


def test_store_on_postgresql(postgres_url, tmp_path, tiny_llama, smol_tokenizer):
    store = CacheStore(url=postgres_url, blob_dir=tmp_path / "blobs")
    try:
        evil = {"title": "O'Brien \"q\"", 'we"ird': "x", "n": 3, "flag": True}
        store.add_document(tiny_llama, HARBOUR, doc_id="../../h", metadata=evil, ratio=0.5)
        store.add_document(tiny_llama, ORCHARD, doc_id="o", metadata={"title": "plain", "n": "3"}, ratio=0.5)
        again = store.add_document(tiny_llama, HARBOUR, doc_id="../../h", ratio=0.5)
        assert len(store) == 2 and len(again.caches) == 1
        assert store.search("When do ferries leave for Tessin?", k=1)[0].document_id == "../../h"
        assert store.search("Which apple was planted in 1899?", k=1)[0].document_id == "o"
        assert store.search("ferries Tessin apple", k=5, doc_ids=["o"])[0].document_id == "o"
        assert [h.document_id for h in store.search("ferries", k=3, metadata={"title": evil["title"]})] == ["../../h"]
        assert [d.id for d in store.list_documents(metadata={"n": 3})] == ["../../h"]
        assert [d.id for d in store.list_documents(metadata={"n": "3"})] == ["o"]
        assert [d.id for d in store.list_documents(metadata={"flag": True, 'we"ird': "x"})] == ["../../h"]
        for query in ["'; DROP TABLE segments; --", "\"", "a & b | !c", "ferries:*", ""]:
            store.search(query, k=2)
        memory = kvzip_rag.compress(tiny_llama, HARBOUR, ratio=0.5)
        loaded = store.load_cache("../../h", tiny_llama, ratio=0.25)
        expected = memory.at_ratio(0.25)
        assert all((a.keys == b.keys).all() for a, b in zip(loaded.layers, expected.layers))
        assert kvzip_rag.answer(tiny_llama, loaded, "When?", max_new_tokens=4).token_ids == \
            kvzip_rag.answer(tiny_llama, expected, "When?", max_new_tokens=4).token_ids
        with pytest.raises(ModelMismatchError):
            store.load_cache("o", build_tiny("llama", smol_tokenizer, seed=5))
        assert store.verify().ok
        blob = store.blob_dir / store.caches_for("o")[0].blob_path
        blob.write_bytes(blob.read_bytes()[:-10])
        assert [p.document_id for p in store.verify().problems] == ["o"]
        with pytest.raises(CorruptBlobError, match="document 'o'"):
            store.load_cache("o", tiny_llama)
        assert store.delete_document("o") and store.search("apple 1899", k=3) == []
        assert store.gc(min_age_s=0).removed == []
    finally:
        store.close()
