"""The shared template prefix: the keys and values of a model's prompt prefix, identical for every document of a
model and template, stored once (``prefixes`` table + one blob) and joined to each document cache on load.

:class:`SharedPrefixes` is the store's one owner of those rows and blobs on the write and load side (gc removes
unused ones: :mod:`.maintenance`), with an in-memory copy of each prefix it read (they are small and kept).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import sqlalchemy as sa

from kvzip_rag.errors import CorruptBlobError, StoreError

from .blob import BlobReader
from .schema import Prefix

if TYPE_CHECKING:
    from kvzip_rag.cache import PrefixKV

    from .cache_store import CacheStore


class SharedPrefixes:
    """Store, find and load the shared prefixes of one :class:`~.cache_store.CacheStore`."""

    def __init__(self, store: CacheStore):
        self.store = store
        self._loaded: dict[tuple[str, str], PrefixKV] = {}  # (payload_sha256, device) -> prefix

    def clear(self) -> None:
        self._loaded.clear()

    def ensure(self, prefix: PrefixKV, model_name: str) -> tuple[int, PrefixKV]:
        """The id and keys/values of the stored prefix of ``prefix``'s model and template (storing ``prefix`` if
        there is none yet). gc removes prefixes no cache uses; one it removes while we look is stored again."""
        key = (Prefix.model_fingerprint == prefix.model_fingerprint, Prefix.template_digest == prefix.template_digest)
        for _ in range(4):
            with self.store.read_session() as session:
                row = session.scalars(sa.select(Prefix).where(*key)).first()
            if row is None:
                self._store(prefix, model_name)
                continue
            try:
                return row.id, self.load(row, "cpu")
            except CorruptBlobError:
                with self.store.read_session() as session:
                    if session.get(Prefix, row.id) is not None:  # really damaged, not removed by gc
                        raise
        raise StoreError(f"the shared prefix of model {model_name!r} was removed by gc while it was being stored; "
                         "run gc --now only when no other process is indexing")

    def _store(self, prefix: PrefixKV, model_name: str) -> None:
        """Blob first, then the row; a concurrent writer's row for the same model and template wins."""
        from .cachefile import encode_prefix

        blob = encode_prefix(prefix, model_name)
        name = self.store.put_blob(blob.data)
        try:
            with self.store.write_session() as session, session.begin():
                session.add(Prefix(
                    model_name=model_name, model_fingerprint=prefix.model_fingerprint,
                    template_digest=prefix.template_digest, prefix_length=prefix.prefix_length,
                    blob_path=name, nbytes=len(blob.data), kv_nbytes=prefix.nbytes, sha256=blob.sha256,
                    payload_sha256=blob.payload_sha256,
                ))
        except sa.exc.IntegrityError:  # another writer stored it first: use theirs
            self.store.remove_blobs([name])
        except BaseException as error:
            self.store.remove_blobs([name])
            self.store.reserve.raise_if_full(error, self.store.where)
            raise

    def load(self, row: Prefix, device: str) -> PrefixKV:
        """The prefix of ``row`` on ``device``, its blob checked against the row."""
        from .cachefile import read_prefix

        key = (row.payload_sha256, device)
        if key not in self._loaded:
            label = f"the shared prefix of model {row.model_name!r}"
            with BlobReader(self.store.blobs, row.blob_path, label) as reader:
                if reader.payload_sha256 != row.payload_sha256:
                    raise CorruptBlobError(f"{reader.where} holds another blob than its row records; run verify()")
                prefix = read_prefix(reader)
            self._loaded[key] = prefix if device == "cpu" else prefix.to(device)
        return self._loaded[key]
