"""LlamaIndex nodes for routed segments, and back: one ``TextNode`` per segment, id ``"{doc_id}:{segment_index}"``."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, List, Optional

from llama_index.core.schema import BaseNode, NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAResult, Target, as_target

# Node metadata keys written by the index (hidden from embedding models and LLM prompts).
TECHNICAL_KEYS = [
    "doc_id", "cache_id", "segment_index", "ratio", "level", "bytes", "full_bytes", "model", "routing", "answer",
    "mean_logprob", "refusal", "chosen", "composed",
]


def segment_node(doc_id: str, segment_index: int, text: str, doc_metadata: dict, cache: Any, ratio: float,
                 level: str, model_name: Optional[str], routing: Optional[str] = None) -> TextNode:
    """The node of one segment; ``cache`` is the stored cache record it answers from (or None)."""
    metadata = {
        **doc_metadata,
        "doc_id": doc_id,
        "segment_index": segment_index,
        "cache_id": cache.id if cache else None,
        "ratio": ratio,
        "level": level,
        "bytes": cache.kv_nbytes if cache else None,
        "full_bytes": cache.full_nbytes if cache else None,
        "model": cache.model_name if cache else model_name,
    }
    if routing:
        metadata["routing"] = routing
    keys = [k for k in TECHNICAL_KEYS if k in metadata]
    return TextNode(
        id_=f"{doc_id}:{segment_index}", text=text, metadata=metadata,
        excluded_embed_metadata_keys=keys, excluded_llm_metadata_keys=keys,
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc_id)},
    )


def targets_of(hits: Iterable[Any]) -> list[Target]:
    """Targets from NodeWithScores / nodes of a KVzipIndex, store SearchHits or ``(doc_id, segment)`` pairs."""
    targets = []
    for hit in hits:
        if isinstance(hit, (NodeWithScore, BaseNode)):
            node = hit.node if isinstance(hit, NodeWithScore) else hit
            score = hit.score if isinstance(hit, NodeWithScore) else None
            doc_id, segment = node.metadata.get("doc_id"), node.metadata.get("segment_index")
            if doc_id is None or segment is None:
                raise InvalidArgumentError(
                    f"node {node.node_id!r} does not come from a KVzipIndex (no doc_id/segment_index metadata)"
                )
            targets.append(Target(str(doc_id), int(segment), score, node.get_content(), dict(node.metadata),
                                  node.metadata.get("routing") or "search"))
        else:
            try:
                targets.append(as_target(hit))
            except InvalidArgumentError:
                raise InvalidArgumentError(
                    "hits are SearchHits (retrieve_hits), NodeWithScores (the retriever) or (doc_id, segment) pairs, "
                    f"not {type(hit).__name__}"
                ) from None
    targets = list(dict.fromkeys(targets))
    if not targets:
        raise InvalidArgumentError("no hits to answer from (the retriever returned nothing?)")
    return targets


def annotate(result: Optional[QAResult], nodes: Sequence[NodeWithScore]) -> List[NodeWithScore]:
    """Copies of ``nodes`` with what each one did for the answer in its metadata (:meth:`QAResult.source_metadata`:
    ``composed`` in a composed answer; its own ``answer``, ``mean_logprob``, ``refusal`` and ``chosen`` otherwise);
    nodes the answer did not reach are unchanged."""
    if result is None:
        return list(nodes)
    roles = result.source_metadata()
    out = []
    for item in nodes:
        role = roles.get(item.node.node_id)
        if role is None:
            out.append(item)
            continue
        node = item.node.model_copy()
        node.metadata = {**item.node.metadata, **role}
        node.excluded_llm_metadata_keys = list(dict.fromkeys([*node.excluded_llm_metadata_keys, *role]))
        node.excluded_embed_metadata_keys = list(dict.fromkeys([*node.excluded_embed_metadata_keys, *role]))
        out.append(NodeWithScore(node=node, score=item.score))
    return out
