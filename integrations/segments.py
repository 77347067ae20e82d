"""What both adapters attach to a routed segment and to the evidence of an answer (no framework imported here).

A LlamaIndex node and a LangChain Document of the same segment carry the same metadata (:meth:`Target.as_metadata`
with the stored cache the service loads), and a cited span is described the same way in both
(:func:`citation_metadata`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvzip_rag.abstain import GROUNDING_OPTIONS
from kvzip_rag.answers import Citation, Target
from kvzip_rag.budget import CacheKind, select_cache
from kvzip_rag.qa import QAService

# Answer options the adapters forward to the service unchanged, for the service to check: the grounding options of
# ``QAService.answer`` (``evidence=False``, ``abstain_threshold=``, ``abstain_text=``); everything else, quote mode's
# ``answer_style`` included, is a sampling option.
SERVICE_OPTIONS = GROUNDING_OPTIONS

# Metadata keys the adapters write (hidden from embedding models and LLM prompts in LlamaIndex).
TECHNICAL_KEYS = (
    "doc_id", "cache_id", "segment_index", "ratio", "level", "bytes", "full_bytes", "kv_bits", "model", "score",
    "routing", "answer", "mean_logprob", "refusal", "chosen", "composed", "node_id", "start", "end", "weight",
    "citation",
)


def answer_options(options: dict) -> dict:
    """An adapter's answer options, as given when it is built: the sampling options are checked now by the
    service's own rule (:meth:`SamplingOptions.from_options`: a bad name or value fails when the engine/chain is
    built), and all are passed along by name for the service to take."""
    from kvzip_rag.generate import SamplingOptions  # imports torch: only when an engine or chain is built

    SamplingOptions.from_options({k: v for k, v in options.items() if k not in SERVICE_OPTIONS})
    return dict(options)


def segment_metadata(qa: QAService, targets: Sequence[Target], *, kind: CacheKind | None = None,
                     model: str | None = None) -> list[dict]:
    """``target.as_metadata`` of each routed segment, for the cache record the service answers it from
    (:func:`select_cache` at the service's budget; ``kind``: whose caches, default the loaded model's, else any
    model's); each document is read from the store once."""
    if kind is None and qa.model_loaded:
        kind = qa.kind
    records: dict[str, Any] = {}
    out = []
    for target in targets:
        if target.doc_id not in records:
            records[target.doc_id] = qa.store.get_document(target.doc_id)
        record = records[target.doc_id]
        caches = [c for c in (record.caches if record is not None else []) if c.segment_index == target.segment_index]
        out.append(target.as_metadata(select_cache(caches, kind, qa.budget), ratio=qa.ratio, level=qa.level,
                                      model=model))
    return out


def citation_metadata(citation: Citation) -> dict:
    """A cited span as source metadata: where it is (``doc_id``, ``segment_index``, character ``start``/``end`` in
    the segment's text), how much of the answer's evidence points at it (``weight``), ``citation`` True."""
    return {"doc_id": citation.doc_id, "segment_index": citation.segment_index, "start": citation.start,
            "end": citation.end, "weight": citation.weight, "citation": True}
