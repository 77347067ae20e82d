"""``kvzip-rag serve``: a real uvicorn server (in this process, on a free 127.0.0.1 port) over a tiny random-weight
model's store, called with the real ``openai`` client: answers and sources equal the in-process service's, streaming
by SSE, our extra body fields, documents, one-line 4xx errors, timeouts, a client leaving a stream, concurrent
questions without cross-talk, LangChain's ``ChatOpenAI`` and ``kvzip-rag ask/chat --server``."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
pytest.importorskip("uvicorn", reason="the [serve] extra is not installed")
openai = pytest.importorskip("openai", reason="the [serve] extra is not installed")
import httpx  # noqa: E402  (the openai client's own HTTP library)

from conftest import service_over  # noqa: E402
from test_cli import tiny_model_dir  # noqa: E402,F401  (fixture)
from kvzip_rag.qa import QAService  # noqa: E402
from kvzip_rag.serve import make_server  # noqa: E402

TOWNS = ["Velmora", "Tessin", "Brask", "Quillon", "Ardent", "Morrow", "Sellick", "Varnay"]
THINGS = ["harbour", "lighthouse", "regatta", "bakery", "library", "orchard", "foundry", "observatory"]
DOCS = {f"{town.lower()}.txt": f"The {thing} of {town} was opened in 17{31 + n} by the engineer Ansel {town}son. "
        f"Visitors come to the {thing} of {town} every morning at seven." for n, (town, thing)
        in enumerate(zip(TOWNS, THINGS))}
QUESTIONS = {f"{town.lower()}.txt": f"When was the {thing} of {town} opened?" for town, thing in zip(TOWNS, THINGS)}


class Served:
    """A running server: its base URL, service and uvicorn object."""

    def __init__(self, service: QAService, timeout: float | None = None) -> None:
        self.service = service
        self.server = make_server(service, timeout=timeout)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        for _ in range(600):  # up to a minute for the server to start; a server that does not start skips
            if self.server.started or not self.thread.is_alive():
                break
            time.sleep(0.1)
        if not self.server.started:
            self.stop()
            pytest.skip(f"could not start a uvicorn server on {self.url}")

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_llama) -> QAService:
    return service_over(tiny_llama, tmp_path_factory.mktemp("serve-store"), DOCS)


@pytest.fixture(scope="module")
def served(service):
    running = Served(service)
    yield running
    running.stop()


def ask(client, question: str, **options):
    return client.chat.completions.create(model="kvzip-rag", messages=[{"role": "user", "content": question}],
                                          **options)


def local(service: QAService, question: str, max_tokens: int = 8, **options) -> str:
    return service.answer(question, max_new_tokens=max_tokens, **options).text


def test_chat_completion_answers_as_the_service_does_with_its_sources(served, service):
    question = QUESTIONS["tessin.txt"]
    response = ask(served.client(), question, max_tokens=8)
    assert response.object == "chat.completion" and response.model == service.model.name
    assert response.choices[0].message.content == local(service, question)
    assert response.choices[0].finish_reason in ("stop", "length")
    extra = response.model_extra
    assert [s["doc_id"] for s in extra["sources"]] == ["tessin.txt"]
    assert extra["sources"][0]["text"] == DOCS["tessin.txt"]
    assert isinstance(extra["citations"], list) and extra["abstained"] is False
    expected = service.answer(question, max_new_tokens=8)
    assert extra["unsupported_numbers"] == list(expected.unsupported_numbers)
    assert response.usage.completion_tokens >= 1 and response.usage.prompt_tokens > response.usage.completion_tokens


def test_streaming_chat_sends_sse_chunks_then_sources_usage_and_done(served, service):
    question = QUESTIONS["quillon.txt"]
    chunks = list(ask(served.client(), question, max_tokens=8, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == local(service, question)
    last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert [s["doc_id"] for s in last.model_extra["sources"]] == ["quillon.txt"]
    assert "citations" in last.model_extra and last.model_extra["abstained"] is False
    expected = service.answer(question, max_new_tokens=8)
    assert last.model_extra["unsupported_numbers"] == list(expected.unsupported_numbers)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json={
            "model": "kvzip-rag", "messages": [{"role": "user", "content": question}], "max_tokens": 4,
            "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in raw.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_completions_plain_and_streamed(served, service):
    question = QUESTIONS["ardent.txt"]
    client = served.client()
    response = client.completions.create(model="kvzip-rag", prompt=question, max_tokens=8)
    assert response.object == "text_completion" and response.choices[0].text == local(service, question)
    assert [s["doc_id"] for s in response.model_extra["sources"]] == ["ardent.txt"]
    chunks = list(client.completions.create(model=service.model.name, prompt=question, max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == response.choices[0].text
    assert [s["doc_id"] for s in chunks[-1].model_extra["sources"]] == ["ardent.txt"]


def test_extra_body_fields_route_and_compose_on_the_server(served, service):
    client = served.client()
    question = QUESTIONS["morrow.txt"]
    pinned = ask(client, question, max_tokens=6, extra_body={"doc_ids": ["varnay.txt"]})
    assert [s["doc_id"] for s in pinned.model_extra["sources"]] == ["varnay.txt"]
    assert pinned.choices[0].message.content == local(service, question, 6, doc_ids=["varnay.txt"])
    two = ask(client, question, max_tokens=6, extra_body={"k": 2, "evidence": False, "compose": "parallel"})
    assert len(two.model_extra["sources"]) == 2 and two.model_extra["sources"][0]["doc_id"] == "morrow.txt"
    assert two.choices[0].message.content == local(service, question, 6, k=2, evidence=False)
    lower = ask(client, question, max_tokens=6, extra_body={"ratio": 0.1})
    assert lower.choices[0].message.content == QAService(service.store, service.model, ratio=0.1).answer(
        question, max_new_tokens=6).text


def test_abstain_text_is_an_extra_body_field(served, service):
    question = QUESTIONS["morrow.txt"]
    said = "Not in the documents."
    response = ask(served.client(), question, max_tokens=6,
                   extra_body={"abstain_threshold": 1.0, "abstain_text": said})
    assert response.model_extra["abstained"] is True and response.choices[0].message.content == said
    assert response.choices[0].message.content == local(service, question, 6, abstain_threshold=1.0,
                                                         abstain_text=said)
    with pytest.raises(openai.BadRequestError, match="abstain_text"):
        ask(served.client(), question, max_tokens=6, extra_body={"abstain_text": " "})


def test_quote_mode_is_an_extra_body_field(served, service):
    """``answer_style="quote"``: the service's quote, cited exactly, plain and streamed (one piece, once complete)."""
    question = QUESTIONS["morrow.txt"]
    options = {"answer_style": "quote", "abstain_threshold": None}
    quoted = local(service, question, 6, **options)
    response = ask(served.client(), question, max_tokens=6, extra_body=options)
    assert response.choices[0].message.content == quoted and quoted in DOCS["morrow.txt"]
    assert [c["text"] for c in response.model_extra["citations"]] == [quoted]
    chunks = list(ask(served.client(), question, max_tokens=6, stream=True, extra_body=options))
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == [quoted]


def test_chat_history_is_replayed_and_answered_as_a_session_does(served, service):
    from kvzip_rag.dialogue import ChatSession

    first, follow = QUESTIONS["sellick.txt"], "Who was the engineer of the foundry of Sellick?"
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": first},
                {"role": "assistant", "content": "In 1737."}, {"role": "user", "content": follow}]
    response = served.client().chat.completions.create(model="kvzip-rag", messages=messages, max_tokens=6)
    turn = ChatSession(service, sampling={"max_new_tokens": 6}).ask(
        follow, history=[("Answer briefly.\n\n" + first, "In 1737.")])
    assert response.choices[0].message.content == turn.answer.text
    assert [s["doc_id"] for s in response.model_extra["sources"]] == ["sellick.txt"]


def test_documents_add_list_answer_delete(served):
    client = served.client()
    documents = f"{served.url}/v1/documents"
    added = httpx.post(documents, json={"text": "The windmill of Pellaro grinds barley for the brewers.",
                                        "doc_id": "pellaro", "metadata": {"kind": "mill"}}, timeout=120)
    assert added.status_code == 201, added.text
    assert added.json()["id"] == "pellaro" and added.json()["metadata"] == {"kind": "mill"}
    assert "pellaro" in [d["id"] for d in httpx.get(documents).json()["data"]]
    assert httpx.get(f"{documents}/pellaro").json()["segments"] >= 1
    answer = ask(client, "What does the windmill of Pellaro grind?", max_tokens=4)
    assert [s["doc_id"] for s in answer.model_extra["sources"]] == ["pellaro"]
    assert [s["metadata"] for s in answer.model_extra["sources"]] == [{"kind": "mill"}]
    assert httpx.delete(f"{documents}/pellaro").json()["deleted"] is True
    assert "pellaro" not in [d["id"] for d in httpx.get(documents).json()["data"]]
    gone = httpx.delete(f"{documents}/pellaro")
    assert gone.status_code == 404 and "pellaro" in gone.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="pellaro"):
        ask(client, "What does the windmill grind?", max_tokens=4, extra_body={"doc_ids": ["pellaro"]})
    assert httpx.post(documents, json={"text": "  "}).status_code == 400
    assert httpx.post(documents, json={"txt": "x"}).status_code == 400
    typed = httpx.get(documents, params={"limit": "many"})
    assert typed.status_code == 400 and typed.json()["error"]["message"].startswith("query.limit:")
    for page in ({"limit": 0}, {"offset": -1}, {"limit": 2**63}, {"offset": 2**63}):  # past SQL's 64-bit integers
        refused = httpx.get(documents, params=page)
        assert refused.status_code == 400 and next(iter(page)) in refused.json()["error"]["message"], refused.text
    assert len(httpx.get(documents, params={"limit": 2**63 - 1, "offset": 1}).json()["data"]) == len(DOCS) - 1


@pytest.mark.parametrize("options, reason", [
    ({"temperature": -1}, "temperature"),
    ({"extra_body": {"k": 0}}, "k must be"),
    ({"extra_body": {"ratio": 2}}, "ratio"),
    ({"extra_body": {"compose": "nonsense"}}, "nonsense"),
    ({"extra_body": {"doc_ids": "nowhere"}}, "nowhere"),
    ({"extra_body": {"answer_style": "poem"}}, "poem"),
    ({"n": 2}, "n must be 1"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tool"),
])
def test_bad_input_is_a_4xx_with_a_one_line_reason(served, options, reason):
    with pytest.raises(openai.APIStatusError) as caught:
        ask(served.client(), QUESTIONS["tessin.txt"], max_tokens=4, **options)
    error = caught.value
    assert error.status_code == (404 if reason == "nowhere" else 400)
    message = error.body["message"]
    assert reason in message and "\n" not in message and "Traceback" not in message


def test_malformed_requests_and_a_question_past_the_window(served):
    url = f"{served.url}/v1/chat/completions"
    not_json = httpx.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["error"]["message"]
    assert httpx.post(url, json={"model": "kvzip-rag", "messages": []}).status_code == 400
    assert httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 400
    unknown = httpx.post(url, json={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]})
    assert unknown.status_code == 404 and "gpt-4" in unknown.json()["error"]["message"]
    long = httpx.post(url, json={"model": "kvzip-rag", "messages": [{"role": "user", "content": "word " * 5000}]})
    assert long.status_code == 400 and "\n" not in long.json()["error"]["message"]
    assert "2048" in long.json()["error"]["message"]


def test_a_client_leaving_a_stream_stops_its_answer_and_frees_the_server(served, service, monkeypatch):
    emitted: list[int] = []  # pieces passed on, per answer, in the order the answers were collected
    collect = QAService.collect

    def counting(self, source, emit=None):
        emitted.append(0)
        answer = len(emitted) - 1

        def count(piece):
            emitted[answer] += 1
            emit(piece)

        return collect(self, source, count if emit else None)

    monkeypatch.setattr(QAService, "collect", counting)
    question, limit = QUESTIONS["brask.txt"], 600
    body = {"model": "kvzip-rag", "messages": [{"role": "user", "content": question}], "max_tokens": limit,
            "clean": False, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(data)
    after = ask(served.client(), QUESTIONS["velmora.txt"], max_tokens=4)  # the model lock was given back
    assert after.model_extra["sources"][0]["doc_id"] == "velmora.txt"
    assert 3 <= emitted[0] < limit  # the streamed answer stopped early
    assert len(service.answer(question, max_new_tokens=limit, clean=False).best.answer.token_ids) == limit


def test_eight_concurrent_questions_each_get_their_own_answer_and_sources(served, service):
    expected = {doc: local(service, question, 6) for doc, question in QUESTIONS.items()}
    client = served.client()

    def one(item):
        doc, question = item
        return doc, ask(client, question, max_tokens=6)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, QUESTIONS.items()))
    for doc, response in answers:
        assert [s["doc_id"] for s in response.model_extra["sources"]] == [doc]
        assert response.choices[0].message.content == expected[doc]


def test_a_batching_server_answers_concurrent_questions_as_one_at_a_time(service, tiny_llama):
    """``kvzip-rag serve --batching``: the server over a batching service; concurrent questions (plain and streamed)
    decode together and each gets the answer and sources it gets alone."""
    batching = QAService(service.store, tiny_llama, batching=True)
    expected = {doc: local(service, question, 6) for doc, question in QUESTIONS.items()}
    running = Served(batching)
    try:
        client = running.client()

        def one(item):
            (doc, question), streamed = item
            if not streamed:
                return doc, ask(client, question, max_tokens=6)
            chunks = list(ask(client, question, max_tokens=6, stream=True))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
            return doc, SimpleNamespace(text=text, sources=last.model_extra["sources"])

        work = [(item, i % 2 == 1) for i, item in enumerate(list(QUESTIONS.items()) * 2)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, work))
        for doc, response in answers:
            if isinstance(response, SimpleNamespace):
                text, sources = response.text, response.sources
            else:
                text, sources = response.choices[0].message.content, response.model_extra["sources"]
            assert [s["doc_id"] for s in sources] == [doc] and text == expected[doc]
    finally:
        running.stop()


def test_a_closed_batching_service_answers_503_with_its_reason(service, tiny_llama):
    """A question the scheduler refuses (closed service; a full queue takes the same rule) is a 503 with the
    one-line reason, not a 500 or a hang."""
    batching = QAService(service.store, tiny_llama, batching=True)
    running = Served(batching)
    try:
        batching.close()
        with pytest.raises(openai.APIStatusError) as refused:
            ask(running.client(), next(iter(QUESTIONS.values())))
        assert refused.value.status_code == 503 and "closed" in str(refused.value)
    finally:
        running.stop()


ASKED = ["When was the {thing} of {town} opened?", "Who opened the {thing} of {town}?",
         "At what hour do visitors come to the {thing} of {town}?", "Which engineer built the {thing} of {town}?",
         "What is in {town}?", "Tell me about the {thing} of {town}.", "Is the {thing} of {town} old?",
         "Who is Ansel {town}son?"]


def test_sixty_four_concurrent_clients_get_their_own_answers_and_sources(service, tiny_llama):
    """64 distinct questions (8 per document, different lengths) at once against a batching server: each answer
    and its sources equal that question's one-at-a-time answer (no cross-talk), and every request ends (no hang:
    the client's timeout and the pool's wait bound the test)."""
    from concurrent.futures import wait

    work = [(f"{town.lower()}.txt", asked.format(town=town, thing=thing), 3 + n % 6, n % 2 == 1)
            for n, ((town, thing), asked) in enumerate((pair, asked) for pair in zip(TOWNS, THINGS) for asked in ASKED)]
    assert len({question for _, question, _, _ in work}) == 64
    expected = {question: service.answer(question, max_new_tokens=tokens) for _, question, tokens, _ in work}
    batching = QAService(service.store, tiny_llama, batching=True)
    running = Served(batching)
    try:
        client = running.client(timeout=60)

        def one(item):
            _, question, tokens, streamed = item
            if not streamed:
                response = ask(client, question, max_tokens=tokens)
                return response.choices[0].message.content, response.model_extra["sources"]
            chunks = list(ask(client, question, max_tokens=tokens, stream=True))
            last = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), last.model_extra["sources"]

        with ThreadPoolExecutor(64) as pool:
            futures = [pool.submit(one, item) for item in work]
            done, pending = wait(futures, timeout=120)
        assert not pending, f"{len(pending)} of 64 requests hung"
        assert batching.scheduler.peak_batch > 1  # answers were decoded together
        for (doc, question, _, _), future in zip(work, futures):
            text, sources = future.result()
            alone = expected[question]
            assert text == alone.text, question
            assert [(s["doc_id"], s["segment_index"]) for s in sources] == [
                (t.doc_id, t.segment_index) for t in alone.used], question
    finally:
        running.stop()


def test_a_request_past_the_timeout_is_a_504(service):
    running = Served(service, timeout=0.001)
    try:
        with pytest.raises(openai.APIStatusError) as caught:
            ask(running.client(), QUESTIONS["tessin.txt"], max_tokens=64, extra_body={"clean": False})
        assert caught.value.status_code == 504 and "timeout" in caught.value.body["message"]
        assert httpx.get(f"{running.url}/health").json()["status"] == "ok"
    finally:
        running.stop()


def test_langchain_chat_openai_talks_to_the_server(served, service):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    question = QUESTIONS["tessin.txt"]
    chat = langchain_openai.ChatOpenAI(base_url=f"{served.url}/v1", api_key="unused", model="kvzip-rag",
                                       max_tokens=8, temperature=0, max_retries=0)
    assert chat.invoke(question).content == local(service, question)
    assert "".join(chunk.content for chunk in chat.stream(question)) == local(service, question)


def test_ask_and_chat_with_server_print_as_the_local_commands_do(served, service, monkeypatch):
    from typer.testing import CliRunner

    from kvzip_rag.cli import app
    from kvzip_rag.cli import settings as cli_settings

    monkeypatch.setattr(cli_settings, "load_model_cached", lambda *a: pytest.fail("--server loaded a model"))
    runner = CliRunner(env={"COLUMNS": "200", "KVZIP_RAG_SERVER": None})
    question = QUESTIONS["varnay.txt"]
    result = runner.invoke(app, ["ask", question, "--server", served.url, "--max-tokens", "8", "--no-abstain"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == local(service, question, abstain_threshold=None).strip()
    assert "sources" in result.stderr and "varnay.txt segment 0" in result.stderr
    assert "answered by" in result.stderr
    by_env = CliRunner(env={"COLUMNS": "200", "KVZIP_RAG_SERVER": served.url}).invoke(
        app, ["ask", question, "--max-tokens", "8", "--doc", "morrow.txt"])
    assert by_env.exit_code == 0, by_env.output
    assert "morrow.txt segment 0" in by_env.stderr
    refused = runner.invoke(app, ["ask", question, "--server", served.url, "--doc", "nowhere"])
    assert refused.exit_code == 1 and "nowhere" in refused.stderr and "Traceback" not in refused.output
    down = runner.invoke(app, ["ask", question, "--server", "http://127.0.0.1:9"])
    assert down.exit_code == 1 and "cannot talk to the kvzip-rag server" in down.stderr
    chat = runner.invoke(app, ["chat", "--server", served.url, "--max-tokens", "6"],
                         input=f"{QUESTIONS['sellick.txt']}\nWho was the engineer?\nexit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.stdout.count("kvzip>") == 2 and "turn 2 · from sellick.txt" in chat.stderr


def test_serve_command_answers_and_finishes_a_stream_in_flight_on_sigterm(tmp_path, tiny_model_dir):  # noqa: F811
    import os
    import signal
    import subprocess
    import sys

    import kvzip_rag
    from kvzip_rag.store import CacheStore

    store = tmp_path / "store"
    CacheStore(store).add_document(kvzip_rag.load_model(str(tiny_model_dir), threads=1), DOCS["tessin.txt"],
                                   doc_id="tessin.txt")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    from kvzip_rag.matmul import bfloat16_matmul_supported

    matmul = "bfloat16" if bfloat16_matmul_supported() else "float32"  # the faster one this CPU has
    process = subprocess.Popen([sys.executable, "-m", "kvzip_rag.cli", "--store", str(store), "--model",
                                str(tiny_model_dir), "--threads", "1", "serve", "--port", str(port),
                                "--matmul", matmul],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        for _ in range(1200):
            if process.poll() is not None:
                break
            try:
                if httpx.get(f"{url}/health").json()["documents"] == 1:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            pytest.skip("kvzip-rag serve did not answer /health within two minutes")
        if process.poll() is not None:
            pytest.skip(f"kvzip-rag serve could not start: {process.stderr.read()[-500:]}")
        health = httpx.get(f"{url}/health").json()
        assert health["batching"] is True  # the server batches by default
        assert health["matmul"] == matmul
        body = {"model": "kvzip-rag", "messages": [{"role": "user", "content": QUESTIONS["tessin.txt"]}],
                "max_tokens": 300, "clean": False, "stream": True}
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)  # in flight: the answer is finished, then the server exits
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-2]
        assert process.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
        assert "serving" in process.stderr.read()
        with pytest.raises(httpx.ConnectError):  # gone: it accepts nothing after the shutdown
            httpx.get(f"{url}/health", timeout=5)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_bench_serve_task_measures_the_api_beside_the_server_and_ask_server(tmp_path, tiny_model_dir):  # noqa: F811
    import json

    from kvzip_rag.bench.serving import markdown, run_serve

    squad = tmp_path / "data" / "squad"
    squad.mkdir(parents=True)
    articles = [{"title": doc, "paragraphs": [{"context": DOCS[doc], "qas": [
        {"id": doc, "question": QUESTIONS[doc], "answers": []}]}]} for doc in list(DOCS)[:3]]
    (squad / "dev-v1.1-even-articles.json").write_text(json.dumps({"data": articles}))
    result = run_serve(str(tiny_model_dir), tmp_path / "data", threads=1, tokens=4, rounds=1, log=lambda _: None)
    for key in ("api_ttft_s", "http_ttft_s", "http_over_api", "cli_first_token_s", "cli_wall_s", "cli_over_http"):
        assert result[key]["n"] == 3 and result[key]["low"] <= result[key]["median"] <= result[key]["high"], key
    assert result["documents"] == 3 and "HTTP / API TTFT" in markdown(result)


def test_bench_serve_http_sweep_rows_table_and_plot(tmp_path, tiny_model_dir):  # noqa: F811
    import json

    from kvzip_rag.bench.serve_sweep import plot
    from kvzip_rag.bench.serving import markdown, run_serve

    squad = tmp_path / "data" / "squad"
    squad.mkdir(parents=True)
    articles = [{"title": doc, "paragraphs": [{"context": DOCS[doc], "qas": [
        {"id": doc, "question": QUESTIONS[doc], "answers": []}]}]} for doc in list(DOCS)[:3]]
    (squad / "dev-v1.1-even-articles.json").write_text(json.dumps({"data": articles}))
    result = run_serve(str(tiny_model_dir), tmp_path / "data", threads=1, tokens=3, log=lambda _: None,
                       overhead=False, sweep={"clients": (1, 2), "requests": 3, "tokens": 3,
                                              "servers": ("serial", "batched")})
    rows = result["sweep"]["rows"]
    assert [(r["server"], r["clients"]) for r in rows] == [("serial", 1), ("serial", 2), ("batched", 1),
                                                          ("batched", 2)]
    for row in rows:
        assert row["n"] == 3 and row["failed"] == 0 and row["tokens_per_s"] > 0 and row["peak_rss_mb"] > 0
        assert row["ttft_p50_s"] <= row["latency_p95_s"]
    assert "| batched | 2 | 3 | 0 |" in markdown(result) and "api_ttft_s" not in result
    assert plot(result["sweep"], tmp_path).stat().st_size > 0
    cut = run_serve(str(tiny_model_dir), tmp_path / "data", threads=1, log=lambda _: None, overhead=False,
                    sweep={"servers": ("serial",), "budget_s": 0})
    assert cut["sweep"]["cut"] and cut["sweep"]["rows"] == []
