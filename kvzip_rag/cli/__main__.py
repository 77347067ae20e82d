"""``python -m kvzip_rag.cli``: the same as the ``kvzip-rag`` command."""

from . import app

app(prog_name="kvzip-rag")
