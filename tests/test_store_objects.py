"""The object-storage blob backend against a real S3-compatible server (SeaweedFS, see s3_server.py), and the
same calls on the local-folder backend giving the same answers."""

from __future__ import annotations

import os
import time

import pytest

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.store.backends import LocalBlobs
from kvzip_rag.store.objects import ObstoreObjects, open_objects

from s3_server import s3_blob_url, s3_server  # noqa: F401  (fixtures)


def test_s3_backend_matches_local_folder(s3_blob_url, tmp_path):  # noqa: F811
    s3, local = open_objects(s3_blob_url), open_objects(f"file://{tmp_path / 'blobs'}")
    assert isinstance(s3, ObstoreObjects) and isinstance(local, LocalBlobs)
    data = os.urandom(300_000)
    for backend in (s3, local):
        backend.write("ab/one.safetensors", data)
        backend.write("cd/two.safetensors", b"tiny")
    ranges = [(0, 8), (100, 0), (250_000, 49_999), (9, 4087)]
    for backend in (s3, local):
        handle = backend.open("ab/one.safetensors")
        assert handle.size == len(data) and handle.read(1000, 4000) == data[1000:5000]
        handle.close()
        entries = {name: (size, mtime) for name, size, mtime in backend.entries()}
        assert set(entries) == {"ab/one.safetensors", "cd/two.safetensors"}
        assert entries["ab/one.safetensors"][0] == len(data)
        assert abs(entries["cd/two.safetensors"][1] - time.time()) < 600
        assert backend.describe("ab/one.safetensors").endswith("ab/one.safetensors")
        backend.delete("ab/one.safetensors")
        backend.delete("ab/one.safetensors")  # missing is fine
        with pytest.raises(FileNotFoundError):
            backend.open("ab/one.safetensors")
    s3.write("ab/one.safetensors", data)
    s3.counter.reset()
    assert s3.open("ab/one.safetensors").read_ranges(ranges) == [data[a:a + n] for a, n in ranges]
    assert s3.read("ab/one.safetensors") == data
    # what travelled: (0, 8) and (9, 4087) are one request [0, 4096) (gap < COALESCE), then the others as asked
    assert s3.counter.nbytes == 4096 + 49_999 + len(data) and s3.counter.requests == 3
    for bad in ["../escape", "/abs", "a/../../b", ""]:
        with pytest.raises(InvalidArgumentError):
            s3.write(bad, b"x")


def test_open_objects_dispatch(tmp_path):
    assert isinstance(open_objects(tmp_path / "a"), LocalBlobs)
    assert isinstance(open_objects(str(tmp_path / "b")), LocalBlobs)
    local = open_objects(f"file://{tmp_path}/c%20d")
    assert isinstance(local, LocalBlobs) and local.root == (tmp_path / "c d").resolve()
    with pytest.raises(InvalidArgumentError, match="file:///path"):
        open_objects("file://host/share")
    pytest.importorskip("obstore")
    assert isinstance(open_objects("s3://bucket/prefix", skip_signature=True), ObstoreObjects)
