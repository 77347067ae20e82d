"""kvzip-rag: answer questions about documents from KVzip-compressed KV caches.

    >>> import kvzip_rag
    >>> model = kvzip_rag.load_model()                 # SmolLM2-135M-Instruct, converted once from its GGUF
    >>> cache = kvzip_rag.compress(model, text, ratio=0.3)
    >>> kvzip_rag.answer(model, cache, "Who wrote it?").text

Names are imported on first use, so ``import kvzip_rag`` (and CLI commands that need no model, such as ``ls``)
does not import torch or transformers.
"""

import importlib
import sys
import types

__version__ = "0.1.0"

_EXPORTS = {
    "CacheInfo": "cache", "PackedCache": "cache", "PackedLayer": "cache",
    "compress": "compression", "ComposedCache": "compose", "compose": "compose",
    "ContextTooLongError": "errors", "CorruptBlobError": "errors", "DocumentNotFoundError": "errors",
    "EmptyDocumentError": "errors", "InvalidArgumentError": "errors", "KVzipError": "errors",
    "ModelMismatchError": "errors", "ModelNotFoundError": "errors", "StoreError": "errors",
    "StoreFullError": "errors",
    "Answer": "generate", "AnswerStream": "generate", "Conversation": "generate", "answer": "generate",
    "stream_answer": "generate",
    "DEFAULT_MODEL": "models", "KVzipModel": "models", "load_model": "models", "wrap_model": "models",
    "QAService": "qa",
    "KVzipIndex": "integrations.llamaindex",
}

__all__ = sorted(n for n in _EXPORTS if n != "KVzipIndex")
_SAME_NAME_AS_MODULE = ("compose",)  # kvzip_rag/compose.py: the one module still named as its function


def __getattr__(name: str):
    """Import an exported name on first use (``KVzipIndex`` without importing LlamaIndex before it is needed)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvzip_rag' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    if name not in _SAME_NAME_AS_MODULE:
        globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``kvzip_rag.compose`` is the function; importing the submodule of the same name must not replace it. Goes
    when compose.py is renamed, as compress.py was (to compression.py)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _SAME_NAME_AS_MODULE and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
