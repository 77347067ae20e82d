"""What the LangChain adapters share: the core service they are built on, and Documents for routed segments.

Every adapter takes ``qa=`` (a :class:`kvzip_rag.qa.QAService`, shared so one model is loaded once) or builds one
from ``store=`` (a folder or ``CacheStore``; default: the user's store) and ``model=`` (a ``KVzipModel``, an alias
or a path; loaded on first use with ``threads=``). Nothing here imports LlamaIndex.

**The link from retrieved Documents to the caches that answer** is the Documents themselves: a segment's Document
carries its cache identity in its metadata (``doc_id``, ``segment_index``: :meth:`Target.as_metadata`), and
:func:`target_of` reads it back wherever a Document travels (the QA chain's sources, or the Documents a prompt
template wrote into a prompt, which :class:`~.chat_models.ChatKVzip` reads with :func:`documents_in`).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections.abc import Callable

from langchain_core.documents import Document

from kvzip_rag.answers import QAResult
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAService, Target

from ..segments import segment_metadata


def build_service(values: dict) -> QAService:
    """The service named by an adapter's fields (``qa``, else ``store``/``model``/``threads``/``ratio``/``level``;
    ``index``: anything with a ``.qa`` service, e.g. a ``KVzipIndex``)."""
    qa = values.get("qa")
    index = values.get("index")
    if qa is None and index is not None:
        qa = getattr(index, "qa", None)
        if not isinstance(qa, QAService):
            raise InvalidArgumentError("index= must carry a kvzip_rag.qa.QAService as .qa (e.g. a KVzipIndex)")
    if qa is not None:
        if not isinstance(qa, QAService):
            raise InvalidArgumentError(f"qa= must be a kvzip_rag.qa.QAService, got {type(qa).__name__}")
        return qa
    return QAService(values.get("store"), values.get("model"), threads=values.get("threads"),
                     ratio=values.get("ratio"), level=values.get("level"))


def segment_documents(service: QAService, targets: list[Target]) -> list[Document]:
    """Documents for routed segments (page content: the segment's text; id: its node id; metadata:
    :func:`~kvzip_rag.integrations.segments.segment_metadata`, the cache the service answers it from)."""
    return [Document(page_content=target.text, id=target.node_id, metadata=metadata)
            for target, metadata in zip(targets, segment_metadata(service, targets))]


def target_of(document: Document) -> Target:
    """The segment a KVzip Document stands for (its ``doc_id``/``segment_index`` metadata)."""
    meta = document.metadata
    if "doc_id" not in meta or "segment_index" not in meta:
        raise InvalidArgumentError("a Document without doc_id/segment_index metadata is not a KVzip segment")
    return Target(str(meta["doc_id"]), int(meta["segment_index"]), meta.get("score"), document.page_content,
                  dict(meta), meta.get("routing") or "search")


def with_grounding(sources: list[Document], result: QAResult | None) -> list[Document]:
    """Sources with what the answer rests on, once it has evidence or abstained: each Document's ``citations``
    (its cited spans as dicts, best first; ``[]`` for a segment not cited) and ``abstained``."""
    if result is None or not (result.citations or result.abstained):
        return sources
    out = []
    for doc in sources:
        node_id = target_of(doc).node_id
        spans = [c.as_dict() for c in result.citations if c.node_id == node_id]
        out.append(Document(page_content=doc.page_content, id=doc.id,
                            metadata={**doc.metadata, "citations": spans, "abstained": result.abstained}))
    return out


# ------------------------------------------------------------------------------------- Documents inside a prompt

_DOCUMENT = re.compile(r"Document\(")


def _call_end(text: str, start: int) -> int | None:
    """Where the call expression starting at ``text[start]`` ends (Python's tokenizer: brackets inside string
    literals do not count), or None if it does not close."""
    line_starts, depth = [0], 0
    for line in io.StringIO(text[start:]):
        line_starts.append(line_starts[-1] + len(line))
    try:
        for token in tokenize.generate_tokens(io.StringIO(text[start:]).readline):
            if token.type != tokenize.OP or token.string not in "()[]{}":
                continue
            depth += 1 if token.string in "([{" else -1
            if depth == 0:
                row, col = token.end
                return start + line_starts[row - 1] + col
    except (tokenize.TokenError, SyntaxError):
        return None
    return None


def _parse_document(source: str) -> Document | None:
    """A ``Document(...)`` repr back into a Document (literal fields only), or None."""
    try:
        call = ast.parse(source, mode="eval").body
        fields = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}  # type: ignore[attr-defined]
    except (SyntaxError, ValueError, TypeError, AttributeError):
        return None
    if not isinstance(fields.get("page_content"), str) or not isinstance(fields.get("metadata", {}), dict):
        return None
    return Document(page_content=fields["page_content"], metadata=fields.get("metadata") or {}, id=fields.get("id"))


def documents_in(text: str, accept: Callable[[Document], bool]) -> tuple[list[Document], str]:
    """The Documents a prompt template wrote into ``text`` (the ``repr`` of a retriever's Documents, as
    ``{"context": retriever} | prompt`` formats them) that ``accept`` takes, and ``text`` with them (and the list
    brackets left empty) cut out."""
    found: list[Document] = []
    kept: list[str] = []
    position = 0
    for match in _DOCUMENT.finditer(text):
        if match.start() < position:
            continue
        end = _call_end(text, match.start())
        document = _parse_document(text[match.start():end]) if end is not None else None
        if document is None or not accept(document):
            continue
        found.append(document)
        kept.append(text[position:match.start()])
        separator = re.match(r",\s*", text[end:])  # between the Documents of a list
        position = end + (separator.end() if separator else 0)
    if not found:
        return [], text
    rest = re.sub(r"\[\s*\]", "", re.sub(r",\s*\]", "]", "".join(kept) + text[position:]))
    return found, re.sub(r"\n{3,}", "\n\n", rest).strip()
