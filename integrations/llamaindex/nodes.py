"""LlamaIndex nodes: one ``TextNode`` per routed segment (id ``"{doc_id}:{segment_index}"``), one per cited span.

Segment metadata is :meth:`kvzip_rag.answers.Target.as_metadata` (the same as a LangChain Document's). Cited spans
follow llama-index's ``CitationQueryEngine``: a citation node is a copy of its segment's node (metadata and source
relationship kept) whose text is the span, with a new id and the span's offsets; its score is the citation weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, List, Optional

from llama_index.core.schema import BaseNode, NodeRelationship, NodeWithScore, RelatedNodeInfo, TextNode

from kvzip_rag.answers import Citation
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAResult, Target, as_target

from ..segments import TECHNICAL_KEYS, citation_metadata


def _hidden(node: TextNode, keys: Iterable[str]) -> None:
    """Keep the adapter's keys out of what embedding models and LLM prompts see."""
    keys = [k for k in keys if k in TECHNICAL_KEYS]
    node.excluded_llm_metadata_keys = list(dict.fromkeys([*node.excluded_llm_metadata_keys, *keys]))
    node.excluded_embed_metadata_keys = list(dict.fromkeys([*node.excluded_embed_metadata_keys, *keys]))


def segment_node(doc_id: str, segment_index: int, text: str, metadata: dict) -> TextNode:
    """The node of one segment; ``metadata`` is its :meth:`Target.as_metadata`."""
    node = TextNode(id_=f"{doc_id}:{segment_index}", text=text, metadata=metadata,
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc_id)})
    _hidden(node, metadata)
    return node


def citation_node(citation: Citation, segment: Optional[NodeWithScore]) -> NodeWithScore:
    """A cited span as a source node (see the module docstring); ``segment``: its routed segment's node, if any."""
    metadata = {**(segment.node.metadata if segment is not None else {}), **citation_metadata(citation)}
    node = TextNode(id_=f"{citation.node_id}:{citation.start}-{citation.end}", text=citation.text,
                    metadata=metadata, start_char_idx=citation.start, end_char_idx=citation.end,
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=citation.doc_id)})
    _hidden(node, metadata)
    return NodeWithScore(node=node, score=citation.weight)


def targets_of(hits: Iterable[Any]) -> list[Target]:
    """Targets from nodes handed in from outside (``synthesize(nodes)``, a postprocessor's own nodes): NodeWithScores
    / nodes of a KVzipIndex, store SearchHits or ``(doc_id, segment)`` pairs."""
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
                    "hits are NodeWithScores (the retriever), store SearchHits or (doc_id, segment) pairs, "
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
        _hidden(node, role)
        out.append(NodeWithScore(node=node, score=item.score))
    return out


def source_nodes(result: Optional[QAResult], nodes: Sequence[NodeWithScore]) -> List[NodeWithScore]:
    """A response's ``source_nodes``: one node per citation of ``result`` (best first) when it has any, else the
    routed ``nodes`` marked by :func:`annotate`."""
    if result is None or not result.citations:
        return annotate(result, nodes)
    by_id = {n.node.node_id: n for n in annotate(result, nodes)}
    return [citation_node(c, by_id.get(c.node_id)) for c in result.citations]
