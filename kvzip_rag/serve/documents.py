"""``/v1/documents``: add a text (prefilled and compressed by the server's model), list, show and delete documents
of the server's store."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request

from kvzip_rag.errors import DocumentNotFoundError, InvalidArgumentError

if TYPE_CHECKING:
    from kvzip_rag.qa import QAService
    from kvzip_rag.store import DocumentRecord

ADD_FIELDS = ("text", "doc_id", "metadata", "force")


def summary(record: DocumentRecord) -> dict:
    """A stored document as the API shows it (its text is not repeated)."""
    return {"id": record.id, "object": "document", "metadata": dict(record.metadata),
            "created": int(record.created.timestamp()), "segments": len(record.segments),
            "tokens": record.token_count, "chars": len(record.text)}


def add_arguments(body: Any) -> dict:
    """The ``add_document`` arguments of a request body (the store checks their values)."""
    if not isinstance(body, Mapping):
        raise InvalidArgumentError("the request body must be a JSON object")
    unknown = sorted(set(body) - set(ADD_FIELDS))
    if unknown:
        raise InvalidArgumentError(f"unknown field(s) {', '.join(unknown)}; use {', '.join(ADD_FIELDS)}")
    if not isinstance(body.get("text"), str):
        raise InvalidArgumentError("text is required: the document's text")
    if body.get("doc_id") is not None and not isinstance(body["doc_id"], str):
        raise InvalidArgumentError(f"doc_id must be a string, got {body['doc_id']!r}")
    if body.get("metadata") is not None and not isinstance(body["metadata"], Mapping):
        raise InvalidArgumentError("metadata must be an object")
    if not isinstance(body.get("force", False), bool):
        raise InvalidArgumentError("force must be true or false")
    return {"doc_id": body.get("doc_id"), "metadata": body.get("metadata"), "force": body.get("force", False)}


def router(service: QAService, read_body) -> APIRouter:
    """The routes over ``service``'s store; adding takes the model lock (prefill and compression use the model)."""
    routes = APIRouter(prefix="/v1/documents")
    store = service.store

    def add(text: str, arguments: dict) -> DocumentRecord:
        with service.lock:
            return store.add_document(service.model, text, **arguments)

    @routes.post("", status_code=201)
    async def add_document(request: Request) -> dict:
        body = await read_body(request)
        arguments = add_arguments(body)
        return summary(await asyncio.to_thread(add, body["text"], arguments))

    @routes.get("")
    async def list_documents(limit: int | None = None, offset: int = 0) -> dict:
        records = await asyncio.to_thread(store.list_documents, limit=limit, offset=offset)
        return {"object": "list", "data": [summary(r) for r in records]}

    @routes.get("/{doc_id}")
    async def get_document(doc_id: str) -> dict:
        record = await asyncio.to_thread(store.get_document, doc_id)
        if record is None:
            raise DocumentNotFoundError(f"no document {doc_id!r} in {service.describe()}")
        return summary(record)

    @routes.delete("/{doc_id}")
    async def delete_document(doc_id: str) -> dict:
        if not await asyncio.to_thread(store.delete_document, doc_id):
            raise DocumentNotFoundError(f"no document {doc_id!r} in {service.describe()}")
        return {"id": doc_id, "object": "document.deleted", "deleted": True}

    return routes
