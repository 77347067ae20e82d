"""The CLI on hostile input and failing disks: undecodable file names, FIFOs, escape sequences in ids, full disks
and database errors as one red line, `gc --now`, commands that need no model import no model stack, and messages
that name the CLI command (not a Python call)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvzip_rag.cli import app
from kvzip_rag.errors import StoreFullError
from kvzip_rag.store import CacheStore
from test_cli import HARBOUR, WIDE, tiny_model_dir  # noqa: F401  (fixture)


@pytest.fixture()
def run(tmp_path, tiny_model_dir):  # noqa: F811
    runner = CliRunner(env=WIDE)
    store = tmp_path / "store"

    def invoke(*args: str):
        result = runner.invoke(app, ["--store", str(store), "--model", str(tiny_model_dir), *args])
        assert "Traceback" not in result.output, result.output
        return result

    invoke.store = store
    return invoke


def _last_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def test_undecodable_file_name_and_fifo_do_not_stop_the_others(run, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "harbour.txt").write_text(HARBOUR)
    bad = os.fsdecode(b"caf\xe9-notes.txt")  # Latin-1 bytes: not valid UTF-8
    (folder / bad).write_text("The cafe opens at nine and serves black coffee.")
    os.mkfifo(folder / "pipe.txt")  # reading it would block forever
    result = run("index", str(folder))
    assert result.exit_code == 1, result.output
    assert "not valid UTF-8" in result.stderr and "caf\\udce9-notes.txt" in result.stderr
    assert "pipe.txt: not a regular file" in result.stderr
    assert "1 file(s) could not be indexed" in _last_error(result)
    assert "harbour.txt" in run("ls").stdout  # the good file was indexed anyway
    alone = run("index", str(folder / bad), "--id", "cafe")  # --id gives it a valid id
    assert alone.exit_code == 0, alone.output
    fifo_only = run("index", str(folder / "pipe.txt"))
    assert fifo_only.exit_code == 1 and "not a regular file" in fifo_only.stderr


def test_escape_sequences_in_ids_are_rendered_harmless(run, tmp_path):
    doc = tmp_path / "harbour.txt"
    doc.write_text(HARBOUR)
    hostile = "\x1b[2J\x1b]0;pwned\x07evil"
    assert run("index", str(doc), "--id", hostile).exit_code == 0
    for result in (run("ls"), run("ask", "Who built the harbour?", "--max-tokens", "2"), run("rm", hostile)):
        assert result.exit_code == 0, result.output
        assert "\x1b" not in result.output and "\x07" not in result.output
        assert "\\x1b[2J" in result.output


def test_disk_and_database_errors_are_one_red_line(run, tmp_path, monkeypatch):
    doc = tmp_path / "harbour.txt"
    doc.write_text(HARBOUR)
    assert run("index", str(doc)).exit_code == 0

    def full(self, *args, **kwargs):
        raise StoreFullError(f"the disk holding {self.blob_dir} is full: 1.2 MB more are needed; nothing was lost")

    monkeypatch.setattr(CacheStore, "add_document", full)
    result = run("index", str(doc), "--id", "other")
    assert result.exit_code == 1 and "is full" in result.stderr and "could not be indexed" in _last_error(result)

    import sqlalchemy.exc

    def broken(self, *args, **kwargs):
        raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database or disk is full"))

    monkeypatch.setattr(CacheStore, "list_documents", broken)
    result = run("ls")
    assert result.exit_code == 1 and _last_error(result).startswith("error:") and "disk is full" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1

    def no_space(self, *args, **kwargs):
        raise OSError(28, "No space left on device", str(self.blob_dir))

    monkeypatch.setattr(CacheStore, "gc", no_space)
    result = run("gc")
    assert result.exit_code == 1 and "No space left on device" in _last_error(result)


def test_missing_documents_and_ratio_errors_name_the_cli_command(run, tmp_path):
    doc = tmp_path / "harbour.txt"
    doc.write_text(HARBOUR)
    assert run("index", str(doc)).exit_code == 0
    for command in (["ask", "harbour?", "--doc", "nope"], ["inspect", "nope"], ["chat", "--doc", "nope"]):
        result = run(*command)
        assert result.exit_code == 1 and "no document 'nope'" in _last_error(result), command
    higher = run("ask", "Who built the harbour?", "--ratio", "0.6")
    assert higher.exit_code == 1
    line = _last_error(higher)
    assert "recompress()" not in line and "kvzip-rag index" in line and "--force" in line


def test_gc_now_removes_young_orphans(run, tmp_path):
    doc = tmp_path / "harbour.txt"
    doc.write_text(HARBOUR)
    assert run("index", str(doc)).exit_code == 0
    blobs = run.store / "blobs"
    orphan = next(blobs.rglob("*.safetensors")).with_name("orphan-0000.safetensors")
    orphan.write_bytes(b"x" * 1000)
    quiet = run("gc")
    assert quiet.exit_code == 0 and "removed 0 orphan" in quiet.stdout and orphan.exists()  # too young
    now = run("gc", "--now")
    assert now.exit_code == 0 and "removed 1 orphan" in now.stdout and not orphan.exists()
    assert "harbour.txt" in run("ls").stdout


def test_commands_without_a_model_import_no_model_stack(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        from typer.testing import CliRunner
        from kvzip_rag.cli import app
        assert "torch" not in sys.modules and "transformers" not in sys.modules, "cli import"
        for args in (["ls"], ["gc"], ["rm", "nope"]):
            CliRunner().invoke(app, ["--store", {str(tmp_path / 'store')!r}, *args])
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "cli import" not in result.stderr, result.stderr  # the CLI module itself is always light
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_cli_import_is_light():
    script = "import sys; from kvzip_rag.cli import app; import kvzip_rag; import kvzip_rag.store; " \
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_killed_from_documents_leaves_no_temporary_store_behind(tmp_path, tiny_model_dir):  # noqa: F811
    script = textwrap.dedent(f"""
        import os
        from llama_index.core import Document
        from kvzip_rag import KVzipIndex
        import kvzip_rag
        model = kvzip_rag.load_model({str(tiny_model_dir)!r}, threads=1)
        index = KVzipIndex.from_documents([Document(text="The harbour was built in 1731.", id_="h")], model=model)
        print(index.store.path, flush=True)
        os._exit(0)  # killed: no finalizer, no atexit
    """)
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    left = Path(first.stdout.strip().splitlines()[-1])
    assert left.is_dir() and left.parent.name == "kvzip-rag-indexes", first.stderr[-2000:]
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert not left.exists()  # the next temporary store swept the dead process's folder
