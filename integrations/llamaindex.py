"""LlamaIndex integration: an index whose "embedding" of a document is its KVzip-compressed KV cache.

    >>> from llama_index.core import SimpleDirectoryReader
    >>> from kvzip_rag import KVzipIndex
    >>> documents = SimpleDirectoryReader("docs/").load_data()
    >>> index = KVzipIndex.from_documents(documents, ratio=0.3)       # prefill + score + evict, once per document
    >>> index.as_query_engine().query("Who built the harbour?")        # answered from the compressed cache
    >>> index.persist("storage/")                                      # cache blobs travel with the folder
    >>> index = KVzipIndex.load("storage/")                            # no recompression

How it maps onto LlamaIndex
---------------------------
* :class:`KVzipIndex` is a real ``BaseIndex``. Each LlamaIndex ``Document`` is added whole to a
  :class:`kvzip_rag.store.CacheStore` (no ``SentenceSplitter``: a document is only segmented where it does not fit
  the model window); each segment gets one compressed cache. The index struct (:class:`KVzipIndexStruct`) records
  the document ids, their node ids, ratio, level, the model's identity and where the store lives.
* Nodes are ``TextNode`` s, one per segment, with the stable id ``"{doc_id}:{segment_index}"`` and metadata
  ``doc_id, cache_id, segment_index, ratio, bytes, ...`` plus the document's own metadata.
* :class:`KVzipIndexRetriever` routes a question to segments with the store's full-text index (BM25 on SQLite).
  When no word of the question matches anything, it falls back to the index's first segments (score ``0.0``,
  ``metadata["routing"] == "fallback"``) so that a query engine still answers from something.
* :class:`KVzipQueryEngine` loads the selected compressed cache(s) and answers from them with
  :func:`kvzip_rag.answer` / :func:`kvzip_rag.stream_answer`. The model runs behind ``index.lock`` (an ``RLock``);
  ``aquery`` and streaming run it in a worker thread so the event loop is never blocked.
* :class:`KVzipChatEngine` routes the first message, then keeps the conversation in that cache
  (:class:`kvzip_rag.Conversation`); ``reset()`` drops the turns, back to the compressed document.

``similarity_top_k > 1`` (query engine, and the first message of a chat)
------------------------------------------------------------------------
Caches are never concatenated (each was compressed for its own segment). Instead every retrieved cache answers
the question separately, in retrieval-score order, and one answer is returned: the best by mean token
log-probability of the answer under the model (a teacher-forced pass over the same cache), where answers that
are refusals ("not mentioned in the context", empty, ...) rank below every real answer. All retrieved nodes are
attached to the response as ``source_nodes`` (in retrieval order), each with its own answer in
``node.metadata["answer"]`` / ``["mean_logprob"]`` / ``["refusal"]`` / ``["chosen"]``, and
``response.metadata["answers"]`` lists them all; ``response.metadata["chosen_node_id"]`` names the winner.
With streaming and ``similarity_top_k > 1`` the choice needs every candidate first, so the stream starts once all
candidates are generated and then yields the chosen answer's pieces; with ``similarity_top_k=1`` (the default)
tokens are yielded live as they are generated.

Persistence
-----------
``index.persist(dir)`` and ``index.storage_context.persist(dir)`` both write the usual LlamaIndex JSON files and a
copy of the cache store in ``dir/kvzip_store`` (SQLite snapshot via the backup API, blobs hard-linked when possible,
else copied), so the folder is self-contained and can be moved. A store on another database (a SQLAlchemy URL)
is referenced, not copied. ``KVzipIndex.load(dir, model=...)`` and ``load_index_from_storage(
StorageContext.from_defaults(persist_dir=dir), model=..., persist_dir=dir)`` bring the index back without
recompressing (importing this module registers the ``"kvzip"`` index struct type with LlamaIndex).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from llama_index.core.base.base_query_engine import BaseQueryEngine
from llama_index.core.base.base_retriever import BaseRetriever
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole
from llama_index.core.base.response.schema import (
    RESPONSE_TYPE,
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.callbacks.base import CallbackManager
from llama_index.core.chat_engine.types import (
    AgentChatResponse,
    BaseChatEngine,
    ChatMode,
    StreamingAgentChatResponse,
)
from llama_index.core.data_structs.data_structs import IndexStruct
from llama_index.core.data_structs.registry import INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS
from llama_index.core.indices.base import BaseIndex
from llama_index.core.indices.registry import INDEX_STRUCT_TYPE_TO_INDEX_CLASS
from llama_index.core.schema import (
    BaseNode,
    Document,
    NodeRelationship,
    NodeWithScore,
    QueryBundle,
    RelatedNodeInfo,
    TextNode,
)
from llama_index.core.storage.docstore.types import RefDocInfo
from llama_index.core.storage.index_store.simple_index_store import SimpleIndexStore
from llama_index.core.storage.index_store.types import DEFAULT_PERSIST_PATH
from llama_index.core.storage.storage_context import DEFAULT_PERSIST_DIR, StorageContext

from kvzip_rag.budget import check_ratio_level
from kvzip_rag.errors import (
    EmptyDocumentError,
    InvalidArgumentError,
    KVzipError,
    ModelMismatchError,
    ModelNotFoundError,
)
from kvzip_rag.generate import Answer, Conversation, SamplingOptions, stream_answer
from kvzip_rag.models import KVzipModel, load_model
from kvzip_rag.store import DB_NAME, CacheStore, SearchHit

__all__ = [
    "CacheAnswer", "EmptyIndexError", "HitsAnswer", "HitsAnswerStream", "KVzipChatEngine", "KVzipIndex",
    "KVzipIndexRetriever", "KVzipIndexStore", "KVzipIndexStruct", "KVzipQueryEngine", "STORE_DIRNAME",
    "is_refusal",
]

logger = logging.getLogger(__name__)

STRUCT_TYPE = "kvzip"
STORE_DIRNAME = "kvzip_store"  # the copy of the cache store inside a persist dir
_BLOBS = "blobs"
# Node metadata keys written by the index (hidden from embedding models and LLM prompts).
_TECHNICAL_KEYS = [
    "doc_id", "cache_id", "segment_index", "ratio", "level", "bytes", "full_bytes", "model", "routing", "answer",
    "mean_logprob", "refusal", "chosen",
]


class EmptyIndexError(KVzipError, ValueError):
    """A question was asked of an index that holds no document yet."""


# ------------------------------------------------------------------------------------------------- index struct


@dataclass
class KVzipIndexStruct(IndexStruct):
    """What a :class:`KVzipIndex` persists: its documents (id -> node ids) and where their caches live.

    ``store_dir`` is relative to the persist dir (set when persisting a folder store); ``store_path`` is the absolute
    folder of that copy (used when no persist dir is given at load); ``store_url``/``blob_dir`` reference a store on
    another database. ``model_*`` identify the model that built the caches.
    """

    node_ids: Dict[str, List[str]] = field(default_factory=dict)
    ratio: float = 0.3
    level: str = "pair"
    model_name: Optional[str] = None
    model_fingerprint: Optional[str] = None
    template_digest: Optional[str] = None
    store_dir: Optional[str] = None
    store_path: Optional[str] = None
    store_url: Optional[str] = None
    blob_dir: Optional[str] = None

    @classmethod
    def get_type(cls) -> str:  # type: ignore[override]
        return STRUCT_TYPE

    @property
    def doc_ids(self) -> List[str]:
        return list(self.node_ids)


class KVzipIndexStore(SimpleIndexStore):
    """A ``SimpleIndexStore`` that also copies the cache store of every live :class:`KVzipIndex` using it into the
    persist dir, so that ``storage_context.persist(dir)`` makes a self-contained folder. It reads and writes the same
    JSON as ``SimpleIndexStore``."""

    def __init__(self, simple_kvstore=None) -> None:
        super().__init__(simple_kvstore)
        self._kvzip_indexes: "weakref.WeakSet[KVzipIndex]" = weakref.WeakSet()

    def _register(self, index: "KVzipIndex") -> None:
        self._kvzip_indexes.add(index)

    def persist(self, persist_path: str = DEFAULT_PERSIST_PATH, fs=None) -> None:
        if self._kvzip_indexes:
            _check_local_fs(fs)
            persist_dir = os.path.dirname(os.path.abspath(os.fspath(persist_path)))
            exported: dict[str, str] = {}
            for index in list(self._kvzip_indexes):
                index._export_store(persist_dir, exported)
        super().persist(persist_path, fs=fs)


def _check_local_fs(fs) -> None:
    if fs is None:
        return
    protocol = getattr(fs, "protocol", "file")
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    if not {"file", "local"} & set(protocols):
        raise InvalidArgumentError(
            f"KVzipIndex persists its cache blobs to the local file system only, not to {protocols[0]!r}: "
            "persist to a local folder and copy it"
        )


def _upgrade_index_store(storage_context: StorageContext) -> None:
    """Swap a plain ``SimpleIndexStore`` for a :class:`KVzipIndexStore` over the same data (other types are left
    alone: ``index.persist()`` still copies the cache store, ``storage_context.persist()`` then only references it)."""
    if type(storage_context.index_store) is SimpleIndexStore:
        storage_context.index_store = KVzipIndexStore(storage_context.index_store._kvstore)


def _remove_temp_store(store: CacheStore, folder: str) -> None:
    try:
        store.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ answers


_REFUSAL = re.compile(
    r"\b(i (do not|don't|cannot|can't|could not|couldn't) (know|find|answer|say|determine|tell)"
    r"|not (mentioned|stated|specified|provided|given|available|included|found|clear)"
    r"|no (information|mention|answer)"
    r"|(context|text|passage|document|article) (does not|doesn't|did not|didn't)"
    r"|unable to (answer|determine|find|say)|cannot be (determined|answered)|unanswerable|insufficient information)\b",
    re.IGNORECASE,
)


def is_refusal(text: str) -> bool:
    """True for an empty answer or one saying the context does not tell (used to rank best-of-k answers)."""
    return not text.strip() or bool(_REFUSAL.search(text))


@dataclass(frozen=True)
class _Target:
    """One segment to answer from."""

    doc_id: str
    segment_index: int
    score: Optional[float] = None
    node_id: Optional[str] = None


@dataclass
class CacheAnswer:
    """The answer one cache gave, and what it cost."""

    doc_id: str
    segment_index: int
    node_id: str
    score: Optional[float]  # retrieval score
    answer: Answer
    pieces: List[str] = field(repr=False)
    mean_logprob: Optional[float]  # mean log-probability of the answer tokens, reported by the engine
    refusal: bool
    cache_load_s: float
    bytes_loaded: int  # bytes read from disk (0 when served from the store's in-memory LRU)
    cache_nbytes: int  # bytes of the loaded compressed cache's keys and values
    full_nbytes: int
    kept_ratio: float

    @property
    def text(self) -> str:
        return self.answer.text

    def as_dict(self) -> dict:
        return {
            "node_id": self.node_id, "doc_id": self.doc_id, "segment_index": self.segment_index,
            "score": self.score, "answer": self.text, "mean_logprob": self.mean_logprob, "refusal": self.refusal,
            "cache_load_s": self.cache_load_s, "bytes_loaded": self.bytes_loaded, "cache_bytes": self.cache_nbytes,
            "full_bytes": self.full_nbytes, "kept_ratio": self.kept_ratio,
            "ttft_s": self.answer.time_to_first_token_s, "decode_s": self.answer.decode_s,
            "answer_tokens": len(self.answer.token_ids), "prompt_tokens": self.answer.prompt_tokens,
            "finish_reason": self.answer.finish_reason,
        }


@dataclass
class HitsAnswer:
    """The answer to one question from one or more caches (see the module docstring for ``k > 1``)."""

    question: str
    answers: List[CacheAnswer]
    chosen: int  # index into ``answers``
    ratio: float
    level: str
    generate_s: float  # wall time of loading, answering (and scoring) every cache

    @property
    def best(self) -> CacheAnswer:
        return self.answers[self.chosen]

    @property
    def text(self) -> str:
        return self.best.text

    @property
    def cache_load_s(self) -> float:
        return sum(a.cache_load_s for a in self.answers)

    @property
    def bytes_loaded(self) -> int:
        return sum(a.bytes_loaded for a in self.answers)

    def metadata(self, retrieve_s: Optional[float] = None) -> dict:
        """Response metadata: ``cache_load_s`` and ``bytes_loaded`` are totals over every cache answered;
        ``ttft_s`` (question prefill to first token), ``decode_s``, ``kept_ratio`` and token counts are those of the
        chosen answer; ``answers`` has every cache's answer and figures."""
        best = self.best
        data = {
            "retrieve_s": retrieve_s,
            "cache_load_s": self.cache_load_s,
            "ttft_s": best.answer.time_to_first_token_s,
            "decode_s": best.answer.decode_s,
            "generate_s": self.generate_s,
            "bytes_loaded": self.bytes_loaded,
            "cache_bytes": best.cache_nbytes,
            "full_bytes": best.full_nbytes,
            "ratio": self.ratio,
            "level": self.level,
            "kept_ratio": best.kept_ratio,
            "answer_tokens": len(best.answer.token_ids),
            "prompt_tokens": best.answer.prompt_tokens,
            "finish_reason": best.answer.finish_reason,
            "chosen_node_id": best.node_id,
            "strategy": "single" if len(self.answers) == 1 else "best-mean-logprob",
            "answers": [a.as_dict() for a in self.answers],
        }
        return data

    def annotate(self, nodes: Sequence[NodeWithScore]) -> List[NodeWithScore]:
        """Copies of ``nodes`` with each one's own answer in its metadata (nodes without an answer unchanged)."""
        by_id = {a.node_id: a for a in self.answers}
        out = []
        for item in nodes:
            found = by_id.get(item.node.node_id)
            if found is None:
                out.append(item)
                continue
            node = item.node.model_copy()
            node.metadata = {
                **item.node.metadata, "answer": found.text, "mean_logprob": found.mean_logprob,
                "refusal": found.refusal, "chosen": found is self.best,
            }
            added = ["answer", "mean_logprob", "refusal", "chosen"]
            node.excluded_llm_metadata_keys = list(dict.fromkeys(list(node.excluded_llm_metadata_keys) + added))
            node.excluded_embed_metadata_keys = list(dict.fromkeys(list(node.excluded_embed_metadata_keys) + added))
            out.append(NodeWithScore(node=node, score=item.score))
        return out


def _choose(answers: Sequence[CacheAnswer]) -> int:
    """Non-refusals first, then the highest mean log-probability, then the best retrieval rank."""
    def key(item):
        position, a = item
        logprob = a.mean_logprob if a.mean_logprob is not None else float("-inf")
        return (not a.refusal, logprob, -position)

    return max(enumerate(answers), key=key)[0]


_DONE = object()


def _thread_pieces(work: Callable[[Callable[[str], None]], None]) -> Iterator[str]:
    """Run ``work(emit)`` in a worker thread (started at the first ``next``) and yield what it emits."""
    pipe: queue.Queue = queue.Queue()
    failure: list[BaseException] = []

    def run():
        try:
            work(pipe.put)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            failure.append(error)
        finally:
            pipe.put(_DONE)

    threading.Thread(target=run, name="kvzip-answer", daemon=True).start()
    while True:
        item = pipe.get()
        if item is _DONE:
            break
        yield item
    if failure:
        raise failure[0]


async def _athread_pieces(work: Callable[[Callable[[str], None]], None]) -> AsyncIterator[str]:
    """``_thread_pieces`` for asyncio: the model runs in a worker thread, the event loop only awaits a queue."""
    loop = asyncio.get_running_loop()
    pipe: asyncio.Queue = asyncio.Queue()
    failure: list[BaseException] = []

    def emit(piece):
        loop.call_soon_threadsafe(pipe.put_nowait, piece)

    def run():
        try:
            work(emit)
        except BaseException as error:  # noqa: BLE001 - re-raised in the consumer
            failure.append(error)
        finally:
            loop.call_soon_threadsafe(pipe.put_nowait, _DONE)

    threading.Thread(target=run, name="kvzip-answer", daemon=True).start()
    while True:
        item = await pipe.get()
        if item is _DONE:
            break
        yield item
    if failure:
        raise failure[0]


class HitsAnswerStream:
    """Text pieces of :meth:`KVzipIndex.answer_hits`'s answer as they are produced (``for`` or ``async for``; the
    model runs in a worker thread behind the index lock). ``result`` holds the :class:`HitsAnswer` afterwards."""

    def __init__(self, index: "KVzipIndex", question: str, targets: list[_Target], sampling: dict):
        self._index, self._question, self._targets, self._sampling = index, question, targets, sampling
        self.result: Optional[HitsAnswer] = None
        self._started = False

    def _work(self, emit: Callable[[str], None]) -> None:
        self.result = self._index._answer_targets(self._question, self._targets, self._sampling, emit)

    def _claim(self) -> None:
        if self._started:
            raise InvalidArgumentError("an answer stream can be iterated only once")
        self._started = True

    def __iter__(self) -> Iterator[str]:
        self._claim()
        return _thread_pieces(self._work)

    def __aiter__(self) -> AsyncIterator[str]:
        self._claim()
        return _athread_pieces(self._work)


# ------------------------------------------------------------------------------------------------ the index


def _doc_text(document: BaseNode) -> str:
    text = getattr(document, "text", None)
    if text is None:
        text = document.get_content()
    return text


def _clean_metadata(metadata: Optional[dict]) -> dict:
    """Document metadata as the store keeps it: JSON, with anything else (dates, paths...) turned into strings."""
    return json.loads(json.dumps(dict(metadata or {}), default=str))


def _node_id(doc_id: str, segment_index: int) -> str:
    return f"{doc_id}:{segment_index}"


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


class KVzipIndex(BaseIndex[KVzipIndexStruct]):
    """A LlamaIndex index over KVzip-compressed KV caches (see the module docstring).

    Args:
        model: a :class:`kvzip_rag.KVzipModel`, or a model alias / folder / ``.gguf`` / hub id loaded on first use
            (default: the model that built a loaded index, else :func:`kvzip_rag.load_model`'s default).
        ratio: fraction of KV pairs kept, in (0, 1] (default 0.3; a loaded index keeps its own unless given, and
            a lower one loads the stored caches at that ratio without re-scoring).
        level: ``"pair"`` (default), ``"uniform"`` or ``"head"``.
        store: a :class:`kvzip_rag.store.CacheStore` or a folder for one. Default: a fresh temporary folder,
            removed when the index is garbage collected (persist the index to keep its caches).
        persist_dir: where a loaded index's ``kvzip_store`` copy is looked up.
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
        store: CacheStore | str | os.PathLike | None = None,
        persist_dir: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        if objects:
            raise InvalidArgumentError("KVzipIndex indexes documents, not objects")
        if model is not None and not isinstance(model, (KVzipModel, str, os.PathLike)):
            raise InvalidArgumentError(
                "model must be a kvzip_rag.KVzipModel (see kvzip_rag.load_model / wrap_model) or a model name/path, "
                f"got {type(model).__name__}"
            )
        if index_struct is not None and not isinstance(index_struct, KVzipIndexStruct):
            raise InvalidArgumentError(f"KVzipIndex needs a KVzipIndexStruct, got {type(index_struct).__name__}")
        self.lock = threading.RLock()  # held around every use of the model
        self._model_arg = model
        self._model: Optional[KVzipModel] = model if isinstance(model, KVzipModel) else None
        if ratio is None:
            ratio = index_struct.ratio if index_struct is not None else 0.3
        if level is None:
            level = index_struct.level if index_struct is not None else "pair"
        check_ratio_level(ratio, level)
        self._ratio, self._level = float(ratio), level
        self._store, temp_dir = self._open_store(store, index_struct, persist_dir)
        if temp_dir is not None:
            weakref.finalize(self, _remove_temp_store, self._store, temp_dir)
        storage_context = storage_context or StorageContext.from_defaults(index_store=KVzipIndexStore())
        _upgrade_index_store(storage_context)
        if index_struct is None and nodes is None:
            nodes = []
        super().__init__(
            nodes=nodes, index_struct=index_struct, storage_context=storage_context,
            callback_manager=callback_manager, transformations=transformations, show_progress=show_progress,
            **kwargs,
        )
        if index_struct is not None:
            index_struct.ratio, index_struct.level = self._ratio, self._level
        if isinstance(self._storage_context.index_store, KVzipIndexStore):
            self._storage_context.index_store._register(self)
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
        ratio: float = 0.3,
        level: str = "pair",
        store: CacheStore | str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> "KVzipIndex":
        """Compress every document (whole: segmented only where it exceeds the model window) into the store.

        The document's ``doc_id`` is its id in the store and its metadata is kept with it. ``transformations`` are
        accepted for signature compatibility and ignored (no chunking). All documents are checked before any is
        compressed: an empty list or a whitespace-only document raises at once.
        """
        documents = cls._checked_documents(documents)
        index = cls(
            nodes=[], storage_context=storage_context, callback_manager=callback_manager,
            transformations=transformations, show_progress=show_progress, model=model, ratio=ratio, level=level,
            store=store, **kwargs,
        )
        with index._callback_manager.as_trace("index_construction"):
            index._add_documents(documents, show_progress=show_progress)
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

    def _open_store(self, store, struct: Optional[KVzipIndexStruct], persist_dir) -> tuple[CacheStore, Optional[str]]:
        if isinstance(store, CacheStore):
            return store, None
        if store is not None:
            if not isinstance(store, (str, os.PathLike)):
                raise InvalidArgumentError(
                    f"store must be a kvzip_rag.store.CacheStore or a folder, got {type(store).__name__}"
                )
            return CacheStore(store), None
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
                    return CacheStore(folder), None
            if struct.store_url:
                if "***" in struct.store_url:
                    raise KVzipError(
                        "this index's cache store is on a database whose password is not persisted: pass "
                        "store=CacheStore(url=..., blob_dir=...) to load it"
                    )
                return CacheStore(url=struct.store_url, blob_dir=struct.blob_dir), None
            raise KVzipError(
                f"cannot find this index's cache store (looked in {', '.join(tried) or 'nothing'}): pass "
                "persist_dir= (the folder it was persisted to) or store="
            )
        folder = tempfile.mkdtemp(prefix="kvzip-index-")
        return CacheStore(folder), folder

    # ------------------------------------------------------------------------------------- properties

    @property
    def store(self) -> CacheStore:
        return self._store

    @property
    def ratio(self) -> float:
        return self._ratio

    @property
    def level(self) -> str:
        return self._level

    @property
    def doc_ids(self) -> List[str]:
        return self._index_struct.doc_ids

    @property
    def kvzip_model(self) -> KVzipModel:
        """The model, loaded on first use (see the class docstring for what ``model=None`` means)."""
        if self._model is None:
            with self.lock:
                if self._model is None:
                    self._model = self._load_model()
        return self._model

    @property
    def model(self) -> KVzipModel:
        """Alias of :attr:`kvzip_model`."""
        return self.kvzip_model

    def _load_model(self) -> KVzipModel:
        spec = self._model_arg
        recorded = self._index_struct.model_name if getattr(self, "_index_struct", None) is not None else None
        if spec is None and recorded:
            try:
                model = load_model(recorded)
            except ModelNotFoundError as error:
                raise ModelNotFoundError(
                    f"this index was built with model {recorded!r}, which cannot be loaded by that name: pass "
                    f"model= (a KVzipModel or the model's path). Cause: {error}"
                ) from error
        else:
            model = load_model(os.fspath(spec) if spec is not None else None)
        self._check_model(model)
        return model

    def _check_model(self, model: KVzipModel) -> None:
        struct = getattr(self, "_index_struct", None)
        if struct is None or not struct.model_fingerprint:
            return
        if (model.fingerprint, model.template.digest) != (struct.model_fingerprint, struct.template_digest):
            raise ModelMismatchError(
                f"this index was built by model {struct.model_name!r} (fingerprint {struct.model_fingerprint}) but "
                f"the given model is {model.name!r} (fingerprint {model.fingerprint}); load that model or rebuild "
                "the index"
            )

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
        self._index_struct = KVzipIndexStruct(ratio=self._ratio, level=self._level)
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
        await asyncio.to_thread(self.insert_nodes, nodes)

    def insert(self, document: Document, **insert_kwargs: Any) -> None:
        """Compress one document into the store (replacing this index's document of the same id)."""
        documents = self._checked_documents([document])
        with self._callback_manager.as_trace("insert"):
            self._add_documents(documents, show_progress=self._show_progress)

    async def ainsert(self, document: Document, **insert_kwargs: Any) -> None:
        await asyncio.to_thread(self.insert, document)

    def _add_documents(self, documents: Sequence[BaseNode], show_progress: bool = False) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=len(documents), desc="Compressing documents", unit="doc", disable=not show_progress) as bar:
            for document in documents:
                def progress(stage: str, done: int, total: int) -> None:
                    if total > 1:
                        bar.set_postfix_str(f"{stage} segment {done}/{total}")

                bar.set_postfix_str(str(document.doc_id)[:40])
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
                progress=progress,
            )
            for old in struct.node_ids.get(doc_id, []):
                self.docstore.delete_document(old, raise_error=False)
            nodes = [self._segment_node(record.id, segment.index, segment.text, record.metadata, model=model,
                                        record=record) for segment in record.segments]
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
        await asyncio.to_thread(self.delete_ref_doc, ref_doc_id, delete_from_docstore)

    def _delete_node(self, node_id: str, **delete_kwargs: Any) -> None:
        raise NotImplementedError(
            "a KVzipIndex stores whole documents (one compressed cache per segment): delete documents with "
            "delete_ref_doc(doc_id)"
        )

    # ------------------------------------------------------------------------------------- persistence

    def persist(self, persist_dir: str | os.PathLike = DEFAULT_PERSIST_DIR, fs=None, **kwargs: Any) -> None:
        """``storage_context.persist(persist_dir)`` plus a copy of the cache store in ``persist_dir/kvzip_store``
        (a store on another database is referenced instead)."""
        _check_local_fs(fs)
        if not isinstance(self._storage_context.index_store, KVzipIndexStore):
            self._export_store(os.path.abspath(os.fspath(persist_dir)), {})
        self._storage_context.persist(persist_dir=persist_dir, fs=fs, **kwargs)

    def _export_store(self, persist_dir: str, exported: dict[str, str]) -> None:
        struct = self._index_struct
        with self.lock:
            store = self._store
            if store.path is None:
                struct.store_dir = struct.store_path = None
                struct.store_url = store.engine.url.render_as_string(hide_password=True)
                struct.blob_dir = str(store.blob_dir)
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
                struct.store_url = struct.blob_dir = None
            self._storage_context.index_store.add_index_struct(struct)

    # ------------------------------------------------------------------------------------- retrieval

    def _require_documents(self) -> None:
        if not self._index_struct.node_ids:
            raise EmptyIndexError(
                "this index holds no documents: add some with KVzipIndex.from_documents(...) or index.insert(...) "
                "before asking questions"
            )

    def retrieve_hits(self, query: str, k: int = 1, doc_ids: Optional[Sequence[str]] = None) -> List[SearchHit]:
        """The ``k`` segments of this index's documents (or of ``doc_ids`` among them) that best match ``query``
        (store full-text search, best first). When nothing matches, the first ``k`` segments with score ``0.0``
        (a fallback)."""
        return self._search(query, k, doc_ids)[0]

    def _scope(self, doc_ids: Optional[Sequence[str]]) -> list[str]:
        """The documents a search may return: the index's, or the given subset of them."""
        if doc_ids is None:
            return self.doc_ids
        doc_ids = [doc_ids] if isinstance(doc_ids, str) else list(doc_ids)
        known = set(self.doc_ids)
        missing = [d for d in doc_ids if d not in known]
        if missing or not doc_ids:
            raise InvalidArgumentError(f"doc_ids must name documents of this index; unknown: {missing or doc_ids}")
        return doc_ids

    def _search(self, query: str, k: int, doc_ids: Optional[Sequence[str]] = None) -> tuple[List[SearchHit], bool]:
        self._require_documents()
        if not isinstance(query, str) or not query.strip():
            raise InvalidArgumentError("the query is empty")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidArgumentError(f"k (similarity_top_k) must be a positive integer, got {k!r}")
        scope = self._scope(doc_ids)
        hits = self._store.search(query, k=k, doc_ids=scope)
        if hits:
            return hits, False
        fallback: list[SearchHit] = []
        for doc_id in scope:
            record = self._store.get_document(doc_id)
            if record is None:
                continue
            for segment in record.segments:
                fallback.append(SearchHit(doc_id, segment.id, segment.index, 0.0, segment.text, dict(record.metadata)))
                if len(fallback) >= k:
                    return fallback, True
        return fallback, True

    def _cache_record_for(self, doc_id: str, segment_index: int, record=None):
        """The stored cache this index answers from for one segment (None if there is none)."""
        struct = self._index_struct
        caches = record.caches if record is not None else self._store.caches_for(doc_id, segment=segment_index)
        mine = [c for c in caches if c.segment_index == segment_index]
        if struct.model_fingerprint:
            mine = [c for c in mine if c.model_fingerprint == struct.model_fingerprint
                    and c.template_digest == struct.template_digest]
        usable = [c for c in mine if c.ratio + 1e-9 >= self._ratio and c.level == self._level] or mine
        if not usable:
            return None
        return min(usable, key=lambda c: (c.level != self._level, c.ratio, -c.id))

    def _segment_node(self, doc_id: str, segment_index: int, text: str, doc_metadata: dict, model=None,
                      record=None, routing: Optional[str] = None) -> TextNode:
        cache = self._cache_record_for(doc_id, segment_index, record)
        metadata = {
            **doc_metadata,
            "doc_id": doc_id,
            "segment_index": segment_index,
            "cache_id": cache.id if cache else None,
            "ratio": self._ratio,
            "level": self._level,
            "bytes": cache.kv_nbytes if cache else None,
            "full_bytes": cache.full_nbytes if cache else None,
            "model": cache.model_name if cache else (model.name if model else None),
        }
        if routing:
            metadata["routing"] = routing
        keys = [k for k in _TECHNICAL_KEYS if k in metadata]
        return TextNode(
            id_=_node_id(doc_id, segment_index),
            text=text,
            metadata=metadata,
            excluded_embed_metadata_keys=keys,
            excluded_llm_metadata_keys=keys,
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc_id)},
        )

    def retrieve_nodes(self, query: str, k: int = 1, doc_ids: Optional[Sequence[str]] = None) -> List[NodeWithScore]:
        """:meth:`retrieve_hits` as LlamaIndex nodes (what the retriever returns)."""
        hits, fallback = self._search(query, k, doc_ids)
        routing = "fallback" if fallback else None
        records: dict[str, Any] = {}
        out = []
        for hit in hits:
            if hit.document_id not in records:
                records[hit.document_id] = self._store.get_document(hit.document_id)
            node = self._segment_node(hit.document_id, hit.segment_index, hit.text, dict(hit.metadata),
                                      record=records[hit.document_id], routing=routing)
            out.append(NodeWithScore(node=node, score=float(hit.score)))
        return out

    # ------------------------------------------------------------------------------------- answers

    @staticmethod
    def _targets(hits: Iterable[Any]) -> list[_Target]:
        targets, seen = [], set()
        for hit in hits:
            if isinstance(hit, SearchHit):
                target = _Target(hit.document_id, hit.segment_index, hit.score,
                                 _node_id(hit.document_id, hit.segment_index))
            elif isinstance(hit, (NodeWithScore, BaseNode)):
                node = hit.node if isinstance(hit, NodeWithScore) else hit
                score = hit.score if isinstance(hit, NodeWithScore) else None
                doc_id, segment = node.metadata.get("doc_id"), node.metadata.get("segment_index")
                if doc_id is None or segment is None:
                    raise InvalidArgumentError(
                        f"node {node.node_id!r} does not come from a KVzipIndex (no doc_id/segment_index metadata)"
                    )
                target = _Target(str(doc_id), int(segment), score, node.node_id)
            elif isinstance(hit, tuple) and len(hit) == 2:
                target = _Target(str(hit[0]), int(hit[1]), None, _node_id(str(hit[0]), int(hit[1])))
            else:
                raise InvalidArgumentError(
                    "hits are SearchHits (retrieve_hits), NodeWithScores (the retriever) or (doc_id, segment) pairs, "
                    f"not {type(hit).__name__}"
                )
            key = (target.doc_id, target.segment_index)
            if key not in seen:
                seen.add(key)
                targets.append(target)
        if not targets:
            raise InvalidArgumentError("no hits to answer from (retrieve_hits returned nothing?)")
        return targets

    def answer_hits(self, question: str, hits: Sequence[Any], **sampling: Any) -> HitsAnswer:
        """Answer ``question`` from the cache of each hit (in the given order) and keep the best answer.

        ``hits``: SearchHits from :meth:`retrieve_hits`, NodeWithScores from the retriever, or ``(doc_id, segment)``
        pairs. ``sampling``: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``.
        One hit: its answer. Several: each cache answers separately; non-refusals beat refusals, then the highest
        mean token log-probability wins (see the module docstring). Runs in the calling thread, behind the lock.
        """
        return self._answer_targets(question, self._targets(hits), self._check_sampling(sampling))

    def stream_hits(self, question: str, hits: Sequence[Any], **sampling: Any) -> HitsAnswerStream:
        """Like :meth:`answer_hits`, as a stream of text pieces (``for`` or ``async for``); the model runs in a
        worker thread. With one hit pieces arrive as generated; with several, after the choice."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidArgumentError("the question is empty")
        return HitsAnswerStream(self, question, self._targets(hits), self._check_sampling(sampling))

    @staticmethod
    def _check_sampling(sampling: dict) -> dict:
        try:
            SamplingOptions(**sampling)
        except TypeError as error:
            raise InvalidArgumentError(
                f"unknown answer option ({error}); use max_new_tokens, temperature, top_k, top_p, seed or stop"
            ) from error
        return dict(sampling)

    def load_hit_cache(self, hit: Any):
        """``(PackedCache, seconds, bytes read)`` for one hit: a fresh cache object (its own empty tail), e.g. for a
        :class:`kvzip_rag.Conversation`. Take ``index.lock`` around any use of it with the model."""
        target = self._targets([hit])[0]
        model = self.kvzip_model
        start = time.perf_counter()
        cache = self._store.load_cache(target.doc_id, model, segment=target.segment_index, ratio=self._ratio,
                                       level=self._level)
        return cache, time.perf_counter() - start, self._store.last_read_nbytes

    def _answer_targets(self, question: str, targets: list[_Target], sampling: dict,
                        emit: Optional[Callable[[str], None]] = None) -> HitsAnswer:
        if not isinstance(question, str) or not question.strip():
            raise InvalidArgumentError("the question is empty")
        self._require_documents()
        model = self.kvzip_model
        several = len(targets) > 1
        answers: list[CacheAnswer] = []
        start = time.perf_counter()
        with self.lock:
            for target in targets:
                cache, load_s, nbytes = self.load_hit_cache((target.doc_id, target.segment_index))
                stream = stream_answer(model, cache, question, **sampling)
                pieces = []
                for piece in stream:
                    pieces.append(piece)
                    if emit is not None and not several:
                        emit(piece)
                result = stream.result
                answers.append(CacheAnswer(
                    doc_id=target.doc_id, segment_index=target.segment_index,
                    node_id=target.node_id or _node_id(target.doc_id, target.segment_index), score=target.score,
                    answer=result, pieces=pieces, mean_logprob=result.mean_logprob, refusal=is_refusal(result.text),
                    cache_load_s=load_s, bytes_loaded=nbytes, cache_nbytes=cache.nbytes,
                    full_nbytes=cache.full_nbytes, kept_ratio=cache.kept_ratio,
                ))
        chosen = _choose(answers) if several else 0
        if emit is not None and several:
            for piece in answers[chosen].pieces:
                emit(piece)
        return HitsAnswer(question, answers, chosen, self._ratio, self._level, time.perf_counter() - start)

    # ------------------------------------------------------------------------------------- engines

    def as_retriever(self, similarity_top_k: int = 1, **kwargs: Any) -> "KVzipIndexRetriever":
        """A LlamaIndex retriever returning one ``NodeWithScore`` per matching segment (see the module docstring)."""
        return KVzipIndexRetriever(self, similarity_top_k=similarity_top_k,
                                   callback_manager=kwargs.get("callback_manager") or self._callback_manager,
                                   verbose=kwargs.get("verbose", False))

    def as_query_engine(self, llm: Any = None, streaming: bool = False, similarity_top_k: int = 1,
                        max_new_tokens: int = 128, **kwargs: Any) -> BaseQueryEngine:
        """A :class:`KVzipQueryEngine` answering from the compressed caches (``**kwargs``: sampling options
        ``temperature``, ``top_k``, ``top_p``, ``seed``, ``stop``).

        Passing ``llm=`` instead builds LlamaIndex's standard ``RetrieverQueryEngine`` over this index's retriever
        (the segment texts are then given to that LLM as context; the caches are not used)."""
        if llm is not None:
            return super().as_query_engine(llm=llm, streaming=streaming, similarity_top_k=similarity_top_k, **kwargs)
        return KVzipQueryEngine(self, similarity_top_k=similarity_top_k, streaming=streaming,
                                max_new_tokens=max_new_tokens, **kwargs)

    def as_chat_engine(self, chat_mode: Any = None, llm: Any = None, similarity_top_k: int = 1,
                       max_new_tokens: int = 128, **kwargs: Any) -> BaseChatEngine:
        """A :class:`KVzipChatEngine` (follow-ups answered from the cache the first message was routed to).

        ``llm=`` (with a LlamaIndex ``chat_mode``) builds LlamaIndex's own chat engines over this index instead."""
        if llm is not None:
            return super().as_chat_engine(chat_mode=chat_mode or ChatMode.BEST, llm=llm,
                                          similarity_top_k=similarity_top_k, **kwargs)
        if chat_mode not in (None, "kvzip", ChatMode.BEST, ChatMode.BEST.value):
            raise InvalidArgumentError(
                f"chat_mode={chat_mode!r} needs an external LLM (pass llm=); without one the KVzip chat engine "
                "answers from the compressed caches"
            )
        return KVzipChatEngine(self, similarity_top_k=similarity_top_k, max_new_tokens=max_new_tokens, **kwargs)


# ------------------------------------------------------------------------------------------------ retriever


class KVzipIndexRetriever(BaseRetriever):
    """Routes a query to this index's segments (store full-text search); see :meth:`KVzipIndex.retrieve_nodes`."""

    def __init__(self, index: KVzipIndex, similarity_top_k: int = 1,
                 callback_manager: Optional[CallbackManager] = None, verbose: bool = False) -> None:
        if isinstance(similarity_top_k, bool) or not isinstance(similarity_top_k, int) or similarity_top_k < 1:
            raise InvalidArgumentError(f"similarity_top_k must be a positive integer, got {similarity_top_k!r}")
        self._index = index
        self.similarity_top_k = similarity_top_k
        super().__init__(callback_manager=callback_manager, verbose=verbose)

    @property
    def index(self) -> KVzipIndex:
        return self._index

    def _retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self._index.retrieve_nodes(query_bundle.query_str, self.similarity_top_k)

    async def _aretrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return await asyncio.to_thread(self._retrieve, query_bundle)


# ------------------------------------------------------------------------------------------------ query engine


class KVzipQueryEngine(BaseQueryEngine):
    """Retrieve the segment(s), load their compressed caches and answer from them.

    ``query``/``aquery`` return a ``Response`` (``StreamingResponse`` / ``AsyncStreamingResponse`` with
    ``streaming=True``) with ``source_nodes`` and metadata: ``retrieve_s``, ``cache_load_s``, ``ttft_s``,
    ``decode_s``, ``bytes_loaded``, ``ratio``, ``kept_ratio`` and more (see :meth:`HitsAnswer.metadata`; a
    streaming response's metadata is filled in when the stream ends). ``similarity_top_k > 1``: every retrieved
    cache answers and the best answer is kept (module docstring). ``aquery`` runs the model in a worker thread.
    """

    def __init__(self, index: KVzipIndex, similarity_top_k: int = 1, streaming: bool = False,
                 callback_manager: Optional[CallbackManager] = None, **sampling: Any) -> None:
        self._index = index
        self._sampling = index._check_sampling(sampling)
        self._retriever = index.as_retriever(similarity_top_k=similarity_top_k)
        self._streaming = streaming
        super().__init__(callback_manager=callback_manager or index._callback_manager)

    @property
    def index(self) -> KVzipIndex:
        return self._index

    @property
    def retriever(self) -> KVzipIndexRetriever:
        return self._retriever

    def _get_prompt_modules(self) -> dict:
        return {}

    def retrieve(self, query_bundle: QueryBundle) -> List[NodeWithScore]:
        return self._retriever.retrieve(query_bundle)

    def synthesize(self, query_bundle: QueryBundle, nodes: List[NodeWithScore],
                   additional_source_nodes: Optional[Sequence[NodeWithScore]] = None) -> RESPONSE_TYPE:
        """Answer from the caches of ``nodes`` (KVzipIndex nodes); additional source nodes are attached as is."""
        return self._respond(query_bundle.query_str, nodes, None, additional_source_nodes, asynchronous=False)

    async def asynthesize(self, query_bundle: QueryBundle, nodes: List[NodeWithScore],
                          additional_source_nodes: Optional[Sequence[NodeWithScore]] = None) -> RESPONSE_TYPE:
        return await self._arespond(query_bundle.query_str, nodes, None, additional_source_nodes)

    def _query(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        start = time.perf_counter()
        nodes = self._retriever.retrieve(query_bundle)
        return self._respond(query_bundle.query_str, nodes, time.perf_counter() - start, None, asynchronous=False)

    async def _aquery(self, query_bundle: QueryBundle) -> RESPONSE_TYPE:
        start = time.perf_counter()
        nodes = await self._retriever.aretrieve(query_bundle)
        return await self._arespond(query_bundle.query_str, nodes, time.perf_counter() - start, None)

    def _respond(self, question: str, nodes: List[NodeWithScore], retrieve_s: Optional[float],
                 extra: Optional[Sequence[NodeWithScore]], asynchronous: bool) -> RESPONSE_TYPE:
        extra = list(extra or [])
        if not self._streaming:
            result = self._index.answer_hits(question, nodes, **self._sampling)
            return Response(result.text, source_nodes=result.annotate(nodes) + extra,
                            metadata=result.metadata(retrieve_s))
        stream = self._index.stream_hits(question, nodes, **self._sampling)
        metadata: dict = {"retrieve_s": retrieve_s, "ratio": self._index.ratio, "level": self._index.level}
        source_nodes: list = list(nodes) + extra

        def finish() -> None:
            if stream.result is not None:
                metadata.update(stream.result.metadata(retrieve_s))
                source_nodes[: len(nodes)] = stream.result.annotate(nodes)

        if asynchronous:
            async def agen():
                async for piece in stream:
                    yield piece
                finish()

            return AsyncStreamingResponse(response_gen=agen(), source_nodes=source_nodes, metadata=metadata)

        def gen():
            yield from stream
            finish()

        return StreamingResponse(response_gen=gen(), source_nodes=source_nodes, metadata=metadata)

    async def _arespond(self, question: str, nodes: List[NodeWithScore], retrieve_s: Optional[float],
                        extra: Optional[Sequence[NodeWithScore]]) -> RESPONSE_TYPE:
        if self._streaming:
            return self._respond(question, nodes, retrieve_s, extra, asynchronous=True)
        return await asyncio.to_thread(self._respond, question, nodes, retrieve_s, extra, False)


# ------------------------------------------------------------------------------------------------ chat engine


class KVzipChatEngine(BaseChatEngine):
    """Follow-up questions about one document, answered from its compressed cache.

    The first message is routed (``similarity_top_k`` caches; with more than one, the cache whose answer wins as
    in the query engine) and the conversation then stays in that cache: every turn is appended to the cache's
    tail (:class:`kvzip_rag.Conversation`), so "and what about his brother?" works. ``reset()`` drops the turns
    (back to the compressed document) and the next message is routed afresh. Passing ``chat_history`` replaces the
    conversation with that history (routed by its first user message, then replayed into the cache; system
    messages are ignored). Responses carry the routed ``source_nodes`` and timing metadata.
    """

    def __init__(self, index: KVzipIndex, similarity_top_k: int = 1, **sampling: Any) -> None:
        self._index = index
        self._sampling = index._check_sampling(sampling)
        self._retriever = index.as_retriever(similarity_top_k=similarity_top_k)
        self._conversation: Optional[Conversation] = None
        self._source_nodes: List[NodeWithScore] = []
        self._history: List[ChatMessage] = []
        self._routed_by: Optional[str] = None
        self._pending_replay: Optional[list[tuple[str, str]]] = None

    @property
    def index(self) -> KVzipIndex:
        return self._index

    @property
    def conversation(self) -> Optional[Conversation]:
        """The live conversation (None before the first message and after ``reset()``)."""
        return self._conversation

    @property
    def chat_history(self) -> List[ChatMessage]:
        return list(self._history)

    def reset(self) -> None:
        with self._index.lock:
            if self._conversation is not None:
                self._conversation.reset()
            self._conversation = None
            self._source_nodes = []
            self._history = []
            self._routed_by = None
            self._pending_replay = None

    # -------------------------------------------------------------------------------- turns

    def _prepare(self, message: str, chat_history: Optional[List[ChatMessage]]) -> None:
        """Route (retrieval only, no model) and adopt a given history; runs before any generation starts."""
        if not isinstance(message, str) or not message.strip():
            raise InvalidArgumentError("the message is empty")
        if chat_history is not None and _pairs(chat_history) != _pairs(self._history):
            self.reset()
            pairs = _pairs(chat_history)
            if pairs:
                self._route(pairs[0][0])
                self._pending_replay = pairs
        if not self._source_nodes:
            self._route(message)

    def _route(self, message: str) -> None:
        self._source_nodes = self._retriever.retrieve(message)
        self._routed_by = message

    def _turn(self, message: str, emit: Optional[Callable[[str], None]] = None) -> tuple[str, dict]:
        index = self._index
        model = index.kvzip_model
        with index.lock:
            info: dict = {}
            if self._conversation is None:
                replay = self._pending_replay
                self._pending_replay = None
                if len(self._source_nodes) > 1 and not replay:
                    # best-of-k for the first message, then the conversation continues in the winning cache
                    result = index._answer_targets(message, index._targets(self._source_nodes), self._sampling, emit)
                    self._source_nodes = result.annotate(self._source_nodes)
                    best = result.best
                    cache, load_s, nbytes = index.load_hit_cache((best.doc_id, best.segment_index))
                    self._conversation = Conversation(model, cache)
                    _replay(model, self._conversation, [(message, best.text)])
                    self._history += [ChatMessage(role=MessageRole.USER, content=message),
                                      ChatMessage(role=MessageRole.ASSISTANT, content=best.text)]
                    meta = result.metadata()
                    meta["cache_load_s"] += load_s
                    meta["bytes_loaded"] += nbytes
                    return best.text, meta
                chosen = self._source_nodes[0]
                cache, load_s, nbytes = index.load_hit_cache(chosen)
                self._conversation = Conversation(model, cache)
                info.update(cache_load_s=load_s, bytes_loaded=nbytes, cache_bytes=cache.nbytes,
                            full_bytes=cache.full_nbytes, kept_ratio=cache.kept_ratio)
                if replay:
                    _replay(model, self._conversation, replay)
                    self._history = [m for q, a in replay for m in (
                        ChatMessage(role=MessageRole.USER, content=q),
                        ChatMessage(role=MessageRole.ASSISTANT, content=a))]
            else:
                info.update(cache_load_s=0.0, bytes_loaded=0)
            conversation = self._conversation
            first = not conversation.turns
            prompt_tokens = len(model.encode(model.template.question_text(message, first_turn=first)))
            needed = conversation.cache.get_seq_length() + prompt_tokens + SamplingOptions(**self._sampling).max_new_tokens
            if needed > model.max_positions:
                raise KVzipError(
                    f"the conversation would reach {needed} positions but model {model.name!r} takes at most "
                    f"{model.max_positions}: call reset() to start again from the compressed document"
                )
            stream = conversation.stream(message, **self._sampling)
            for piece in stream:
                if emit is not None:
                    emit(piece)
            result = stream.result
            self._history += [ChatMessage(role=MessageRole.USER, content=message),
                              ChatMessage(role=MessageRole.ASSISTANT, content=result.text)]
            info.update(
                ttft_s=result.time_to_first_token_s, decode_s=result.decode_s, ratio=index.ratio, level=index.level,
                answer_tokens=len(result.token_ids), prompt_tokens=result.prompt_tokens,
                finish_reason=result.finish_reason, turns=len(conversation.turns),
                cache_positions=conversation.cache.get_seq_length(),
            )
            return result.text, info

    # -------------------------------------------------------------------------------- BaseChatEngine

    def chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        with self._index.lock:
            self._prepare(message, chat_history)
            text, info = self._turn(message)
        return AgentChatResponse(response=text, source_nodes=list(self._source_nodes), metadata=info)

    async def achat(self, message: str, chat_history: Optional[List[ChatMessage]] = None) -> AgentChatResponse:
        return await asyncio.to_thread(self.chat, message, chat_history)

    def _chat_stream(self, pieces: Iterable[str], response: StreamingAgentChatResponse):
        text = ""
        for piece in pieces:
            text += piece
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
        response.source_nodes[:] = self._source_nodes

    def stream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                    ) -> StreamingAgentChatResponse:
        with self._index.lock:
            self._prepare(message, chat_history)
        metadata: dict = {}

        def work(emit):
            _, info = self._turn(message, emit)
            metadata.update(info)

        response = StreamingAgentChatResponse(source_nodes=list(self._source_nodes), is_writing_to_memory=False)
        response.metadata = metadata  # filled in when the stream ends
        response.chat_stream = self._chat_stream(_thread_pieces(work), response)
        return response

    async def astream_chat(self, message: str, chat_history: Optional[List[ChatMessage]] = None
                           ) -> StreamingAgentChatResponse:
        await asyncio.to_thread(self._locked_prepare, message, chat_history)
        metadata: dict = {}

        def work(emit):
            _, info = self._turn(message, emit)
            metadata.update(info)

        response = StreamingAgentChatResponse(source_nodes=list(self._source_nodes), is_writing_to_memory=False)
        response.metadata = metadata

        async def achat_stream():
            text = ""
            async for piece in _athread_pieces(work):
                text += piece
                yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
            response.source_nodes[:] = self._source_nodes

        response.achat_stream = achat_stream()
        return response

    def _locked_prepare(self, message: str, chat_history: Optional[List[ChatMessage]]) -> None:
        with self._index.lock:
            self._prepare(message, chat_history)


def _pairs(history: Sequence[ChatMessage]) -> list[tuple[str, str]]:
    """(user, assistant) turns of a chat history; system messages are dropped, an unanswered user turn too."""
    pairs, question = [], None
    for message in history:
        role = message.role.value if hasattr(message.role, "value") else str(message.role)
        content = message.content or ""
        if role == "user":
            question = content
        elif role == "assistant" and question is not None:
            pairs.append((question, content))
            question = None
    return pairs


def _replay(model: KVzipModel, conversation: Conversation, pairs: Sequence[tuple[str, str]]) -> None:
    """Append given (question, answer) turns to a conversation's cache as if they had been generated."""
    for question, answer in pairs:
        conversation.add_turn(question, answer)


# Let LlamaIndex's own loaders (load_index_from_storage, index stores) recognise the "kvzip" index struct.
INDEX_STRUCT_TYPE_TO_INDEX_STRUCT_CLASS[STRUCT_TYPE] = KVzipIndexStruct  # type: ignore[index]
INDEX_STRUCT_TYPE_TO_INDEX_CLASS[STRUCT_TYPE] = KVzipIndex  # type: ignore[index]
