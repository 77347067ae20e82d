"""SQL schema (SQLAlchemy 2.0 ORM) and its migrations: documents, their segments, and compressed caches.

SQLite (the default) gets WAL, a busy timeout, foreign keys and ``BEGIN IMMEDIATE`` for write transactions, and an
FTS5 table over segment text kept in sync by triggers, i.e. inside the very transaction that writes the segments.
PostgreSQL gets a GIN expression index. How those indexes rank a query is :mod:`.ranking`.
"""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from kvzip_rag.errors import InvalidArgumentError

BUSY_TIMEOUT_MS = 30_000


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class Document(Base):
    __tablename__ = "documents"

    id: Mapped[str] = mapped_column(sa.String(255), primary_key=True)
    content_hash: Mapped[str] = mapped_column(sa.String(64), index=True)
    text: Mapped[str] = mapped_column(sa.Text)
    meta: Mapped[dict] = mapped_column("metadata", sa.JSON, default=dict)
    created: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)

    segments: Mapped[list["Segment"]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True, order_by="Segment.index"
    )


class Segment(Base):
    __tablename__ = "segments"
    __table_args__ = (sa.UniqueConstraint("document_id", "index", name="uq_segment_index"),)

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[str] = mapped_column(sa.ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(sa.Integer)
    text: Mapped[str] = mapped_column(sa.Text)
    token_count: Mapped[int] = mapped_column(sa.Integer)
    char_start: Mapped[int] = mapped_column(sa.Integer, default=0)
    char_end: Mapped[int] = mapped_column(sa.Integer, default=0)

    document: Mapped[Document] = relationship(back_populates="segments")
    caches: Mapped[list["Cache"]] = relationship(
        back_populates="segment", cascade="all, delete-orphan", passive_deletes=True
    )


class Cache(Base):
    __tablename__ = "caches"
    __table_args__ = (
        sa.UniqueConstraint(
            "segment_id", "model_fingerprint", "template_digest", "ratio", "level", "scorer", name="uq_cache_kind"
        ),
        sa.Index("ix_cache_model", "model_fingerprint", "template_digest"),
        {"sqlite_autoincrement": True},  # ids are never reused, even after deletes
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    segment_id: Mapped[int] = mapped_column(sa.ForeignKey("segments.id", ondelete="CASCADE"), index=True)
    model_name: Mapped[str] = mapped_column(sa.String(255))
    model_fingerprint: Mapped[str] = mapped_column(sa.String(64))
    template_digest: Mapped[str] = mapped_column(sa.String(64))
    ratio: Mapped[float] = mapped_column(sa.Float)
    level: Mapped[str] = mapped_column(sa.String(16))
    scorer: Mapped[str] = mapped_column(sa.String(64))
    # 16: the cache dtype; 8/4: quantized (one cache per ratio/level/scorer: another kv_bits replaces it)
    kv_bits: Mapped[int] = mapped_column(sa.Integer, default=16, server_default="16")
    blob_path: Mapped[str] = mapped_column(sa.String(255), unique=True)  # relative to the blob dir
    nbytes: Mapped[int] = mapped_column(sa.BigInteger)  # file size
    kv_nbytes: Mapped[int] = mapped_column(sa.BigInteger)  # keys + values inside
    full_nbytes: Mapped[int] = mapped_column(sa.BigInteger)  # the uncompressed cache of the same tokens
    prefix_length: Mapped[int] = mapped_column(sa.Integer)
    context_length: Mapped[int] = mapped_column(sa.Integer)
    sha256: Mapped[str] = mapped_column(sa.String(64))  # of the whole blob file (verify)
    payload_sha256: Mapped[str] = mapped_column(sa.String(64))  # of its tensors, as in its header (every load)
    prefix_id: Mapped[int | None] = mapped_column(sa.ForeignKey("prefixes.id"), nullable=True)
    created: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)

    segment: Mapped[Segment] = relationship(back_populates="caches")


class Prefix(Base):
    """The template prefix's keys and values, stored once per (model fingerprint, template digest)."""

    __tablename__ = "prefixes"
    __table_args__ = (
        sa.UniqueConstraint("model_fingerprint", "template_digest", name="uq_prefix_model"),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(sa.Integer, primary_key=True, autoincrement=True)
    model_name: Mapped[str] = mapped_column(sa.String(255))
    model_fingerprint: Mapped[str] = mapped_column(sa.String(64))
    template_digest: Mapped[str] = mapped_column(sa.String(64))
    prefix_length: Mapped[int] = mapped_column(sa.Integer)
    blob_path: Mapped[str] = mapped_column(sa.String(255), unique=True)
    nbytes: Mapped[int] = mapped_column(sa.BigInteger)
    kv_nbytes: Mapped[int] = mapped_column(sa.BigInteger)
    sha256: Mapped[str] = mapped_column(sa.String(64))
    payload_sha256: Mapped[str] = mapped_column(sa.String(64))
    created: Mapped[datetime] = mapped_column(sa.DateTime(timezone=True), default=utcnow)


class StoreInfo(Base):
    """Key/value facts about the store itself: ``schema_version``."""

    __tablename__ = "store_info"

    key: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    value: Mapped[str] = mapped_column(sa.String(255))


SCHEMA_VERSION = "2"  # 2: shared template prefix (prefixes table), blob format kvzip-rag/2, payload hash per row


# ---------------------------------------------------------------------------------------------------------- engine


def parse_url(url: str) -> sa.engine.URL:
    """A database URL, parsed; one that is not is a one-line ``InvalidArgumentError`` naming its scheme (never the
    rest, which may hold a password)."""
    try:
        return sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        scheme = f" (scheme {url.split('://', 1)[0]!r})" if "://" in url else ""
        raise InvalidArgumentError(f"the database URL is not one SQLAlchemy can read{scheme}; give e.g. "
                                   "sqlite:///path/index.sqlite or postgresql+psycopg2://user@host/db") from None


def make_engine(url: str, *, read_only: bool = False, **kwargs) -> Engine:
    """An engine with the pragmas and transaction modes the store relies on. ``read_only`` opens a SQLite file
    with ``mode=ro`` (and ``immutable=1`` where its folder cannot be written, e.g. a mounted snapshot, since SQLite
    could not create its shared-memory file there)."""
    parsed = parse_url(url)
    if read_only and parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        import os
        import sqlite3
        from pathlib import Path

        database = Path(parsed.database).expanduser().resolve()
        immutable = "&immutable=1" if not os.access(database.parent, os.W_OK) else ""
        target = f"file:{database}?mode=ro{immutable}"
        kwargs.setdefault("creator", lambda: sqlite3.connect(target, uri=True, check_same_thread=False))
    engine = sa.create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, read_only)
    return engine


def _configure_sqlite(engine: Engine, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record):
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's implicit BEGIN is DEFERRED and too late).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        if engine.url.database not in (None, "", ":memory:") and not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection):
        # Writers take the write lock up front: a deferred transaction that reads then writes can fail with
        # SQLITE_BUSY immediately (no waiting) when another process committed in between.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


def writer(engine: Engine) -> Engine:
    """The engine to open write sessions on (``BEGIN IMMEDIATE`` on SQLite)."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin="IMMEDIATE")
    return engine


_SQLITE_FTS = [
    "CREATE VIRTUAL TABLE IF NOT EXISTS segments_fts USING fts5("
    "text, content='segments', content_rowid='id', tokenize='porter unicode61')",
    "CREATE TRIGGER IF NOT EXISTS segments_fts_ai AFTER INSERT ON segments BEGIN "
    "INSERT INTO segments_fts(rowid, text) VALUES (new.id, new.text); END",
    "CREATE TRIGGER IF NOT EXISTS segments_fts_ad AFTER DELETE ON segments BEGIN "
    "INSERT INTO segments_fts(segments_fts, rowid, text) VALUES ('delete', old.id, old.text); END",
    "CREATE TRIGGER IF NOT EXISTS segments_fts_au AFTER UPDATE OF text ON segments BEGIN "
    "INSERT INTO segments_fts(segments_fts, rowid, text) VALUES ('delete', old.id, old.text); "
    "INSERT INTO segments_fts(rowid, text) VALUES (new.id, new.text); END",
]
# A stored tsvector column: ranking reads it instead of re-parsing every matching segment's text (which made one
# query over 10^4 segments take ~250 ms). The GIN index is on the column; the old expression index is dropped.
_POSTGRES_FTS = [
    "ALTER TABLE segments ADD COLUMN IF NOT EXISTS text_tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('english', text)) STORED",
    "DROP INDEX IF EXISTS ix_segments_tsv",
    # ANALYZE keeps the frequencies of the 10^4 most common lexemes: what the query planner below reads
    "ALTER TABLE segments ALTER COLUMN text_tsv SET STATISTICS 1000",
    "CREATE INDEX IF NOT EXISTS ix_segments_text_tsv ON segments USING gin (text_tsv)",
]


class OldStoreError(Exception):
    """The database was written by an older kvzip-rag (message: what it holds)."""


def schema_state(connection) -> str | None:
    """None for an empty database, the schema version otherwise (``"1"`` for a store from before versions)."""
    tables = set(sa.inspect(connection).get_table_names())
    if "documents" not in tables and "caches" not in tables:
        return None
    if "store_info" not in tables:
        return "1"
    row = connection.execute(sa.select(StoreInfo.value).where(StoreInfo.key == "schema_version")).first()
    return row[0] if row else "1"


def lacks_kv_bits(engine: Engine) -> bool:
    """A version-2 store written before quantized caches (no ``caches.kv_bits``): see :func:`add_kv_bits`."""
    with engine.connect() as connection:
        return "kv_bits" not in {c["name"] for c in sa.inspect(connection).get_columns("caches")}


def add_kv_bits(engine: Engine) -> None:
    """Every cache of a store from before quantized caches is 16-bit: add the column with that default."""
    with writer(engine).begin() as connection:
        if "kv_bits" not in {c["name"] for c in sa.inspect(connection).get_columns("caches")}:
            connection.exec_driver_sql("ALTER TABLE caches ADD COLUMN kv_bits INTEGER NOT NULL DEFAULT 16")


def search_method(engine: Engine) -> str:
    """The search this database supports, without writing anything (for read-only stores)."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        return "postgres"
    if dialect != "sqlite":
        return "terms"
    with engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'segments_fts'"
        ).first()
    return "fts5" if found else "terms"


def create_schema(engine: Engine) -> str:
    """Create tables and the full-text index if missing (idempotent, safe to race from several processes).

    Returns the search method this database supports: ``"fts5"``, ``"postgres"`` or ``"terms"`` (the fallback,
    also used on a SQLite built without FTS5). Raises :class:`OldStoreError` for a store of an older schema.
    """
    dialect = engine.dialect.name
    with writer(engine).begin() as connection:
        state = schema_state(connection)
        if state not in (None, SCHEMA_VERSION):
            raise OldStoreError(f"schema version {state}, this kvzip-rag writes version {SCHEMA_VERSION}")
        Base.metadata.create_all(connection)
        if state is None:
            try:  # two processes creating one PostgreSQL store at once: the second finds the first's row
                with connection.begin_nested():
                    connection.execute(sa.insert(StoreInfo).values(key="schema_version", value=SCHEMA_VERSION))
            except sa.exc.IntegrityError:
                pass
        if dialect == "postgresql":
            for statement in _POSTGRES_FTS:
                connection.exec_driver_sql(statement)
            return "postgres"
        if dialect != "sqlite":
            return "terms"
        exists = connection.exec_driver_sql(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'segments_fts'"
        ).first()
        if exists is None:
            try:
                connection.exec_driver_sql("SAVEPOINT fts")
                for statement in _SQLITE_FTS:
                    connection.exec_driver_sql(statement)
                connection.exec_driver_sql("RELEASE fts")
            except sa.exc.OperationalError as error:  # SQLite built without FTS5
                connection.exec_driver_sql("ROLLBACK TO fts")
                connection.exec_driver_sql("RELEASE fts")
                if "fts5" not in str(error).lower():
                    raise
                return "terms"
        else:
            for statement in _SQLITE_FTS[1:]:  # the triggers, in case an older store lacks one
                connection.exec_driver_sql(statement)
    return "fts5"
