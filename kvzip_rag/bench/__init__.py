"""The benchmark behind ``kvzip-rag bench``: KVzip against the full cache, other scorers, re-prefilling and chunk
retrieval, on SQuAD, needle-in-a-haystack and NarrativeQA (see BENCHMARKS.md). Entry points:
``kvzip_rag.bench.cli.run_bench`` (a function) and ``kvzip_rag.bench.cli.bench`` (a typer command)."""
