"""Loaded caches kept in memory, keyed by what can never be reused: the blob's content hash (not a row id)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a store opened only to list or delete must not import torch
    from kvzip_rag.cache import PackedCache


class CacheLRU:
    """Loaded caches evicted least-recently-used first beyond a byte budget (thread-safe).

    A key starts with the blob's ``payload_sha256``; a row id could be recycled by another process or after a
    ``force=True`` re-add, a content hash cannot. Every hit is checked again against the identity the caller read
    from the row, so an entry is only ever served for the very blob it was read from.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self.items: OrderedDict[Hashable, tuple[str, PackedCache]] = OrderedDict()
        self.nbytes = 0
        self.lock = threading.Lock()

    def get(self, key: tuple, identity: str) -> PackedCache | None:
        with self.lock:
            entry = self.items.get(key)
            if entry is None:
                return None
            if entry[0] != identity:  # cannot happen with content-hash keys; never serve it if it does
                self.nbytes -= self.items.pop(key)[1].nbytes
                return None
            self.items.move_to_end(key)
            return entry[1]

    def put(self, key: tuple, identity: str, cache: PackedCache) -> None:
        size = cache.nbytes
        with self.lock:
            if key in self.items or size > self.max_bytes:
                return
            self.items[key] = (identity, cache)
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, (_, old) = self.items.popitem(last=False)
                self.nbytes -= old.nbytes

    def drop(self, identities) -> None:
        gone = set(identities)
        with self.lock:
            for key in [k for k, (ident, _) in self.items.items() if ident in gone]:
                self.nbytes -= self.items.pop(key)[1].nbytes

    def clear(self) -> None:
        with self.lock:
            self.items.clear()
            self.nbytes = 0
