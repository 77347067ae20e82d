"""Routing on a large store (ranking.MATCH_BUDGET), checked against exact ranking on small synthetic stores.

The budget is lowered to 10 so that a 30-segment store exercises all three cases: queries whose matches fit are
ranked exactly as before; beyond it, the most frequent terms are left out and the result is exactly the ranking of
the rarer terms alone; a query of one very frequent term ranks a bounded set of its matches only.
"""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from kvzip_rag.bench.scale import PostgresFiller, SQLiteFiller
from kvzip_rag.store import CacheStore, ranking
from kvzip_rag.store.ranking import search_segments

from test_store_postgres import postgres_url  # noqa: F401  (fixture)

TEXTS = [" ".join(["common"] + (["rare"] if i in (4, 17) else []) + (["middle"] * (1 + i % 3) if i % 5 == 0 else [])
                  + ["filler"] * (i % 7))
         for i in range(30)]


def _store(url: str, tmp_path) -> CacheStore:
    store = CacheStore(url=url, blob_dir=tmp_path / "blobs")
    filler = (PostgresFiller if store.engine.dialect.name == "postgresql" else SQLiteFiller)(store.engine, 1)
    filler.add(TEXTS)
    filler.finish()
    ranking._PG_FREQUENCIES.clear()
    return store


def _search(store: CacheStore, query: str, budget: int, monkeypatch) -> list[tuple[int, float]]:
    monkeypatch.setattr(ranking, "MATCH_BUDGET", budget)
    with Session(store.engine) as session:
        return search_segments(session, query, 30, method=store.search_method)


def _check_budget(store: CacheStore, monkeypatch) -> None:
    exact = lambda q: _search(store, q, 10**9, monkeypatch)  # noqa: E731
    # within the budget: unchanged (rare: 2 segments, middle: 6)
    assert _search(store, "rare middle", 10, monkeypatch) == exact("rare middle")
    # beyond it: "common" (30 segments) is left out, the rest is ranked exactly
    pruned = _search(store, "rare common", 10, monkeypatch)
    assert pruned == exact("rare") and {i for i, _ in pruned} == {5, 18}
    assert exact("rare common") != pruned  # the reference does see "common"
    # one term over the budget: at most MATCH_BUDGET of its segments are ranked, best first
    capped = _search(store, "common", 10, monkeypatch)
    assert len(capped) == 10 and all(a[1] >= b[1] for a, b in zip(capped, capped[1:]))
    assert {i for i, _ in capped} <= {i for i, _ in exact("common")}
    # a term with no matches never hides the frequent ones: they are still ranked (bounded)
    assert _search(store, "absentword common", 10, monkeypatch) == capped
    # the store's search uses the same path
    monkeypatch.setattr(ranking, "MATCH_BUDGET", 10)
    assert [h.segment_id for h in store.search("rare common", k=2)] == [i for i, _ in pruned[:2]]


def test_routing_budget_sqlite(tmp_path, monkeypatch):
    store = _store(f"sqlite:///{tmp_path / 'index.sqlite'}", tmp_path)
    try:
        _check_budget(store, monkeypatch)
        # SQLite ranks the first MATCH_BUDGET matches in segment order, scored as in the full ranking
        monkeypatch.setattr(ranking, "MATCH_BUDGET", 10)
        capped = _search(store, "common", 10, monkeypatch)
        reference = [r for r in _search(store, "common", 10**9, monkeypatch) if r[0] <= 10]
        assert capped == reference
    finally:
        store.close()


def test_routing_budget_postgresql(postgres_url, tmp_path, monkeypatch):  # noqa: F811
    store = _store(postgres_url, tmp_path)
    try:
        with Session(store.engine) as session:  # the estimates come from ANALYZE's statistics
            counts = ranking._postgres_counts(session, ["common", "rare", "absent"])
        assert counts["common"] == pytest.approx(30, rel=0.01) and counts["absent"] == 0
        _check_budget(store, monkeypatch)
    finally:
        store.close()
