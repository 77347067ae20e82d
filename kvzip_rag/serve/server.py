"""Running the app under uvicorn: on 127.0.0.1 by default; on SIGINT/SIGTERM it stops accepting, lets requests in
flight finish for ``grace`` seconds, then closes them (their answers stop at the next token)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import uvicorn

    from kvzip_rag.qa import QAService

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8000
DEFAULT_GRACE = 30.0


def make_server(service: QAService, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *,
                timeout: float | None = None, grace: float = DEFAULT_GRACE,
                log_level: str = "warning") -> uvicorn.Server:
    """A uvicorn server over ``service`` (``.run()`` blocks; ``should_exit = True`` stops it)."""
    import uvicorn

    from .app import create_app

    config = uvicorn.Config(create_app(service, timeout=timeout), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=int(grace) if grace else None, lifespan="off")
    return uvicorn.Server(config)
