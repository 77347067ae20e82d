"""``kvzip-rag serve``: an OpenAI-compatible HTTP server over the QA service (``pip install 'kvzip-rag[serve]'``).

Modules: :mod:`.requests` (what a request asks, checked once), :mod:`.answers` (a request answered by the service:
pieces, then sources and grounding), :mod:`.wire` (OpenAI objects and SSE chunks), :mod:`.errors` (errors as HTTP
statuses), :mod:`.documents` (``/v1/documents``), :mod:`.app` (the FastAPI app), :mod:`.server` (uvicorn),
:mod:`.client` (``ask``/``chat --server``: httpx only, so a question through a server starts fast), :mod:`.replicas`
(``serve --ray``: the app as Ray Serve replicas). The server's
names are imported on first use, so importing the client does not import FastAPI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ALIAS", "DEFAULT_HOST", "DEFAULT_PORT", "create_app", "make_server"]


def __getattr__(name: str) -> Any:
    if name in ("ALIAS", "create_app"):
        from . import app

        return getattr(app, name)
    if name in ("DEFAULT_HOST", "DEFAULT_PORT", "make_server"):
        from . import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
