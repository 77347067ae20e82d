"""What both adapters attach to a routed segment and to the evidence of an answer (no framework imported here).

A LlamaIndex node and a LangChain Document of the same segment carry the same metadata (:meth:`Target.as_metadata`
with the stored cache the service loads), and a cited span is described the same way in both
(:func:`citation_metadata`).
"""

from __future__ import annotations

from typing import Any

from kvzip_rag.answers import Citation, Target
from kvzip_rag.qa import QAService, check_sampling, matching_cache

# Answer options the adapters forward to the service unchanged, for the service to check (the grounding options of
# ``QAService.answer``: ``evidence=False``, ``abstain_threshold=``, ``abstain_text=``); everything else, quote mode's
# ``answer_style`` included, is a sampling option.
SERVICE_OPTIONS = ("evidence", "abstain_threshold", "abstain_text")

# Metadata keys the adapters write (hidden from embedding models and LLM prompts in LlamaIndex).
TECHNICAL_KEYS = (
    "doc_id", "cache_id", "segment_index", "ratio", "level", "bytes", "full_bytes", "kv_bits", "model", "score",
    "routing", "answer", "mean_logprob", "refusal", "chosen", "composed", "node_id", "start", "end", "weight",
    "citation",
)


def answer_options(options: dict) -> dict:
    """An adapter's answer options, as given when it is built: sampling options checked now (a bad name or value
    fails when the engine/chain is built, by the service's own rule), the :data:`SERVICE_OPTIONS` passed along."""
    sampling = check_sampling({k: v for k, v in options.items() if k not in SERVICE_OPTIONS})
    return {**sampling, **{k: v for k, v in options.items() if k in SERVICE_OPTIONS}}


def segment_metadata(qa: QAService, target: Target, record: Any = None, *, fingerprint: str | None = None,
                     template_digest: str | None = None, model: str | None = None) -> dict:
    """``target.as_metadata`` for the cache record the service answers it from (``record``: the stored document,
    looked up when not given; ``fingerprint``/``template_digest``: whose caches, default the loaded model's)."""
    if fingerprint is None and qa.model_loaded:
        fingerprint, template_digest = qa.model.fingerprint, qa.model.template.digest
    record = record if record is not None else qa.store.get_document(target.doc_id)
    caches = [c for c in (record.caches if record is not None else []) if c.segment_index == target.segment_index]
    cache = matching_cache(caches, fingerprint=fingerprint, template_digest=template_digest, ratio=qa.ratio,
                           level=qa.level)
    return target.as_metadata(cache, ratio=qa.ratio, level=qa.level, model=model)


def citation_metadata(citation: Citation) -> dict:
    """A cited span as source metadata: where it is (``doc_id``, ``segment_index``, character ``start``/``end`` in
    the segment's text), how much of the answer's evidence points at it (``weight``), ``citation`` True."""
    return {"doc_id": citation.doc_id, "segment_index": citation.segment_index, "start": citation.start,
            "end": citation.end, "weight": citation.weight, "citation": True}


def grounding(result: Any) -> dict:
    """``citations`` (dicts, best first) and ``abstained`` of a :class:`kvzip_rag.answers.QAResult` (or None)."""
    if result is None:
        return {"citations": [], "abstained": False}
    out = {"citations": [c.as_dict() for c in result.citations], "abstained": bool(result.abstained)}
    if result.abstained:
        out.update(candidate_answer=result.candidate, abstain_text=result.abstain_text)
    return out
