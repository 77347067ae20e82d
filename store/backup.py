"""Copying a folder store: a consistent SQLite snapshot plus hard-linked (immutable) blobs."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

from kvzip_rag.errors import KVzipError


def sqlite_backup(source: Path, target: Path) -> None:
    """A consistent snapshot of ``source`` written into ``target`` (works while others use either database)."""
    src = sqlite3.connect(str(source), timeout=30)
    try:
        dst = sqlite3.connect(str(target), timeout=30)
        try:
            src.backup(dst)
        finally:
            dst.close()
    finally:
        src.close()


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(target.name + ".part")
    try:
        os.link(source, temp)
    except OSError:
        shutil.copy2(source, temp)
    os.replace(temp, target)


def copy_folder_store(database: Path, blob_dir: Path, dest: Path, db_name: str, blob_dir_name: str) -> None:
    """Copy a folder store into ``dest``: database snapshot to a staging file, referenced blobs (hard links: blobs
    are immutable), then the snapshot into place, then blobs no row references are removed. A crash at any step
    leaves no row in ``dest`` that points at a missing blob."""
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / (db_name + ".staging")
    staging.unlink(missing_ok=True)
    sqlite_backup(database, staging)
    connection = sqlite3.connect(str(staging))
    try:
        referenced = {row[0] for row in connection.execute("SELECT blob_path FROM caches")}
        referenced |= {row[0] for row in connection.execute("SELECT blob_path FROM prefixes")}
    finally:
        connection.close()
    blob_root = dest / blob_dir_name
    for relative in sorted(referenced):
        source = (blob_dir / relative).resolve()
        target = (blob_root / relative).resolve()
        if blob_dir not in source.parents or blob_root.resolve() not in target.parents:
            raise KVzipError(f"refusing to copy blob path {relative!r}: it points outside the blob folder")
        if target.exists() and target.stat().st_size == source.stat().st_size:
            continue
        _link_or_copy(source, target)
    sqlite_backup(staging, dest / db_name)
    staging.unlink(missing_ok=True)
    for path in blob_root.rglob("*.safetensors"):
        if path.relative_to(blob_root).as_posix() not in referenced:
            path.unlink(missing_ok=True)
