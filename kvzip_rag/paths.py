"""Where kvzip-rag keeps its data by default (torch-free, so light commands can ask)."""

from __future__ import annotations

import os
from pathlib import Path

STORE_ENV = "KVZIP_RAG_STORE"


def default_store_path() -> Path:
    """``$KVZIP_RAG_STORE``, else ``store/`` in the user data dir."""
    env = os.environ.get(STORE_ENV)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_data_dir("kvzip-rag")) / "store"
