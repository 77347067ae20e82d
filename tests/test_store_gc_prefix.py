"""gc of the shared template prefixes (one row + blob per model and template): a prefix no cache uses any more goes
once it is older than gc's grace period (at once with ``now``), one a cache uses never goes, and a writer whose
prefix gc removed while it was compressing stores it again instead of failing or compressing twice. On SQLite and,
where its server can start, PostgreSQL (the fixture of test_store_postgres)."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
import torch

import kvzip_rag
from kvzip_rag.store import CacheStore
from kvzip_rag.store.schema import Cache, Prefix, Segment

from conftest import build_tiny
from test_store import HARBOUR, ORCHARD
from test_store_guarantees import same_layers
from test_store_postgres import postgres_url  # noqa: F401  (fixture)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh store: a folder, or a new database on the PostgreSQL test server with blobs in a folder."""
    if request.param == "sqlite":
        store = CacheStore(tmp_path / "s", cache_bytes=0)
    else:
        server = request.getfixturevalue("postgres_url")
        name = f"t{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE DATABASE {name}")
        admin.dispose()
        url = sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
        store = CacheStore(url=url, blob_dir=tmp_path / "blobs", cache_bytes=0)
    yield store
    store.close()


@pytest.fixture(scope="module")
def other_model(smol_tokenizer):
    """Same family and template as tiny_llama, other weights: another fingerprint, so another prefix."""
    return build_tiny("llama", smol_tokenizer, seed=5)


def prefixes(store) -> dict[str, tuple[int, str]]:
    """model name -> (prefix id, blob path)."""
    with store.engine.connect() as connection:
        rows = connection.execute(sa.select(Prefix.model_name, Prefix.id, Prefix.blob_path)).all()
    return {name: (pid, path) for name, pid, path in rows}


def age_prefixes(store, hours: float = 1.0) -> None:
    """As if every prefix had been stored ``hours`` ago (older than gc's 600 s grace period)."""
    with store.engine.begin() as connection:
        connection.execute(sa.update(Prefix).values(created=datetime.now(timezone.utc) - timedelta(hours=hours)))


def prefix_ids(store, doc_id: str, model) -> list[int]:
    """The prefix ids the caches of ``doc_id`` built by ``model`` reference."""
    with store.engine.connect() as connection:
        return list(connection.execute(
            sa.select(Cache.prefix_id).join(Segment, Segment.id == Cache.segment_id)
            .where(Segment.document_id == doc_id, Cache.model_fingerprint == model.fingerprint)).scalars())


def close_layers(a, b) -> None:
    """Equal up to float rounding (a document joins a prefix computed with another document's text)."""
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.offsets, y.offsets)
        assert torch.allclose(x.keys, y.keys, atol=1e-5) and torch.allclose(x.values, y.values, atol=1e-5)


def blob_exists(store, name: str) -> bool:
    return (store.blob_dir / name).is_file()


def test_gc_removes_unused_prefixes_after_the_grace_period_only(store, tiny_llama, other_model):
    store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    store.add_document(other_model, ORCHARD, doc_id="b", ratio=0.5)
    assert set(prefixes(store)) == {tiny_llama.name, other_model.name}
    _, unused_blob = prefixes(store)[other_model.name]
    store.delete_document("b")  # no cache of other_model is left: its prefix is unused

    young = store.gc()
    assert young.prefixes == [] and set(prefixes(store)) == {tiny_llama.name, other_model.name}  # young: kept

    age_prefixes(store)  # both prefixes are old now; only the unused one may go
    dry = store.gc(dry_run=True)
    assert dry.prefixes == [other_model.name] and unused_blob in dry.removed
    assert set(prefixes(store)) == {tiny_llama.name, other_model.name} and blob_exists(store, unused_blob)

    report = store.gc()
    assert report.prefixes == [other_model.name] and report.removed == [unused_blob] and report.freed_nbytes > 0
    assert set(prefixes(store)) == {tiny_llama.name} and not blob_exists(store, unused_blob)
    assert store.gc(now=True).removed == []  # a prefix a cache uses never goes, however old
    assert store.verify().ok
    same_layers(kvzip_rag.compress(tiny_llama, HARBOUR, ratio=0.5), store.load_cache("a", tiny_llama))

    # Indexing with that model again stores its prefix again.
    store.add_document(other_model, ORCHARD, doc_id="b", ratio=0.5)
    assert set(prefixes(store)) == {tiny_llama.name, other_model.name} and store.verify().ok
    same_layers(kvzip_rag.compress(other_model, ORCHARD, ratio=0.5), store.load_cache("b", other_model))

    store.delete_document("b")
    assert store.gc(now=True).prefixes == [other_model.name]  # now: no grace period


@pytest.mark.parametrize("doc_id", ["new", "a"])  # a new document, and new caches for an existing one
def test_a_writer_whose_prefix_gc_removed_meanwhile_stores_it_again(store, tiny_llama, other_model, doc_id):
    store.add_document(tiny_llama, HARBOUR, doc_id="a", ratio=0.5)
    store.add_document(other_model, ORCHARD, doc_id="old", ratio=0.5)
    store.delete_document("old")
    age_prefixes(store)  # other_model's prefix: unused and past the grace period
    old_id, old_blob = prefixes(store)[other_model.name]
    runs, reports = [], []

    def gc_while_compressing(stage, done, total):
        if stage == "segment" and done == 0:
            runs.append(total)
        if stage == "compress" and not reports:  # the writer has looked up the prefix; its rows are not stored
            reports.append(store.gc())

    store.add_document(other_model, HARBOUR, doc_id=doc_id, ratio=0.5, progress=gc_while_compressing)
    assert reports[0].prefixes == [other_model.name] and reports[0].removed == [old_blob]  # young blobs kept
    assert len(runs) == 1  # compressed once: only the commit was redone
    new_id, new_blob = prefixes(store)[other_model.name]
    assert new_id != old_id and new_blob != old_blob
    assert prefix_ids(store, doc_id, other_model) == [new_id]
    assert store.verify().ok and store.gc(now=True).removed == []
    close_layers(kvzip_rag.compress(other_model, HARBOUR, ratio=0.5), store.load_cache(doc_id, other_model))
