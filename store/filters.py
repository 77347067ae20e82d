"""Metadata equality filters in SQL, per dialect (SQLite JSON1, PostgreSQL JSON), with Python as the fallback for
what a dialect cannot say safely (odd keys, nested values)."""

from __future__ import annotations

import re

import sqlalchemy as sa
from sqlalchemy.orm import Session

from .schema import Document
from .validate import check_metadata

_SQLITE_SAFE_KEY = re.compile(r"[A-Za-z0-9_\- ]{1,200}")


def _sql_json_equals(dialect: str, key: str, value):
    """``metadata[key] == value`` in SQL with the JSON type checked, or None when SQL can't say it safely."""
    if isinstance(value, (dict, list)):
        return None
    if dialect == "sqlite":
        if not _SQLITE_SAFE_KEY.fullmatch(key):
            return None  # SQLite JSON paths cannot quote every key: let Python compare
        path = f'$."{key}"'
        kind = sa.func.json_type(Document.meta, path)
        extract = sa.func.json_extract(Document.meta, path)
        if value is None:
            return kind == "null"
        if isinstance(value, bool):
            return kind == ("true" if value else "false")
        if isinstance(value, (int, float)):
            return sa.and_(kind.in_(["integer", "real"]), extract == value)
        return sa.and_(kind == "text", extract == value)
    if dialect == "postgresql":
        element = Document.meta[key]
        kind = sa.func.json_typeof(element)
        if value is None:
            return kind == "null"
        if isinstance(value, bool):
            return sa.and_(kind == "boolean", element.as_string() == ("true" if value else "false"))
        if isinstance(value, (int, float)):  # CASE: never cast a non-number (PostgreSQL would raise)
            return sa.case((kind == "number", element.as_float()), else_=None) == float(value)
        return sa.and_(kind == "string", element.as_string() == value)
    return None


def metadata_condition(session: Session, metadata: dict | None):
    """SQL condition on Document for ``metadata`` equality (``InvalidArgumentError`` for a filter that is not
    JSON-safe: lone surrogates, integers beyond 64 bits, absurd nesting)."""
    if not metadata:
        return None
    metadata = check_metadata(metadata)
    dialect = session.get_bind().dialect.name
    conditions, in_python = [], {}
    for key, value in metadata.items():
        condition = _sql_json_equals(dialect, key, value)
        if condition is None:
            in_python[key] = value
        else:
            conditions.append(condition)
    if in_python:
        ids = [
            doc_id for doc_id, meta in session.execute(sa.select(Document.id, Document.meta))
            if isinstance(meta, dict) and all(k in meta and meta[k] == v for k, v in in_python.items())
        ]
        conditions.append(Document.id.in_(ids))
    return sa.and_(*conditions)
