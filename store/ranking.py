"""Full-text ranking of segments for a question: BM25 over SQLite's FTS5 table, ``ts_rank`` over PostgreSQL's GIN
index, and, on any other database (or a SQLite without FTS5), a count of matching terms with ``LIKE``.
:func:`search_segments` hides the three behind one call; the indexes themselves are created by :mod:`.schema`.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from kvzip_rag.language import query_terms

from .schema import Document, Segment

# Segments one unfiltered query ranks exactly. Ranking costs time per matching segment, so on a large store the
# most frequent query terms (the ones with the least weight, e.g. "year" in a million segments) are left out
# while the rarer ones match more than this many segments; a query of only such terms ranks the first MATCH_BUDGET
# segments that hold its rarest term. Stores where every query matches fewer segments rank exactly.
MATCH_BUDGET = 1_000


def search_segments(
    session: Session, query: str, limit: int, where: sa.ColumnElement[bool] | None = None, method: str | None = None
) -> list[tuple[int, float]]:
    """``(segment_id, score)`` best first (higher score = better) for a free-text query.

    ``where`` is an extra condition on ``Segment`` (and on ``Document``, which is joined), e.g. document ids or
    metadata. The query is never interpreted as search syntax: it is reduced to words, each passed as a bound
    parameter (quoted as an FTS5 string on SQLite), so quotes, operators or SQL in a question are harmless.
    ``method``: ``"fts5"`` (SQLite), ``"postgres"`` or ``"terms"`` (any database); default by dialect.
    """
    terms = query_terms(query)
    if not terms or limit <= 0:
        return []
    dialect = session.get_bind().dialect.name
    method = method or {"sqlite": "fts5", "postgresql": "postgres"}.get(dialect, "terms")
    if method == "terms" or where is not None:
        return _ranked(session, terms, limit, where, method)
    kept, overflow = _within_budget(session, terms, method)
    hits = _ranked(session, kept, limit, None, method) if kept else []
    if overflow is not None and len(hits) < limit:  # every term with matches is frequent: a bounded set of its
        seen = {i for i, _ in hits}                  # matches, after the (rare) hits of the terms kept
        more = _ranked(session, [overflow], limit + len(hits), None, method, capped=True)
        hits += [h for h in more if h[0] not in seen][: limit - len(hits)]
    return hits


def _ranked(
    session: Session, terms: list[str], limit: int, where, method: str, capped: bool = False
) -> list[tuple[int, float]]:
    """The ranking statement of one method; ``capped`` ranks only the first MATCH_BUDGET matches."""
    if method == "fts5":
        fts = sa.table("segments_fts", sa.column("rowid"))
        fts_ref = sa.literal_column("segments_fts")
        rank = sa.func.bm25(fts_ref)
        matches = fts_ref.op("MATCH")(sa.bindparam("match", _fts5_match(terms)))
        if where is None:  # rank inside the FTS5 table alone: no join per matching row
            stmt = sa.select(fts.c.rowid, (-rank).label("score")).where(matches).order_by(rank, fts.c.rowid)
            if capped:  # the first MATCH_BUDGET matches in segment order (FTS5 seeks rowid ranges)
                last = session.execute(sa.select(fts.c.rowid).where(matches).order_by(fts.c.rowid)
                                       .limit(1).offset(MATCH_BUDGET - 1)).scalar()
                stmt = stmt.where(fts.c.rowid <= last) if last is not None else stmt
        else:
            stmt = (
                sa.select(Segment.id, (-rank).label("score"))
                .select_from(fts)
                .join(Segment, Segment.id == fts.c.rowid)
                .where(matches)
                .order_by(rank, Segment.id)
            )
    elif method == "postgres":
        tsq = _tsquery(terms)
        vector = sa.literal_column("segments.text_tsv")  # the stored column the GIN index covers
        if capped:  # MATCH_BUDGET matching segments (in storage order) only
            inner = sa.select(Segment.id.label("id"), vector.label("tsv")).where(vector.op("@@")(tsq))
            inner = inner.limit(MATCH_BUDGET).subquery()
            score = sa.func.ts_rank(inner.c.tsv, tsq)
            stmt = sa.select(inner.c.id, score.label("score")).order_by(score.desc(), inner.c.id)
        else:
            score = sa.func.ts_rank(vector, tsq)
            stmt = (
                sa.select(Segment.id, score.label("score"))
                .where(vector.op("@@")(tsq))
                .order_by(score.desc(), Segment.id)
            )
    else:  # portable fallback: number of distinct query terms present
        hits = []
        for term in terms:
            pattern = "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            hits.append(sa.case((sa.func.lower(Segment.text).like(pattern, escape="\\"), 1), else_=0))
        score = sum(hits[1:], hits[0])
        stmt = sa.select(Segment.id, score.label("score")).where(score > 0).order_by(score.desc(), Segment.id)
    if where is not None:
        stmt = stmt.join(Document, Document.id == Segment.document_id).where(where)
    rows = session.execute(stmt.limit(int(limit))).all()
    return [(int(row[0]), float(row[1])) for row in rows]


def _fts5_match(terms: list[str]) -> str:
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def _tsquery(terms: list[str]):
    return sa.func.websearch_to_tsquery(sa.text("'english'"), sa.bindparam("tsq", " or ".join(terms)))


_PG_FREQUENCIES: dict[str, tuple[float, dict[str, float]]] = {}  # url -> (read at, lexeme -> share of rows)
_PG_FREQUENCIES_TTL_S = 300.0


def _postgres_counts(session: Session, terms: list[str]) -> dict[str, float]:
    """Estimated matching segments per term: ANALYZE's lexeme frequencies (re-read every few minutes) times the
    current row estimate. Counting on PostgreSQL visits every matching row, as slow as ranking them. A lexeme not
    among the most common ones counts as rare (0)."""
    import time

    key = session.get_bind().engine.url.render_as_string(hide_password=False)
    cached = _PG_FREQUENCIES.get(key)
    if cached is None or time.monotonic() - cached[0] > _PG_FREQUENCIES_TTL_S:
        row = session.execute(sa.text(
            "SELECT most_common_elems::text::text[], most_common_elem_freqs FROM pg_stats "
            "WHERE tablename = 'segments' AND attname = 'text_tsv' AND schemaname = current_schema()"
        )).first()
        cached = (time.monotonic(), dict(zip(row[0] or [], row[1] or [])) if row else {})
        _PG_FREQUENCIES[key] = cached
    frequency = cached[1]
    rows = session.execute(sa.text("SELECT reltuples FROM pg_class WHERE oid = to_regclass('segments')")).scalar()
    stems = session.execute(
        sa.text("SELECT t, tsvector_to_array(to_tsvector('english', t)) FROM unnest(CAST(:terms AS text[])) AS t"),
        {"terms": terms},
    ).all()
    rows = max(float(rows or 0), 0.0)
    return {term: max((frequency.get(s, 0.0) for s in lexemes or ()), default=0.0) * rows for term, lexemes in stems}


# One compiled statement (plain SQL: building an expression per term cost more than running it).
_FTS5_COUNT = sa.text("SELECT count(*) FROM (SELECT 1 FROM segments_fts WHERE segments_fts MATCH :match LIMIT :cap)")


def _within_budget(session: Session, terms: list[str], method: str) -> tuple[list[str], str | None]:
    """The query terms to rank with (query order): the rarest while their matches fit ``MATCH_BUDGET``; and, when
    no term with matches fits, the rarest frequent one to rank a bounded set of. SQLite counts each term's matches
    up to the budget (cheap in FTS5); PostgreSQL estimates them from its statistics."""
    if method == "postgres":
        counts = _postgres_counts(session, terms)
    else:
        counts = {
            term: session.execute(_FTS5_COUNT, {"match": _fts5_match([term]), "cap": MATCH_BUDGET + 1}).scalar() or 0
            for term in terms
        }
    if sum(counts.values()) <= MATCH_BUDGET:
        return terms, None
    kept, total, overflow = [], 0, None
    for term in sorted(terms, key=lambda t: counts[t]):
        if total + counts[term] > MATCH_BUDGET:
            overflow = term if total == 0 else None
            break
        kept.append(term)
        total += counts[term]
    return [t for t in terms if t in kept], overflow
