"""KVzipIndex: a LlamaIndex ``BaseIndex`` whose "embedding" of a document is its KVzip-compressed KV cache.

Each LlamaIndex ``Document`` is added whole to a :class:`kvzip_rag.store.CacheStore` (segmented only where it does
not fit the model window); each segment gets one compressed cache. Nodes are ``TextNode`` s, one per segment, id
``"{doc_id}:{segment_index}"``. Routing, loading and answering are the core service's
(:class:`kvzip_rag.qa.QAService`, ``index.qa``), scoped to this index's documents; the retriever and engines in this
package call it directly and ask the index only for its nodes (:meth:`KVzipIndex.nodes_for`). The index keeps
index concerns: documents, their nodes, persistence.

Why this module is over 400 lines: llama-index-core's ``BaseIndex`` puts construction, document insertion and
deletion, docstore bookkeeping, persistence hooks and the ``as_*`` factories on one class; the parts that are not
methods of that class live in :mod:`.persistence` and :mod:`.nodes`, and answering lives in the core service.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Dict, List, Optional

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.chat_engine.types import BaseChatEngine, ChatMode
from llama_index.core.indices.base import BaseIndex
from llama_index.core.schema import BaseNode, Document, NodeWithScore, TextNode
from llama_index.core.storage.docstore.types import RefDocInfo
from llama_index.core.storage.storage_context import DEFAULT_PERSIST_DIR, StorageContext

from kvzip_rag.bridge import run_in_thread
from kvzip_rag.budget import DEFAULT_BUDGET, Budget, CacheKind
from kvzip_rag.errors import EmptyDocumentError, InvalidArgumentError, KVzipError, ModelNotFoundError
from kvzip_rag.frontier import log_stored, pick_budget
from kvzip_rag.models import KVzipModel, check_model_arg, load_model
from kvzip_rag.quant import check_bits
from kvzip_rag.qa import QAService, Target, check_model_matches, fair_lock
from kvzip_rag.scorers import check_scorer
from kvzip_rag.store import DB_NAME, CacheStore

from ..segments import segment_metadata
from .nodes import segment_node
from .persistence import (
    STORE_DIRNAME,
    KVzipIndexStore,
    KVzipIndexStruct,
    check_local_fs,
    make_temp_store,
    upgrade_index_store,
)

logger = logging.getLogger(__name__)


def _doc_text(document: BaseNode) -> str:
    text = getattr(document, "text", None)
    if text is None:
        text = document.get_content()
    return text


def _clean_metadata(metadata: Optional[dict]) -> dict:
    """Document metadata as the store keeps it: JSON, with anything else (dates, paths...) turned into strings."""
    return json.loads(json.dumps(dict(metadata or {}), default=str))




STAGE_LABELS = {"prefill": "prefill chunks", "score": "scoring chunks", "compress": "segments"}


def document_label(document: BaseNode) -> str:
    """What a progress bar calls a document: its file name when a reader recorded one, else its id."""
    meta = document.metadata or {}
    name = meta.get("file_name") or meta.get("file_path") or meta.get("source") or document.doc_id
    from kvzip_rag.text import safe_text

    return safe_text(str(name))[:60]


def _group_nodes(nodes: Sequence[BaseNode]) -> list[Document]:
    """Nodes handed to the index directly: the nodes of one source document are joined back (in the given order)
    and compressed as one document; a node without a source is a document of its own."""
    groups: dict[str, list[BaseNode]] = {}
    for node in nodes:
        groups.setdefault(node.ref_doc_id or node.node_id, []).append(node)
    documents = []
    for doc_id, members in groups.items():
        if len(members) == 1 and isinstance(members[0], Document):
            documents.append(members[0])
            continue
        text = "\n\n".join(_doc_text(m) for m in members)
        documents.append(Document(id_=doc_id, text=text, metadata=dict(members[0].metadata)))
    return documents


def _check_no_compose(kwargs: dict) -> None:
    if "compose" in kwargs:
        raise InvalidArgumentError("compose= applies to the KVzip engines (answers from the caches); with llm= the "
                                   "segment texts are given to that LLM instead: drop one of the two")


class KVzipIndex(BaseIndex[KVzipIndexStruct]):
    """A LlamaIndex index over KVzip-compressed KV caches (see the module docstring).

    Args:
        model: a :class:`kvzip_rag.KVzipModel`, or a model alias / folder / ``.gguf`` / hub id loaded on first use
            (default: the model that built a loaded index, else :func:`kvzip_rag.load_model`'s default).
        ratio: fraction of KV pairs kept, in (0, 1] (default ``DEFAULT_BUDGET``'s, 0.3; a loaded index keeps its own
            unless given, and a lower one loads the stored caches at that ratio without re-scoring).
        level: ``"pair"`` (default), ``"uniform"`` or ``"head"``.
        kv_bits: 16 (default; a loaded index keeps its own unless given) keeps the model's dtype; 8 or 4 store the
            caches quantized (:mod:`kvzip_rag.quant`: about 3x / 5x smaller blobs). Applies to documents added from
            here on.
        scorer: how KV pairs are ranked (``kvzip`` by default, ``kvzip-fast``, ``kvzip-structure``,
            ``kvzip-value``: see :data:`kvzip_rag.scorers.SCORERS`; a loaded index keeps its own unless given).
            Applies to documents added from here on.
        store: a :class:`kvzip_rag.store.CacheStore` or a folder for one. Default: a fresh temporary folder,
            removed when the index is garbage collected (persist the index to keep its caches).
        persist_dir: where a loaded index's ``kvzip_store`` copy is looked up.
        threads: CPU threads for a model this index loads (:mod:`kvzip_rag.runtime`; also applied to a given
            model; default ``$KVZIP_RAG_THREADS``, else by load average).
        batching: concurrent queries (``aquery``, threads) decode their answers together
            (``QAService(batching=True)``, :mod:`kvzip_rag.scheduler`; off by default).
    """

    index_struct_cls = KVzipIndexStruct

    def __init__(
        self,
        nodes: Optional[Sequence[BaseNode]] = None,
        objects: Optional[Sequence[Any]] = None,
        index_struct: Optional[KVzipIndexStruct] = None,
        storage_context: Optional[StorageContext] = None,
        callback_manager: Optional[CallbackManager] = None,
        transformations: Optional[list] = None,
        show_progress: bool = False,
        *,
        model: KVzipModel | str | os.PathLike | None = None,
        ratio: Optional[float] = None,
        level: Optional[str] = None,
        kv_bits: Optional[int] = None,
        scorer: Optional[str] = None,
        store: CacheStore | str | os.PathLike | None = None,
        persist_dir: str | os.PathLike | None = None,
        threads: Optional[int] = None,
        batching: bool = False,
        **kwargs: Any,
    ) -> None:
        if objects:
            raise InvalidArgumentError("KVzipIndex indexes documents, not objects")
        check_model_arg(model)
        if index_struct is not None and not isinstance(index_struct, KVzipIndexStruct):
            raise InvalidArgumentError(f"KVzipIndex needs a KVzipIndexStruct, got {type(index_struct).__name__}")
        self.lock = fair_lock() if batching else threading.RLock()  # held around every use of the model
        self._model_arg = model
        self._model: Optional[KVzipModel] = model if isinstance(model, KVzipModel) else None  # given
        stored = index_struct if index_struct is not None else DEFAULT_BUDGET  # what is not given
        budget = Budget(stored.ratio if ratio is None else ratio, stored.level if level is None else level)
        self._ratio, self._level = budget.ratio, budget.level
        self._kv_bits = check_bits(kv_bits if kv_bits is not None
                                   else index_struct.kv_bits if index_struct is not None else 16)
        self._scorer = check_scorer(scorer if scorer is not None
                                    else index_struct.scorer if index_struct is not None else "kvzip")
        self._store = self._open_store(store, index_struct, persist_dir)
        self._qa = QAService(self._store, self._model, ratio=self._ratio, level=self._level, threads=threads,
                             scope=lambda: self.doc_ids, lock=self.lock, model_loader=self._load_model,
                             batching=batching)
        self._threads = self._qa.threads
        storage_context = storage_context or StorageContext.from_defaults(index_store=KVzipIndexStore())
        upgrade_index_store(storage_context)
        if index_struct is None and nodes is None:
            nodes = []
        super().__init__(
            nodes=nodes, index_struct=index_struct, storage_context=storage_context,
            callback_manager=callback_manager, transformations=transformations, show_progress=show_progress,
            **kwargs,
        )
        if index_struct is not None:
            index_struct.ratio, index_struct.level, index_struct.kv_bits = self._ratio, self._level, self._kv_bits
            index_struct.scorer = self._scorer
        if isinstance(self._storage_context.index_store, KVzipIndexStore):
            self._storage_context.index_store.register(self)
        if self._model is not None:
            self._check_model(self._model)

    # ------------------------------------------------------------------------------------- construction

    @classmethod
    def from_documents(  # type: ignore[override]
        cls,
        documents: Sequence[Document],
        storage_context: Optional[StorageContext] = None,
        show_progress: bool = False,
        callback_manager: Optional[CallbackManager] = None,
        transformations: Optional[list] = None,
        *,
        model: KVzipModel | str | os.PathLike | None = None,
        ratio: Optional[float] = None,
        level: Optional[str] = None,
        kv_bits: Optional[int] = None,
        scorer: Optional[str] = None,
        target_bytes: str | float | None = None,
        max_nll_loss: Optional[float] = None,
        store: CacheStore | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "KVzipIndex":
        """Compress every document (whole: segmented only where it exceeds the model window) into the store.

        The document's ``doc_id`` is its id in the store and its metadata is kept with it. ``transformations`` are
        accepted for signature compatibility and ignored (no chunking). All documents are checked before any is
        compressed: an empty list or a whitespace-only document raises at once. ``kv_bits`` 8 or 4 stores the caches
        quantized, ``scorer`` ranks the KV pairs (see the class). ``target_bytes`` (blob bytes per document token,
        or ``"0.02x"`` of the full fp16 cache) or ``max_nll_loss`` (nats) choose ratio and kv_bits, and the scorer
        unless given, from the model's measured curve instead (:mod:`kvzip_rag.frontier`; give neither ratio nor
        kv_bits then).
        """
        documents = cls._checked_documents(documents)
        point = None  # the curve point ratio and kv_bits were chosen by, if a bound was given
        if target_bytes is not None or max_nll_loss is not None:
            if scorer is not None:
                check_scorer(scorer)
            check_model_arg(model)
            if not isinstance(model, KVzipModel):  # the curve is the loaded model's
                model = load_model(model, threads=kwargs.get("threads"))
            ratio, kv_bits, scorer, point = pick_budget(model, target_bytes=target_bytes, max_nll_loss=max_nll_loss,
                                                        scorer=scorer, ratio=ratio, kv_bits=kv_bits)
        index = cls(
            nodes=[], storage_context=storage_context, callback_manager=callback_manager,
            transformations=transformations, show_progress=show_progress, model=model, ratio=ratio, level=level,
            kv_bits=kv_bits, scorer=scorer, store=store, **kwargs,
        )  # threads= travels in kwargs
        with index._callback_manager.as_trace("index_construction"):
            index._add_documents(documents, show_progress=show_progress)
        if point is not None:
            log_stored([index._store.get_document(d.doc_id) for d in documents], point, target_bytes)
        return index

    @classmethod
    def load(
        cls,
        persist_dir: str | os.PathLike = DEFAULT_PERSIST_DIR,
        model: KVzipModel | str | os.PathLike | None = None,
        *,
        index_id: Optional[str] = None,
        store: CacheStore | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "KVzipIndex":
        """The index persisted in ``persist_dir`` (by ``persist`` or ``storage_context.persist``), caches as stored.

        ``model`` defaults to the one that built the index (when it was loaded by alias or path). ``index_id``
        picks one index when the folder holds several.
        """
        folder = Path(persist_dir)
        if not (folder / "index_store.json").is_file():
            raise InvalidArgumentError(f"{folder} holds no persisted index (no index_store.json)")
        storage_context = StorageContext.from_defaults(persist_dir=str(folder))
        structs = [s for s in storage_context.index_store.index_structs() if isinstance(s, KVzipIndexStruct)]
        if index_id is not None:
            structs = [s for s in structs if s.index_id == index_id]
        if not structs:
            raise InvalidArgumentError(
                f"no KVzipIndex{' with id ' + repr(index_id) if index_id else ''} persisted in {folder}"
            )
        if len(structs) > 1:
            raise InvalidArgumentError(
                f"{folder} holds {len(structs)} KVzip indexes ({', '.join(s.index_id for s in structs)}); pass index_id="
            )
        return cls(index_struct=structs[0], storage_context=storage_context, model=model, store=store,
                   persist_dir=folder, **kwargs)

    @staticmethod
    def _checked_documents(documents: Iterable[BaseNode]) -> list[BaseNode]:
        if documents is None or isinstance(documents, (str, bytes, BaseNode)):
            raise InvalidArgumentError("from_documents takes a list of LlamaIndex Documents")
        documents = list(documents)
        if not documents:
            raise InvalidArgumentError("from_documents got an empty document list; there is nothing to index")
        texts: dict[str, str] = {}
        for position, document in enumerate(documents):
            if not isinstance(document, BaseNode):
                raise InvalidArgumentError(
                    f"document {position} is a {type(document).__name__}, not a LlamaIndex Document"
                )
            text = _doc_text(document)
            if not isinstance(text, str) or not text.strip():
                raise EmptyDocumentError(
                    f"document {document.doc_id!r} (position {position}) is empty or whitespace only; "
                    "there is nothing to compress: drop it or give it text"
                )
            if texts.setdefault(document.doc_id, text) != text:
                raise InvalidArgumentError(
                    f"two documents share the id {document.doc_id!r} with different text; give them distinct ids"
                )
        return documents

    def _open_store(self, store, struct: Optional[KVzipIndexStruct], persist_dir) -> CacheStore:
        if isinstance(store, CacheStore):
            return store
        if store is not None:
            if not isinstance(store, (str, os.PathLike)):
                raise InvalidArgumentError(
                    f"store must be a kvzip_rag.store.CacheStore or a folder, got {type(store).__name__}"
                )
            return CacheStore(store)
        if struct is not None and (struct.store_dir or struct.store_path or struct.store_url):
            tried = []
            candidates = []
            if persist_dir is not None and struct.store_dir:
                candidates.append(Path(persist_dir) / struct.store_dir)
            if struct.store_path:
                candidates.append(Path(struct.store_path))
            for folder in candidates:
                tried.append(str(folder))
                if (folder / DB_NAME).is_file():
                    return CacheStore(folder)
            if struct.store_url:
                if "***" in struct.store_url:
                    raise KVzipError(
                        "this index's cache store is on a database whose password is not persisted: pass "
                        "store=CacheStore(url=..., blob_dir=...) to load it"
                    )
                if struct.blob_url:
                    return CacheStore(url=struct.store_url, blob_url=struct.blob_url)
                return CacheStore(url=struct.store_url, blob_dir=struct.blob_dir)
            raise KVzipError(
                f"cannot find this index's cache store (looked in {', '.join(tried) or 'nothing'}): pass "
                "persist_dir= (the folder it was persisted to) or store="
            )
        return make_temp_store(self)

    # ------------------------------------------------------------------------------------- properties

    @property
    def store(self) -> CacheStore:
        return self._store

    @property
    def ratio(self) -> float:
        return self._ratio

    @property
    def kv_bits(self) -> int:
        """The bits documents added to this index are stored with (16: not quantized)."""
        return self._kv_bits

    @property
    def scorer(self) -> str:
        """How documents added to this index have their KV pairs ranked."""
        return self._scorer

    @property
    def level(self) -> str:
        return self._level

    @property
    def doc_ids(self) -> List[str]:
        return self._index_struct.doc_ids

    @property
    def kvzip_model(self) -> KVzipModel:
        """The model, loaded on first use (see the class docstring for what ``model=None`` means)."""
        return self._qa.model

    @property
    def model(self) -> KVzipModel:
        """Alias of :attr:`kvzip_model`."""
        return self.kvzip_model

    def _load_model(self) -> KVzipModel:
        spec = self._model_arg
        recorded = self._index_struct.model_name if getattr(self, "_index_struct", None) is not None else None
        if spec is None and recorded:
            try:
                model = load_model(recorded, threads=self._threads)
            except ModelNotFoundError as error:
                raise ModelNotFoundError(
                    f"this index was built with model {recorded!r}, which cannot be loaded by that name: pass "
                    f"model= (a KVzipModel or the model's path). Cause: {error}"
                ) from error
        else:
            model = load_model(os.fspath(spec) if spec is not None else None, threads=self._threads)
        self._check_model(model)
        return model

    def _check_model(self, model: KVzipModel) -> None:
        struct = getattr(self, "_index_struct", None)
        if struct is None or not struct.model_fingerprint:
            return
        check_model_matches(model, struct.model_fingerprint, struct.template_digest, struct.model_name)

    @property
    def ref_doc_info(self) -> Dict[str, RefDocInfo]:
        """Each document id with its node ids (one per segment) and the document's own metadata."""
        info = {}
        for doc_id, node_ids in self._index_struct.node_ids.items():
            record = self._store.get_document(doc_id)
            info[doc_id] = RefDocInfo(node_ids=list(node_ids), metadata=dict(record.metadata) if record else {})
        return info

    # ------------------------------------------------------------------------------------- adding documents

    def build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> KVzipIndexStruct:
        # Not BaseIndex's version: the docstore gets our per-segment nodes, not the nodes handed in.
        return self._build_index_from_nodes(nodes, **build_kwargs)

    def _build_index_from_nodes(self, nodes: Sequence[BaseNode], **build_kwargs: Any) -> KVzipIndexStruct:
        self._index_struct = KVzipIndexStruct(ratio=self._ratio, level=self._level, kv_bits=self._kv_bits,
                                              scorer=self._scorer)
        if nodes:
            self._add_documents(_group_nodes(nodes), show_progress=self._show_progress)
        return self._index_struct

    def _insert(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        self._add_documents(_group_nodes(nodes), show_progress=self._show_progress)

    def insert_nodes(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        """Nodes of one source document are joined back and compressed as that document."""
        with self._callback_manager.as_trace("insert_nodes"):
            self._insert(nodes)

    async def ainsert_nodes(self, nodes: Sequence[BaseNode], **insert_kwargs: Any) -> None:
        await run_in_thread(lambda: self.insert_nodes(nodes))

    def insert(self, document: Document, **insert_kwargs: Any) -> None:
        """Compress one document into the store (replacing this index's document of the same id)."""
        documents = self._checked_documents([document])
        with self._callback_manager.as_trace("insert"):
            self._add_documents(documents, show_progress=self._show_progress)

    async def ainsert(self, document: Document, **insert_kwargs: Any) -> None:
        await run_in_thread(lambda: self.insert(document))

    def _add_documents(self, documents: Sequence[BaseNode], show_progress: bool = False) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=len(documents), desc="Compressing documents", unit="doc", disable=not show_progress) as bar:
            for document in documents:
                name = document_label(document)

                def progress(stage: str, done: int, total: int) -> None:
                    if total > 1:
                        bar.set_postfix_str(f"{name}: {STAGE_LABELS.get(stage, stage)} {done}/{total}")

                bar.set_postfix_str(name)
                self._add_document(document, progress if show_progress else None)
                bar.update(1)

    def _add_document(self, document: BaseNode, progress=None) -> List[TextNode]:
        text = _doc_text(document)
        if not isinstance(text, str) or not text.strip():
            raise EmptyDocumentError(f"document {document.doc_id!r} is empty or whitespace only; nothing to compress")
        doc_id = document.doc_id
        metadata = _clean_metadata(document.metadata)
        struct = self._index_struct
        model = self.kvzip_model
        with self.lock:
            if not struct.model_fingerprint:
                struct.model_name = model.name
                struct.model_fingerprint = model.fingerprint
                struct.template_digest = model.template.digest
            existing = self._store.get_document(doc_id)
            mine = doc_id in struct.node_ids
            force = existing is not None and mine and existing.text != text
            record = self._store.add_document(
                model, text, doc_id=doc_id, metadata=metadata, ratio=self._ratio, level=self._level, force=force,
                progress=progress, kv_bits=self._kv_bits, scorer=self._scorer,
            )
            for old in struct.node_ids.get(doc_id, []):
                self.docstore.delete_document(old, raise_error=False)
            nodes = [n.node for n in self.nodes_for([Target(record.id, segment.index, None, segment.text,
                                                            dict(record.metadata)) for segment in record.segments])]
            self.docstore.add_documents(nodes, allow_update=True)
            self.docstore.set_document_hash(doc_id, document.hash)
            struct.node_ids[doc_id] = [n.node_id for n in nodes]
            self._storage_context.index_store.add_index_struct(struct)
        return nodes

    # ------------------------------------------------------------------------------------- removing documents

    def delete_ref_doc(self, ref_doc_id: str, delete_from_docstore: bool = False, **delete_kwargs: Any) -> None:
        """Remove a document: its store rows and cache blobs, its nodes and its docstore entries (always: the nodes
        would point at caches that no longer exist; ``delete_from_docstore`` is accepted for compatibility).
        Note that the document is removed from the store, i.e. also for other indexes sharing that store."""
        if not isinstance(ref_doc_id, str):  # an unhashable one was a TypeError from the dict lookup
            raise InvalidArgumentError(f"a ref_doc_id is a document id string, got {type(ref_doc_id).__name__}")
        struct = self._index_struct
        if ref_doc_id not in struct.node_ids:
            logger.warning(f"ref_doc_id {ref_doc_id} not found, nothing deleted.")
            return
        with self.lock:
            self._store.delete_document(ref_doc_id)
            node_ids = struct.node_ids.pop(ref_doc_id)
            for node_id in node_ids:
                self.docstore.delete_document(node_id, raise_error=False)
            self.docstore.delete_ref_doc(ref_doc_id, raise_error=False)
            self._storage_context.index_store.add_index_struct(struct)

    async def adelete_ref_doc(self, ref_doc_id: str, delete_from_docstore: bool = False, **delete_kwargs: Any) -> None:
        await run_in_thread(lambda: self.delete_ref_doc(ref_doc_id, delete_from_docstore))

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        raise NotImplementedError(
            "a KVzipIndex stores whole documents (one compressed cache per segment): delete documents with "
            "delete_ref_doc(doc_id)"
        )

    # ------------------------------------------------------------------------------------- persistence

    def persist(self, persist_dir: str | os.PathLike = DEFAULT_PERSIST_DIR, fs=None, **kwargs: Any) -> None:
        """``storage_context.persist(persist_dir)`` plus a copy of the cache store in ``persist_dir/kvzip_store``
        (a store on another database or with its blobs in object storage is referenced instead)."""
        check_local_fs(fs)
        if not isinstance(self._storage_context.index_store, KVzipIndexStore):
            self.export_store(os.path.abspath(os.fspath(persist_dir)), {})
        self._storage_context.persist(persist_dir=persist_dir, fs=fs, **kwargs)

    def export_store(self, persist_dir: str, exported: dict[str, str]) -> None:
        """Copy the cache store into ``persist_dir`` (once per store: ``exported`` maps the stores already copied
        to their folder names) or, for a store elsewhere, record its reference; called when persisting."""
        struct = self._index_struct
        with self.lock:
            store = self._store
            if store.path is None or store.blob_url is not None:  # referenced: blobs in a bucket are not copied
                if store.blob_dir is None and store.blob_url is None:
                    raise InvalidArgumentError("a KVzipIndex over a store with a custom blobs= backend cannot be "
                                               "persisted; open its store with blob_dir= or blob_url=")
                struct.store_dir = struct.store_path = None
                struct.store_url = store.engine.url.render_as_string(hide_password=True)
                struct.blob_dir = str(store.blob_dir) if store.blob_dir is not None else None
                struct.blob_url = store.blob_url
            else:
                key = str(store.path)
                name = exported.get(key)
                if name is None:
                    taken = set(exported.values())
                    name = STORE_DIRNAME
                    number = 2
                    while name in taken:
                        name, number = f"{STORE_DIRNAME}-{number}", number + 1
                    store.copy_to(Path(persist_dir) / name)
                    exported[key] = name
                struct.store_dir = name
                struct.store_path = str((Path(persist_dir) / name).resolve())
                struct.store_url = struct.blob_dir = struct.blob_url = None
            self._storage_context.index_store.add_index_struct(struct)

    # ------------------------------------------------------------------------------------- answering

    @property
    def qa(self) -> QAService:
        """The core service that routes and answers for this index (scoped to this index's documents); the
        retriever and the engines call it directly."""
        return self._qa

    def nodes_for(self, targets: Sequence[Target]) -> List[NodeWithScore]:
        """This index's nodes (with scores) for routed segments, their metadata :func:`~..segments.segment_metadata`
        (the cache this index's model answers each from)."""
        struct = self._index_struct
        model = self._model.name if self._model is not None else struct.model_name
        kind = (CacheKind(struct.model_fingerprint, struct.template_digest or "")
                if struct.model_fingerprint is not None else None)  # who built this index's caches
        return [NodeWithScore(node=segment_node(target.doc_id, target.segment_index, target.text, metadata),
                              score=float(target.score or 0.0))
                for target, metadata in zip(targets, segment_metadata(self._qa, targets, model=model, kind=kind))]

    # ------------------------------------------------------------------------------------- engines

    def as_retriever(self, similarity_top_k: int = 1, **kwargs: Any) -> BaseRetriever:
        """A LlamaIndex retriever returning one ``NodeWithScore`` per matching segment."""
        from .retriever import KVzipIndexRetriever

        return KVzipIndexRetriever(self, similarity_top_k=similarity_top_k,
                                   callback_manager=kwargs.get("callback_manager") or self._callback_manager,
                                   verbose=kwargs.get("verbose", False))

    def as_query_engine(self, llm: Any = None, streaming: bool = False, similarity_top_k: int = 1,
                        max_new_tokens: int = 128, **kwargs: Any) -> BaseQueryEngine:
        """A :class:`KVzipQueryEngine` answering from the compressed caches (``**kwargs``: ``compose`` (how
        ``similarity_top_k > 1`` caches make one answer; default ``"parallel"``), sampling options,
        ``node_postprocessors``, ``response_mode`` (see the engine), ``callback_manager``).

        Passing ``llm=`` instead builds LlamaIndex's standard ``RetrieverQueryEngine`` over this index's retriever
        (the segment texts are then given to that LLM as context; the caches are not used)."""
        if llm is not None:
            _check_no_compose(kwargs)
            return super().as_query_engine(llm=llm, streaming=streaming, similarity_top_k=similarity_top_k, **kwargs)
        from .query_engine import KVzipQueryEngine

        kwargs["callback_manager"] = kwargs.get("callback_manager") or self._callback_manager
        return KVzipQueryEngine(self, similarity_top_k=similarity_top_k, streaming=streaming,
                                max_new_tokens=max_new_tokens, **kwargs)

    def as_chat_engine(self, chat_mode: Any = None, llm: Any = None, similarity_top_k: int = 1,
                       max_new_tokens: int = 128, **kwargs: Any) -> BaseChatEngine:
        """A :class:`KVzipChatEngine` (every message routed; the conversation's cache composed over its documents,
        laid out by ``compose="parallel"|"sequential"``).

        ``llm=`` (with a LlamaIndex ``chat_mode``) builds LlamaIndex's own chat engines over this index instead."""
        if llm is not None:
            _check_no_compose(kwargs)
            return super().as_chat_engine(chat_mode=chat_mode or ChatMode.BEST, llm=llm,
                                          similarity_top_k=similarity_top_k, **kwargs)
        if chat_mode not in (None, "kvzip", ChatMode.BEST, ChatMode.BEST.value):
            raise InvalidArgumentError(
                f"chat_mode={chat_mode!r} needs an external LLM (pass llm=, e.g. KVzipLLM(index.kvzip_model)); without one "
                "the KVzip chat engine answers from the compressed caches"
            )
        from .chat_engine import KVzipChatEngine

        return KVzipChatEngine(self, similarity_top_k=similarity_top_k, max_new_tokens=max_new_tokens, **kwargs)
