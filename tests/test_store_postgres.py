"""The store on a real PostgreSQL server: a throwaway cluster on a unix socket, started and removed by the test.

Skips (saying why) when the server binaries or psycopg2 are missing; CI installs them (apt package ``postgresql``,
extra ``[test]``)."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import kvzip_rag
from kvzip_rag.errors import CorruptBlobError, ModelMismatchError
from kvzip_rag.store import CacheStore

from conftest import build_tiny
from test_store import HARBOUR, ORCHARD


def _pg_bin() -> Path | None:
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "initdb").exists():
            return Path(candidate)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="module")
def postgres_url():
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install psycopg2-binary)")
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found (apt-get install postgresql)")
    prefix: list[str] = []
    root = tempfile.mkdtemp(prefix="kvzip-pg-")
    if os.geteuid() == 0:  # the server refuses to run as root: run it as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
        os.chown(root, user.pw_uid, user.pw_gid)
        runuser = shutil.which("runuser") or shutil.which("su")
        if runuser is None:
            pytest.skip("running as root and neither runuser nor su is available")
        prefix = [runuser, "-u", "postgres", "--"] if runuser.endswith("runuser") else None
        if prefix is None:
            pytest.skip("only runuser is supported to drop root privileges")
    data = Path(root) / "data"

    def run(*args):
        return subprocess.run(prefix + [str(a) for a in args], capture_output=True, text=True, timeout=120)

    init = run(bindir / "initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
               "--locale=C")
    if init.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"initdb failed: {init.stderr.strip()[-300:]}")
    options = f"-k {root} -c listen_addresses='' -c fsync=off -c full_page_writes=off"
    start = run(bindir / "pg_ctl", "-D", data, "-o", options, "-l", Path(root) / "log", "-w", "-t", "60", "start")
    if start.returncode != 0:
        log = (Path(root) / "log").read_text() if (Path(root) / "log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {start.stderr.strip()} {log[-500:]}")
    try:
        yield f"postgresql+psycopg2://postgres@/postgres?host={root}"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_store_on_postgresql(postgres_url, tmp_path, tiny_llama, smol_tokenizer):
    store = CacheStore(url=postgres_url, blob_dir=tmp_path / "blobs")
    try:
        evil = {"title": "O'Brien \"q\"", 'we"ird': "x", "n": 3, "flag": True}
        store.add_document(tiny_llama, HARBOUR, doc_id="../../h", metadata=evil, ratio=0.5)
        store.add_document(tiny_llama, ORCHARD, doc_id="o", metadata={"title": "plain", "n": "3"}, ratio=0.5)
        again = store.add_document(tiny_llama, HARBOUR, doc_id="../../h", ratio=0.5)
        assert len(store) == 2 and len(again.caches) == 1
        assert store.search("When do ferries leave for Tessin?", k=1)[0].document_id == "../../h"
        assert store.search("Which apple was planted in 1899?", k=1)[0].document_id == "o"
        assert store.search("ferries Tessin apple", k=5, doc_ids=["o"])[0].document_id == "o"
        assert [h.document_id for h in store.search("ferries", k=3, metadata={"title": evil["title"]})] == ["../../h"]
        assert [d.id for d in store.list_documents(metadata={"n": 3})] == ["../../h"]
        assert [d.id for d in store.list_documents(metadata={"n": "3"})] == ["o"]
        assert [d.id for d in store.list_documents(metadata={"flag": True, 'we"ird': "x"})] == ["../../h"]
        for query in ["'; DROP TABLE segments; --", "\"", "a & b | !c", "ferries:*", ""]:
            store.search(query, k=2)
        memory = kvzip_rag.compress(tiny_llama, HARBOUR, ratio=0.5)
        loaded = store.load_cache("../../h", tiny_llama, ratio=0.25)
        expected = memory.at_ratio(0.25)
        assert all((a.keys == b.keys).all() for a, b in zip(loaded.layers, expected.layers))
        assert kvzip_rag.answer(tiny_llama, loaded, "When?", max_new_tokens=4).token_ids == \
            kvzip_rag.answer(tiny_llama, expected, "When?", max_new_tokens=4).token_ids
        with pytest.raises(ModelMismatchError):
            store.load_cache("o", build_tiny("llama", smol_tokenizer, seed=5))
        assert store.verify().ok
        blob = store.blob_dir / store.caches_for("o")[0].blob_path
        blob.write_bytes(blob.read_bytes()[:-10])
        assert [p.document_id for p in store.verify().problems] == ["o"]
        with pytest.raises(CorruptBlobError, match="document 'o'"):
            store.load_cache("o", tiny_llama)
        assert store.delete_document("o") and store.search("apple 1899", k=3) == []
        assert store.gc(min_age_s=0).removed == []
    finally:
        store.close()
