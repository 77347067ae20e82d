"""``kvzip-rag``: index documents into compressed KV caches, then ask questions about them.

    kvzip-rag demo                                   # index examples/docs and answer examples/docs/questions.json
    kvzip-rag index notes/ manual.pdf                # .txt .md .html .htm .pdf, files and folders
    kvzip-rag ask "How do I descale the machine?"    # streams the answer, then sources, timings, compression
    kvzip-rag ask "..." --k 3                        # one answer from 3 routed caches joined (as similarity_top_k=3)
    kvzip-rag chat                                   # follow-up questions about one document
    kvzip-rag serve --port 8000                      # an OpenAI-compatible server; ask/chat --server URL use it
    kvzip-rag ls | rm DOC_ID | gc [--now] | inspect DOC_ID --out pictures/

Options that apply to every command may go before or after the command name; each has an environment variable:
``--store`` / ``KVZIP_RAG_STORE``, ``--db`` / ``KVZIP_RAG_DB``, ``--blob-url`` / ``KVZIP_RAG_BLOB_URL``,
``--blob-timeout`` / ``KVZIP_RAG_BLOB_TIMEOUT``, ``--model`` / ``KVZIP_RAG_MODEL``, ``--ratio`` /
``KVZIP_RAG_RATIO``, ``--level`` / ``KVZIP_RAG_LEVEL``, ``--device`` / ``KVZIP_RAG_DEVICE``, ``--threads`` /
``KVZIP_RAG_THREADS``, ``--matmul`` / ``KVZIP_RAG_MATMUL``. Errors a user can fix print one red line on stderr and exit with code 1 (usage errors: 2).

Modules: :mod:`.app` (the Typer app; the global options, declared once), :mod:`.settings` (store, model, error boundary),
:mod:`.output` (safe rendering), :mod:`.files`, :mod:`.progress`, and the commands: :mod:`.store_commands`
(``ls``, ``rm``, ``gc``: no model, no torch import of ours), :mod:`.indexing`, :mod:`.answering` (``ask``,
``chat``: the core QA service), :mod:`.serving` (``serve``; ``ask``/``chat --server``), :mod:`.tools` (``inspect``, ``demo``, ``bench``). Answering goes through
:class:`kvzip_rag.qa.QAService`, as the LlamaIndex and LangChain adapters do.
"""

from . import answering, calibrate, indexing, serving, store_commands, tools  # noqa: F401  (registers the commands)
from .app import app
from .files import collect_files, extract_text
from .settings import CLIError, Settings

__all__ = ["CLIError", "Settings", "app", "collect_files", "extract_text"]

if __name__ == "__main__":  # pragma: no cover
    app()
