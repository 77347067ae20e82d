"""Every example runs as is, with the real default model, and cleans up after itself; `kvzip-rag demo` runs end to
end twice (the second run reuses the stored caches)."""

from __future__ import annotations

import os
import subprocess
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"

pytestmark = pytest.mark.slow


def run(args: list[str], tmp_path: Path, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    # torch's inductor cache dir (made when transformers imports torch._dynamo) is torch's, not the example's
    environment = {**os.environ, "COLUMNS": "200", "TMPDIR": str(tmp_path),
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path.parent / "torchinductor"), **env}
    for name in ("STORE", "DB", "MODEL", "RATIO", "LEVEL", "DEVICE"):  # the user's settings never leak in
        environment.pop(f"KVZIP_RAG_{name}", None)
    result = subprocess.run(args, cwd=ROOT, env=environment, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def test_llamaindex_quickstart(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "llamaindex_quickstart.py")], tmp_path).stdout
    assert "indexed 3 documents at ratio 0.3" in out
    assert "source town_history.md" in out  # the founder question was routed to the town history
    assert "source espresso_manual.md" in out  # so was the streamed tank question, to the manual
    assert out.count("kvzip: ") == 2 and "after reload ->" in out
    assert not [p for p in tmp_path.iterdir()], "the example left files behind"


def test_langchain_chain(tmp_path):
    out = run([sys.executable, str(EXAMPLES / "langchain_chain.py")], tmp_path).stdout
    assert "sources: ['town_history.md']" in out
    assert "streamed: " in out and "prompt | chain:" in out and out.count("batch: ") == 2
    assert "batch: {'question': 'Who founded the town of Wrenfield?', 'answer': " in out
    assert "answered from 2 cached segment(s)" in out and "follow-up: " in out  # the idiomatic chain, cached
    assert not [p for p in tmp_path.iterdir()], "the example left files behind"


def test_cli_walkthrough(tmp_path):
    result = run(["bash", str(EXAMPLES / "cli_walkthrough.sh")], tmp_path,
                 KVZIP_RAG_CLI=f"{sys.executable} -m kvzip_rag.cli")
    out, err = result.stdout, result.stderr
    assert out.count("espresso_manual.md") >= 3 and "removed recipes.txt" in out
    assert "budgets.png" in out and "tokens.html" in out
    assert "ratio 0.15" in err and "turn 2" in err
    assert "error: no document 'no-such-document'" in err and "(exit code 1)" in out
    assert not [p for p in tmp_path.iterdir()], "the walkthrough left its temp store behind"


def test_demo_end_to_end_and_rerun(tmp_path):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "kvzip_rag.cli", "demo", "--store", str(store)]
    first = run(command, tmp_path)
    out = first.stdout
    assert out.count("expected:") == 6 and "Summary" in out
    assert "questions routed to the right document" in out and "6/6" in out
    # Q6: the soup simmers 40 minutes in the recipes; the default model says "20 minutes to 30 minutes"
    assert "Not in the documents: 20 " in first.stderr  # with the evidence, under the answer
    assert re.search(r"numbers not in the documents\s*│\s*Q6 \(20\)", out), out[-1500:]
    assert "smaller" in out and "first token" in out and "tok/s" in out
    assert (store / "index.sqlite").exists()
    # A second run reuses the three stored caches (no recompression).
    second = run([*command, "--max-tokens", "4"], tmp_path)
    assert second.stdout.count("reused") == 3
