"""kvzip-rag: answer questions about documents from KVzip-compressed KV caches.

    >>> import kvzip_rag
    >>> model = kvzip_rag.load_model()                 # SmolLM2-135M-Instruct, converted once from its GGUF
    >>> cache = kvzip_rag.compress(model, text, ratio=0.3)
    >>> kvzip_rag.answer(model, cache, "Who wrote it?").text
"""

from .cache import CacheInfo, PackedCache, PackedLayer
from .compose import ComposedCache, compose
from .compress import compress
from .errors import (
    ContextTooLongError,
    CorruptBlobError,
    EmptyDocumentError,
    InvalidArgumentError,
    KVzipError,
    ModelMismatchError,
    ModelNotFoundError,
)
from .generate import Answer, AnswerStream, Conversation, answer, stream_answer
from .models import DEFAULT_MODEL, KVzipModel, load_model, wrap_model

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_MODEL", "Answer", "AnswerStream", "CacheInfo", "ContextTooLongError", "Conversation", "CorruptBlobError",
    "EmptyDocumentError", "InvalidArgumentError", "KVzipError", "KVzipModel", "ModelMismatchError",
    "ModelNotFoundError", "PackedCache", "PackedLayer", "answer", "compress", "load_model", "stream_answer",
    "wrap_model",
]
__all__ += ["ComposedCache", "compose"]


def __getattr__(name: str):
    """``from kvzip_rag import KVzipIndex`` without importing LlamaIndex for users who never touch it."""
    if name == "KVzipIndex":
        from .integrations.llamaindex import KVzipIndex

        return KVzipIndex
    raise AttributeError(f"module 'kvzip_rag' has no attribute {name!r}")
