"""What a KVzipIndex persists, and where its temporary store lives.

* :class:`KVzipIndexStruct`: the documents (id -> node ids), ratio, level, the model's identity and where the cache
  store lives. Registered with LlamaIndex as the ``"kvzip"`` index struct type (see the package ``__init__``), so
  ``load_index_from_storage`` recognises it.
* :class:`KVzipIndexStore`: a ``SimpleIndexStore`` that also copies the cache store of every live index using it
  into the persist dir, so ``storage_context.persist(dir)`` makes a self-contained folder.
* Temporary stores (``from_documents`` without ``store=``) live in ``$TMPDIR/kvzip-rag-indexes/<pid>-...``; they are
  removed when the index is garbage collected or the process exits, and a process killed before that leaves a
  folder that the next temporary store's creation removes (its pid is gone).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from llama_index.core.data_structs.data_structs import IndexStruct
from llama_index.core.storage.index_store.simple_index_store import SimpleIndexStore
from llama_index.core.storage.index_store.types import DEFAULT_PERSIST_PATH
from llama_index.core.storage.storage_context import StorageContext

from kvzip_rag.budget import DEFAULT_BUDGET
from kvzip_rag.errors import InvalidArgumentError

if TYPE_CHECKING:
    from kvzip_rag.store import CacheStore

    from .index import KVzipIndex

STRUCT_TYPE = "kvzip"
STORE_DIRNAME = "kvzip_store"  # the copy of the cache store inside a persist dir
TEMP_ROOT_NAME = "kvzip-rag-indexes"


@dataclass
class KVzipIndexStruct(IndexStruct):
    """What a :class:`KVzipIndex` persists: its documents (id -> node ids) and where their caches live.

    ``store_dir`` is relative to the persist dir (set when persisting a folder store); ``store_path`` is the absolute
    folder of that copy (used when no persist dir is given at load); ``store_url`` with ``blob_dir`` or ``blob_url``
    reference a store on another database or with its blobs in object storage. ``model_*`` identify the model that
    built the caches.
    """

    node_ids: Dict[str, List[str]] = field(default_factory=dict)
    ratio: float = DEFAULT_BUDGET.ratio
    level: str = DEFAULT_BUDGET.level
    kv_bits: int = 16  # of the caches this index adds (8 or 4: quantized)
    scorer: str = "kvzip"  # how the caches this index adds rank their KV pairs
    model_name: Optional[str] = None
    model_fingerprint: Optional[str] = None
    template_digest: Optional[str] = None
    store_dir: Optional[str] = None
    store_path: Optional[str] = None
    store_url: Optional[str] = None
    blob_dir: Optional[str] = None
    blob_url: Optional[str] = None

    @classmethod
    def get_type(cls) -> str:  # type: ignore[override]
        return STRUCT_TYPE

    @property
    def doc_ids(self) -> List[str]:
        return list(self.node_ids)


class KVzipIndexStore(SimpleIndexStore):
    """A ``SimpleIndexStore`` that also copies the cache store of every live :class:`KVzipIndex` using it into the
    persist dir. It reads and writes the same JSON as ``SimpleIndexStore``."""

    def __init__(self, simple_kvstore=None) -> None:
        super().__init__(simple_kvstore)
        self._kvzip_indexes: "weakref.WeakSet[KVzipIndex]" = weakref.WeakSet()

    def register(self, index: "KVzipIndex") -> None:
        """Copy ``index``'s cache store along when this index store is persisted."""
        self._kvzip_indexes.add(index)

    def persist(self, persist_path: str = DEFAULT_PERSIST_PATH, fs=None) -> None:
        if self._kvzip_indexes:
            check_local_fs(fs)
            persist_dir = os.path.dirname(os.path.abspath(os.fspath(persist_path)))
            exported: dict[str, str] = {}
            for index in list(self._kvzip_indexes):
                index.export_store(persist_dir, exported)
        super().persist(persist_path, fs=fs)


def check_local_fs(fs) -> None:
    if fs is None:
        return
    protocol = getattr(fs, "protocol", "file")
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    if not {"file", "local"} & set(protocols):
        raise InvalidArgumentError(
            f"KVzipIndex persists its cache blobs to the local file system only, not to {protocols[0]!r}: "
            "persist to a local folder and copy it"
        )


def upgrade_index_store(storage_context: StorageContext) -> None:
    """Swap a plain ``SimpleIndexStore`` for a :class:`KVzipIndexStore` over the same data (other types are left
    alone: ``index.persist()`` still copies the cache store, ``storage_context.persist()`` then only references it)."""
    if type(storage_context.index_store) is SimpleIndexStore:
        storage_context.index_store = KVzipIndexStore(storage_context.index_store._kvstore)


# ------------------------------------------------------------------------------------------------ temporary stores


def temp_root() -> Path:
    return Path(tempfile.gettempdir()) / TEMP_ROOT_NAME


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep_stale_temp_stores(root: Path | None = None) -> list[Path]:
    """Remove temporary stores whose process is gone (killed before it could clean up); returns what was removed."""
    root = root or temp_root()
    removed = []
    for folder in root.glob("*-*") if root.is_dir() else []:
        pid = folder.name.split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def make_temp_store(owner: object) -> "CacheStore":
    """A fresh store in a temporary folder, removed with ``owner`` (or at exit, or by the next process's sweep)."""
    from kvzip_rag.store import CacheStore

    root = temp_root()
    root.mkdir(parents=True, exist_ok=True)
    sweep_stale_temp_stores(root)
    folder = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=root)
    store = CacheStore(folder)
    weakref.finalize(owner, _remove_temp_store, store, folder)  # also runs at interpreter exit
    return store


def _remove_temp_store(store: "CacheStore", folder: str) -> None:
    try:
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        try:
            os.rmdir(os.path.dirname(folder))  # the shared root too, once no other temporary store is left
        except OSError:
            pass
