"""``kvzip-rag serve``: an OpenAI-compatible HTTP server over the QA service (``pip install 'kvzip-rag[serve]'``).

Modules: :mod:`.requests` (what a request asks, checked once), :mod:`.answers` (a request answered by the service:
pieces, then sources and grounding), :mod:`.wire` (OpenAI objects and SSE chunks), :mod:`.errors` (errors as HTTP
statuses), :mod:`.documents` (``/v1/documents``), :mod:`.app` (the FastAPI app), :mod:`.server` (uvicorn),
:mod:`.client` (``ask``/``chat --server``).
"""

from __future__ import annotations

from kvzip_rag.extras import require

for _module in ("fastapi", "uvicorn"):
    require(_module, "serve", "kvzip-rag serve")

from .app import ALIAS, create_app  # noqa: E402  (after the extra check)
from .server import DEFAULT_HOST, DEFAULT_PORT, make_server  # noqa: E402

__all__ = ["ALIAS", "DEFAULT_HOST", "DEFAULT_PORT", "create_app", "make_server"]
