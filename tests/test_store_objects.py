"""Blob backends: a local folder and a real S3-compatible server (SeaweedFS, see s3_server.py), same contract."""

from __future__ import annotations

import os
import time

import pytest

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.store.objects import LocalObjects, ObstoreObjects, open_objects

from s3_server import s3_blob_url, s3_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["local", "s3"])
def objects(request, tmp_path):
    if request.param == "local":
        return open_objects(f"file://{tmp_path / 'blobs'}")
    return open_objects(request.getfixturevalue("s3_blob_url"))


def test_backend_contract(objects):
    data = os.urandom(300_000)
    objects.write("ab/one.safetensors", data)
    objects.write("cd/two.safetensors", b"tiny")
    assert objects.size("ab/one.safetensors") == len(data) and objects.exists("cd/two.safetensors")
    assert objects.read("ab/one.safetensors") == data
    objects.counter.reset()
    assert objects.read_range("ab/one.safetensors", 1000, 4000) == data[1000:5000]
    ranges = [(0, 8), (100, 0), (250_000, 49_999), (9, 4087)]
    assert objects.read_ranges("ab/one.safetensors", ranges) == [data[a:a + n] for a, n in ranges]
    assert objects.counter.nbytes == 4000 + 8 + 49_999 + 4087  # exactly what was asked, nothing more
    listed = {key: (size, modified) for key, size, modified in objects.entries()}
    assert set(listed) == {"ab/one.safetensors", "cd/two.safetensors"}
    assert listed["ab/one.safetensors"][0] == len(data)
    assert abs(listed["cd/two.safetensors"][1] - time.time()) < 600
    assert objects.describe("ab/one.safetensors").endswith("/ab/one.safetensors")
    objects.delete("ab/one.safetensors")
    objects.delete("ab/one.safetensors")  # missing is fine
    assert not objects.exists("ab/one.safetensors")
    with pytest.raises(FileNotFoundError):
        objects.read_range("ab/one.safetensors", 0, 10)
    with pytest.raises(FileNotFoundError):
        objects.read("nope/none.safetensors")
    for bad in ["../escape", "/abs", "a/../../b", ""]:
        with pytest.raises(InvalidArgumentError):
            objects.write(bad, b"x")


def test_open_objects_dispatch(tmp_path):
    assert isinstance(open_objects(tmp_path / "a"), LocalObjects)
    assert isinstance(open_objects(str(tmp_path / "b")), LocalObjects)
    local = open_objects(f"file://{tmp_path}/c%20d")
    assert isinstance(local, LocalObjects) and local.root == (tmp_path / "c d").resolve()
    with pytest.raises(InvalidArgumentError, match="file:///path"):
        open_objects("file://host/share")
    pytest.importorskip("obstore")
    assert isinstance(open_objects("s3://bucket/prefix", skip_signature=True), ObstoreObjects)
