"""``kvzip-rag serve --ray``: a real local Ray cluster (2 CPUs, 127.0.0.1) runs the server's FastAPI app as a Ray
Serve deployment with two replicas of a tiny model over one store folder; answers come through both replicas and
equal the in-process service's; a replica killed mid-answer (streamed or not) fails its request cleanly and later
requests succeed."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'kvzip-rag[ray]')")
pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")
pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the [serve] extra is not installed")
import httpx  # noqa: E402

from test_cli import tiny_model_dir  # noqa: E402,F401  (fixture)
from test_serve import DOCS, QUESTIONS  # noqa: E402
from kvzip_rag.errors import ClusterError, InvalidArgumentError  # noqa: E402
from kvzip_rag.serve.replicas import REPLICA_HEADER, ReplicaSettings, deploy, replica_actors, shutdown  # noqa: E402

NEVER_ABSTAIN = {"abstain_threshold": None}  # replicas use the packaged calibration, not the tests' threshold 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def local_service(tmp_path_factory, tiny_model_dir):  # noqa: F811
    import kvzip_rag
    from kvzip_rag.qa import QAService
    from kvzip_rag.store import CacheStore

    model = kvzip_rag.load_model(str(tiny_model_dir), threads=1)
    store = CacheStore(tmp_path_factory.mktemp("ray-serve-store"))
    for doc_id, text in DOCS.items():
        store.add_document(model, text, doc_id=doc_id, ratio=0.3)
    return QAService(store, model)


@pytest.fixture(scope="module")
def replicas(local_service, tiny_model_dir):  # noqa: F811
    if ray.is_initialized():
        ray.shutdown()
    settings = ReplicaSettings({"path": str(local_service.store.path)}, model=str(tiny_model_dir), threads=1)
    try:
        url = deploy(settings, 2, "127.0.0.1", free_port(),
                     ray_init={"num_cpus": 2, "object_store_memory": 100 * 2**20, "_node_ip_address": "127.0.0.1"})
    except ClusterError as error:
        pytest.skip(f"Ray Serve could not start here: {error}")
    try:
        yield url
    finally:
        shutdown()


def test_serve_command_with_ray_replicas_answers_and_stops_on_sigterm(local_service, tiny_model_dir):  # noqa: F811
    """``kvzip-rag serve --ray --replicas 2`` (its own local cluster, in a subprocess): both replicas answer, and
    SIGTERM stops Ray Serve and the command."""
    import os
    import signal
    import subprocess
    import sys
    import threading

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "kvzip_rag.cli", "--store", str(local_service.store.path),
                                "--model", str(tiny_model_dir), "--threads", "1", "serve", "--ray", "--replicas", "2",
                                "--port", str(port)], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200", "RAY_ADDRESS": ""})
    lines: list[str] = []  # stderr, read by a thread so the command never blocks on a full pipe

    def read_stderr() -> None:
        for line in process.stderr:
            lines.append(line)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 180
        while "2 Ray Serve replica(s)" not in " ".join("".join(lines).split()):  # printed once all are up
            if process.poll() is not None:
                reader.join(10)
                pytest.skip(f"kvzip-rag serve --ray could not start: {''.join(lines)[-500:]}")
            if time.monotonic() > deadline:
                pytest.skip("kvzip-rag serve --ray did not report its replicas within three minutes")
            time.sleep(0.1)
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        expected = {doc: local_service.answer(q, max_new_tokens=6, abstain_threshold=None).text
                    for doc, q in QUESTIONS.items()}
        assert len(answers_from_both(url, QUESTIONS, expected)) == 2
        process.send_signal(signal.SIGTERM)
        assert process.wait(120) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def ask(url: str, question: str, max_tokens: int = 6) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "kvzip-rag", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        **NEVER_ABSTAIN})


def answers_from_both(url: str, questions: dict[str, str], expected: dict[str, str]) -> set[str]:
    """Rounds of concurrent requests until two replicas have answered (or a minute passed): Ray Serve's router
    sends a request to the replica with the shorter queue it knows of, and learns the second one's queue from a
    probe in the background, so sequential requests can all land on one replica."""
    served_by: set[str] = set()
    deadline = time.monotonic() + 60
    while len(served_by) < 2 and time.monotonic() < deadline:
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda item: (item[0], ask(url, item[1])), questions.items()))
        for doc, response in responses:
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["choices"][0]["message"]["content"] == expected[doc]
            assert [s["doc_id"] for s in body["sources"]] == [doc]
            served_by.add(response.headers[REPLICA_HEADER])
    return served_by


def test_two_replicas_answer_as_the_service_does_and_both_serve(replicas, local_service):
    expected = {doc: local_service.answer(q, max_new_tokens=6, abstain_threshold=None).text
                for doc, q in QUESTIONS.items()}
    served_by = answers_from_both(replicas, QUESTIONS, expected)
    assert served_by == set(replica_actors())
    assert len(served_by) == 2
    settings = ReplicaSettings({"path": str(local_service.store.path)}, threads=1)
    with pytest.raises(InvalidArgumentError, match="3 replicas of 1 thread.s. need 3 CPUs; the Ray cluster has 2"):
        deploy(settings, 3, "127.0.0.1", free_port())  # refused at once, the running deployment untouched
    with pytest.raises(InvalidArgumentError, match="replicas must be a positive integer"):
        deploy(settings, 0, "127.0.0.1", free_port())
    client = openai.OpenAI(base_url=f"{replicas}/v1", api_key="unused", max_retries=0)
    question = QUESTIONS["brask.txt"]
    chunks = list(client.chat.completions.create(model="kvzip-rag", messages=[{"role": "user", "content": question}],
                                                 max_tokens=6, stream=True, extra_body=NEVER_ABSTAIN))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected["brask.txt"]


def test_a_killed_replica_fails_its_stream_cleanly_and_later_requests_succeed(replicas):
    body = {"model": "kvzip-rag", "messages": [{"role": "user", "content": QUESTIONS["tessin.txt"]}],
            "max_tokens": 1500, "clean": False, "stream": True, **NEVER_ABSTAIN}
    outcome: dict = {}
    with httpx.stream("POST", f"{replicas}/v1/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        ray.kill(replica_actors()[response.headers[REPLICA_HEADER]], no_restart=True)
        start = time.monotonic()
        try:
            outcome["rest"] = [line for line in lines if line]
        except httpx.HTTPError as error:  # the connection cut: a clean failure too
            outcome["error"] = error
        outcome["seconds"] = time.monotonic() - start
    assert outcome["seconds"] < 60  # ended, not hung (the client's read timeout would have raised)
    assert "error" in outcome or outcome["rest"][-1:] != ["data: [DONE]"]
    for doc, question in list(QUESTIONS.items())[:4]:  # the replica alive (and the replacement) answer
        later = ask(replicas, question)
        assert later.status_code == 200, later.text
        assert [s["doc_id"] for s in later.json()["sources"]] == [doc]


def busy_replica(seconds: float = 60) -> tuple[str, object]:
    """The replica (id, actor) with a request in flight, asked of each replica's actor (Ray Serve's own count)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for replica_id, actor in replica_actors().items():
            if ray.get(actor.get_num_ongoing_requests.remote(), timeout=10) > 0:
                return replica_id, actor
        time.sleep(0.05)
    raise AssertionError("no replica reported the request in flight")


def test_a_killed_replica_fails_its_plain_request_with_a_5xx_and_later_requests_succeed(replicas):
    """A plain (not streamed) request whose replica dies mid-answer gets a 5xx with a one-line reason, not a hang
    or a cut connection (Ray Serve's proxy answers it: ``500 Internal Server Error`` as plain text, since the app
    that writes OpenAI error objects died with the replica); later requests go to the replicas alive."""
    body = {"model": "kvzip-rag", "messages": [{"role": "user", "content": QUESTIONS["tessin.txt"]}],
            "max_tokens": 1500, "clean": False, **NEVER_ABSTAIN}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"{replicas}/v1/chat/completions", json=body, timeout=60)
        _, actor = busy_replica()
        start = time.monotonic()
        ray.kill(actor, no_restart=True)
        response = pending.result()
    assert time.monotonic() - start < 60  # ended, not hung
    assert 500 <= response.status_code < 600, (response.status_code, response.text)
    reason = response.text.strip()
    assert reason and "\n" not in reason, reason
    for doc, question in list(QUESTIONS.items())[:4]:
        later = ask(replicas, question)
        assert later.status_code == 200, later.text
        assert [s["doc_id"] for s in later.json()["sources"]] == [doc]
