"""Exceptions a user can act on: each message says what was wrong and what to do."""

from __future__ import annotations


class KVzipError(Exception):
    """Base class of every error raised on purpose by kvzip-rag."""


class ModelNotFoundError(KVzipError):
    """The requested model could not be loaded from any of the places tried."""


class EmptyDocumentError(KVzipError, ValueError):
    """A document was empty or whitespace only: there is nothing to compress."""


class ContextTooLongError(KVzipError, ValueError):
    """A context does not fit the model's position range (the index segments long documents)."""


class InvalidArgumentError(KVzipError, ValueError):
    """An argument is outside its documented range (ratio, level, scorer...)."""


class ModelMismatchError(KVzipError):
    """A cache built by one model (or prompt template) was used with another."""


class CorruptBlobError(KVzipError):
    """A stored cache blob is truncated, altered or not a kvzip-rag blob."""


class DocumentNotFoundError(KVzipError, KeyError):
    """No document with the given id is stored (a ``KeyError`` too, for code that catches that)."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else "document not found"


class CacheChangedError(DocumentNotFoundError):
    """The cache routing chose is gone or holds another cache now (its document was replaced meanwhile): the
    service routes again, so an answer's sources and cache always come from one snapshot of the store."""


class StoreError(KVzipError):
    """The store cannot do what was asked (disk full, read-only, unreachable); the message names the path."""


class BlobStorageError(StoreError):
    """The object store holding the blobs refused or failed a request (credentials, permissions, network): the
    message names the URL and, for credentials, the environment variables the client reads."""


class StoreFullError(StoreError, OSError):
    """The disk holding the store is full: the message names the path and the space needed; nothing was lost."""


class PackedAttentionRequiredError(KVzipError, RuntimeError):
    """A packed cache reached an attention that cannot read it (it would attend to the new tokens alone)."""


class ClusterError(KVzipError, RuntimeError):
    """The Ray cluster could not be started or joined: the message says why (e.g. an unusable temp folder)."""


class OrphanBlobWarning(UserWarning):
    """Rows were changed (a document deleted or its caches replaced) but some of their old blobs could not be
    removed (e.g. the object store refused the delete): nothing refers to them any more, ``gc`` removes them."""


class QueueFullError(KVzipError):
    """The batch scheduler's queue of waiting answers is full: retry later, or raise ``max_queue``/``max_batch``."""


class ServiceClosedError(KVzipError):
    """The service (or its batch scheduler) was closed: answers waiting or decoding then fail with it, and so does
    every later question; open a new service."""
