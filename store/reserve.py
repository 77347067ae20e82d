"""The disk reserve: a file beside the SQLite database that a full disk gives back, so that a delete (which
appends to the WAL before it frees anything) can still run and free space.

Sized to what is free (an eighth of it, at most ``RESERVE_NBYTES``, at least ``RESERVE_FLOOR``): a fixed 1 MiB
reserve made only with 8 MiB free left small disks without one, and a delete on them failed once they filled up.
On a full disk the reserve is released and the WAL truncated before the one retry, so the retry needs no new
space beyond what a delete's own pages take.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import sqlalchemy as sa

from kvzip_rag.errors import StoreFullError

from .backends import full_error, is_disk_full

RESERVE_NAME = ".kvzip-reserve"
RESERVE_NBYTES = 1 << 20
RESERVE_FLOOR = 64 << 10  # 16 SQLite pages: a document's rows, its FTS entries and the WAL frame headers
T = TypeVar("T")


def reserve_size(free: int) -> int:
    """Bytes to set aside on a disk with ``free`` bytes free (0: too little room for any)."""
    size = min(RESERVE_NBYTES, free // 8)
    if size >= RESERVE_FLOOR:
        return size
    return RESERVE_FLOOR if free >= 2 * RESERVE_FLOOR else 0


def free_bytes(path: str | os.PathLike) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 0


def _cause(error: BaseException) -> BaseException:
    """The driver's error inside SQLAlchemy's wrapper (it says why), or ``error`` itself."""
    return getattr(error, "orig", None) or error


class DiskReserve:
    """The reserve of one store and the full-disk retry that uses it. ``database`` None (a server database, whose
    disk is not ours to manage) keeps no file; ``disk`` is a local folder on the disk that fills up (None when
    nothing is local)."""

    def __init__(self, database: Path | None, disk: Path | None, engine: sa.Engine | None = None):
        self.path = database.parent / RESERVE_NAME if database is not None else None
        self.disk = disk
        self.engine = engine  # a SQLite engine whose WAL is truncated before a retry

    def keep(self) -> None:
        """Create the reserve if it is missing (call after space was freed)."""
        if self.path is None or self.path.exists():
            return
        size = reserve_size(free_bytes(self.path.parent))
        if not size:
            return
        try:
            with self.path.open("wb") as handle:
                handle.write(b"\0" * size)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            self.path.unlink(missing_ok=True)

    def release(self) -> bool:
        """Give the reserve's space back; False when there was none."""
        if self.path is None:
            return False
        try:
            self.path.unlink()
        except OSError:
            return False
        self._truncate_wal()
        return True

    def _truncate_wal(self) -> None:
        """Copy the WAL into the database and cut it to zero bytes: what it held is free for the retry."""
        if self.engine is None or self.engine.dialect.name != "sqlite":
            return
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        except sa.exc.DBAPIError:
            pass  # a reader holds the WAL or the checkpoint itself needs room: the released file must do

    def is_full(self, error: BaseException) -> bool:
        return is_disk_full(_cause(error), self.disk)

    def retry(self, action: Callable[[], T], where: str, needed: int | None = None) -> T:
        """Run ``action``; on a full disk release the reserve and retry once, else ``StoreFullError``."""
        for attempt in range(2):
            try:
                return action()
            except (sa.exc.OperationalError, OSError) as error:
                if not self.is_full(error):
                    raise
                cause = _cause(error)
            if attempt or not self.release():
                break
        raise full_error(where, needed, cause) from None

    def raise_if_full(self, error: BaseException, where: str) -> None:
        """``StoreFullError`` for ``error`` when it means the disk is full; nothing otherwise."""
        if isinstance(error, StoreFullError):
            return
        if isinstance(error, (sa.exc.OperationalError, OSError)) and self.is_full(error):
            raise full_error(where, None, _cause(error)) from error
