"""The second round of hostile input and faults (issue 21, items 3, 5, 6, 7): ``verify`` names every damaged
document and never hangs, text in other encodings is decoded as written (or refused), object storage that is down
or refuses deletes, reads that must create nothing, a Ray cluster that cannot start, and the global options
declared once. Real SQLite, a real S3 server (SeaweedFS, s3_server.py) and the tiny model of test_cli."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from kvzip_rag.cli import app
from kvzip_rag.store import CacheStore

from s3_server import s3_blob_url, s3_server  # noqa: F401  (fixtures)
from test_cli import HARBOUR, LIGHTHOUSE, WIDE, tiny_model_dir  # noqa: F401  (fixture)

ENV = {**WIDE, "KVZIP_RAG_BLOB_URL": None, "KVZIP_RAG_BLOB_TIMEOUT": None}
TEXTS = {
    "dir.txt": "The granary of Oskel was built of red brick in 1802 by the miller Tomas Vey.",
    "fifo.txt": "The ferry to Tessin leaves at seven every morning from the southern pier.",
    "norow.txt": "The lighthouse keeper Ida Holm wrote a ledger every night for forty years.",
    "outside.txt": "The regatta is held every August; the winner receives a silver anchor.",
    "fine.txt": "The town hall clock was repaired in 1954 by the watchmaker Elin Sand.",
}


def run(*args: str, env: dict | None = None, input: str | bytes | None = None):
    result = CliRunner(env=ENV).invoke(app, list(args), env=env, input=input)
    assert "Traceback" not in result.output, result.output
    return result


def last_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.fixture()
def store(tmp_path, tiny_model_dir) -> list[str]:  # noqa: F811
    """A store folder with the five documents of TEXTS, as global options."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for name, text in TEXTS.items():
        (docs / name).write_text(text)
    options = ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir)]
    indexed = run(*options, "index", str(docs))
    assert indexed.exit_code == 0, indexed.output
    return options


def blob_of(folder: Path, doc_id: str) -> Path:
    with CacheStore(folder) as opened:
        return opened.blob_dir / opened.caches_for(doc_id)[0].blob_path


# ----------------------------------------------------------------------------------------------------- verify


def test_verify_names_every_damaged_document_and_never_hangs(store, tmp_path):
    folder = tmp_path / "store"
    directory = blob_of(folder, "dir.txt")
    directory.unlink()
    directory.mkdir()  # a folder in the blob's place
    fifo = blob_of(folder, "fifo.txt")
    fifo.unlink()
    os.mkfifo(fifo)  # a pipe: reading it would block forever
    with sqlite3.connect(folder / "index.sqlite") as db:
        db.execute("PRAGMA foreign_keys = ON")
        db.execute("DELETE FROM caches WHERE segment_id IN (SELECT id FROM segments WHERE document_id = 'norow.txt')")
        db.execute("UPDATE caches SET blob_path = '../../outside.safetensors' WHERE segment_id IN "
                   "(SELECT id FROM segments WHERE document_id = 'outside.txt')")
    # In a child process with a time limit: a verify that hangs on the pipe fails the test instead of hanging it
    script = ("import sys; from kvzip_rag.cli import app; sys.argv = ['kvzip-rag', *sys.argv[1:]]; app()")
    child = subprocess.run([sys.executable, "-c", script, "--store", str(folder), "verify"], capture_output=True,
                           text=True, timeout=120, env={**os.environ, "COLUMNS": "400", "OMP_NUM_THREADS": "1"})
    assert child.returncode == 1 and "Traceback" not in child.stderr, child.stderr
    problems = child.stderr.splitlines()
    for doc_id in ("dir.txt", "fifo.txt", "norow.txt", "outside.txt"):
        assert any(f"document '{doc_id}'" in line for line in problems), (doc_id, child.stderr)
    assert "fine.txt" not in child.stderr
    assert "in 4 document(s)" in problems[-1]

    # Only the intact one: fine; an id that is not stored is an error, not a silent success
    assert run(*store, "verify", "fine.txt").exit_code == 0
    unknown = run(*store, "verify", "no-such-doc")
    assert unknown.exit_code == 1 and "no document 'no-such-doc'" in last_line(unknown)


# -------------------------------------------------------------------------------------------------- encodings


def test_text_in_another_encoding_is_decoded_as_written_or_refused(tmp_path, tiny_model_dir):  # noqa: F811
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "cafe.txt").write_bytes("Le Café de Hélène, à Noël, sert un thé très âgé.".encode("latin-1"))
    (docs / "noise.txt").write_bytes(bytes(range(256)) * 8)  # no encoding decodes this
    (docs / "harbour.txt").write_text(HARBOUR)
    options = ["--store", str(tmp_path / "store"), "--model", str(tiny_model_dir)]
    indexed = run(*options, "index", str(docs))
    assert indexed.exit_code == 1  # one file could not be indexed: said, and the others went on
    assert "cafe.txt is not UTF-8: decoded as" in indexed.stderr
    assert "noise.txt is not UTF-8 text and its encoding could not be detected" in indexed.stderr
    with CacheStore(tmp_path / "store") as opened:
        assert sorted(d.id for d in opened.list_documents()) == ["cafe.txt", "harbour.txt"]
        cafe = opened.get_document("cafe.txt").text
    assert "Hélène" in cafe and "\ufffd" not in cafe


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(store):
    chat = run(*store, "chat", "--max-tokens", "3", input=b"\xe9t\xe9 \xff\nWho repaired the town hall clock?\n")
    assert chat.exit_code == 0, chat.output
    assert "not UTF-8 text: it was ignored" in chat.stderr
    assert "fine.txt" in chat.stderr  # the next question was answered, from its document


# ------------------------------------------------------------------------------------------------------ faults


def test_object_storage_down_fails_in_seconds(tmp_path, tiny_model_dir):  # noqa: F811
    pytest.importorskip("obstore")
    with socket.socket() as probe:  # a port nobody listens on: connection refused, as with a server that is down
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "a.txt").write_text(HARBOUR)
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ALLOW_HTTP": "true",
           "AWS_ACCESS_KEY_ID": "key", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_REGION": "us-east-1",
           "OMP_NUM_THREADS": "1", "COLUMNS": "400"}
    script = "import sys; from kvzip_rag.cli import app; sys.argv = ['kvzip-rag', *sys.argv[1:]]; app()"
    # obstore's own defaults retry for about 3 minutes: past this limit the child is killed and the test fails
    child = subprocess.run(
        [sys.executable, "-c", script, "--store", str(tmp_path / "store"), "--blob-url", "s3://bucket/caches",
         "--blob-timeout", "1", "--model", str(tiny_model_dir), "index", str(tmp_path / "a.txt")],
        capture_output=True, text=True, timeout=90, env=env)
    assert child.returncode == 1 and "Traceback" not in child.stderr, child.stderr
    assert "object storage failed to write s3://bucket/caches/" in child.stderr


def test_rm_with_refused_deletes_removes_the_document_and_leaves_the_blobs_to_gc(
        s3_blob_url, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    (tmp_path / "harbour.txt").write_text(HARBOUR)
    (tmp_path / "lighthouse.md").write_text(LIGHTHOUSE)
    options = ["--store", str(tmp_path / "store"), "--blob-url", s3_blob_url, "--model", str(tiny_model_dir)]
    indexed = run(*options, "index", str(tmp_path / "harbour.txt"), str(tmp_path / "lighthouse.md"))
    assert indexed.exit_code == 0, indexed.output
    with monkeypatch.context() as patch:
        patch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        removed = run(*options, "rm", "harbour.txt")
    # the exit code says what happened: the document is gone (its blob waits for gc)
    assert removed.exit_code == 0, removed.output
    assert "removed harbour.txt" in removed.stdout and "gc removes them" in removed.stderr
    listing = run(*options, "ls")
    assert "harbour.txt" not in listing.stdout and "lighthouse.md" in listing.stdout
    assert run(*options, "verify").exit_code == 0
    collected = run(*options, "gc", "--now")
    assert collected.exit_code == 0 and "removed 1 orphan blob(s)" in collected.stdout, collected.output


def test_reads_create_nothing(store, tmp_path):
    missing = tmp_path / "no-store-here"
    listing = run("--store", str(missing), "ls")
    assert listing.exit_code == 0 and "empty" in listing.stdout
    for command in (["verify"], ["rm", "x"], ["gc"], ["ask", "Who?"], ["chat"]):
        refused = run("--store", str(missing), *command)
        assert refused.exit_code == 1 and "does not exist yet" in last_line(refused), (command, refused.output)
    assert not missing.exists()

    nowhere = tmp_path / "nonexistent" / "dir"
    for command in (["ls"], ["verify"]):
        refused = run(*store, "--blob-url", f"file://{nowhere}", *command)
        assert refused.exit_code == 1 and f"the blob folder {nowhere} does not exist" in last_line(refused)
    assert not nowhere.parent.exists()


def test_ray_that_cannot_start_is_one_line(tmp_path, tiny_model_dir, monkeypatch):  # noqa: F811
    pytest.importorskip("ray")
    (tmp_path / "a.txt").write_text(HARBOUR)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    monkeypatch.setenv("TMPDIR", "relative-tmp")
    result = run("--store", str(tmp_path / "store"), "--model", str(tiny_model_dir), "index", "--ray",
                 str(tmp_path / "a.txt"))
    assert result.exit_code == 1
    assert "TMPDIR='relative-tmp' is a relative path" in last_line(result)
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


# --------------------------------------------------------------------------------------------- command line


def test_store_option_wins_over_the_environment_before_and_after_the_command(store, tmp_path):
    other = tmp_path / "other"  # what KVZIP_RAG_STORE names: empty
    env = {**ENV, "KVZIP_RAG_STORE": str(other)}
    for args in (["--store", str(tmp_path / "store"), "ls"], ["ls", "--store", str(tmp_path / "store")]):
        listing = run(*args, env=env)
        assert listing.exit_code == 0 and "fine.txt" in listing.stdout, (args, listing.output)
    assert "empty" in run("ls", env=env).stdout and not other.exists()


def test_global_options_are_declared_once_and_flags_show_no_type():
    top = run("--help", env={**ENV, "COLUMNS": "200"})
    assert "--store" in top.stdout and "--blob-timeout" in top.stdout
    for command in ("ls", "rm", "gc", "verify", "ask", "chat", "index", "inspect", "demo"):
        shown = run(command, "--help", env={**ENV, "COLUMNS": "200"}).stdout
        assert "--store" not in shown and "--db " not in shown and "<bool>" not in shown, (command, shown)
    assert "--force" in run("index", "--help", env={**ENV, "COLUMNS": "200"}).stdout


def test_mistakes_are_reported_before_the_model_loads(store, tmp_path):
    # A model that cannot load would be reported first if it were loaded first
    no_model = ["--store", str(tmp_path / "store"), "--model", str(tmp_path / "no-model")]
    bogus = run(*no_model, "ask", "Who repaired the clock?", "--compose", "bogus")
    assert bogus.exit_code == 1 and "unknown compose='bogus'" in last_line(bogus)
    unknown = run(*no_model, "ask", "Who?", "--doc", "nope")
    assert unknown.exit_code == 1 and "no document 'nope'" in last_line(unknown)
    for doc_id in TEXTS:
        assert run(*store, "rm", doc_id).exit_code == 0
    for command in (["ask", "Who?"], ["chat"]):
        empty = run(*no_model, *command)
        assert empty.exit_code == 1 and "holds no documents" in last_line(empty), empty.output
    for url in ("notaurl", "postgres ql://user:secret@host/db"):  # SQLAlchemy's ArgumentError before; no password shown
        bad_url = run("--db", url, "ls")
        assert bad_url.exit_code == 1 and "not one SQLAlchemy can read" in last_line(bad_url), bad_url.output
        assert "secret" not in bad_url.output


def test_model_load_error_prints_real_newlines(store, tmp_path):
    broken = tmp_path / "broken-model"  # a folder with an empty config: the tokenizer's error spans several lines
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    failed = run("--store", str(tmp_path / "store"), "--model", str(broken), "ask", "Who repaired the clock?")
    assert failed.exit_code == 1 and "could not load model" in failed.stderr
    assert "\\x0a" not in failed.stderr and len(failed.stderr.strip().splitlines()) > 1, failed.stderr
