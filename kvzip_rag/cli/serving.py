"""``kvzip-rag serve``: the OpenAI-compatible server (:mod:`kvzip_rag.serve`) over the store and model of the global
options; and ``ask``/``chat --server URL``: the same output as ``ask``/``chat``, answered by a running server."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer

from .app import app, settings_of
from .output import console, say, show, stream_to_console
from .settings import Settings, handle_errors

ServerOpt = Annotated[str | None, typer.Option(
    "--server", envvar="KVZIP_RAG_SERVER", metavar="URL",
    help="Ask a running `kvzip-rag serve` at this URL instead of loading the model here.")]


@app.command()
@handle_errors
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: "
                                                     "every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, metavar="SECONDS",
                                                  help="Most seconds a request may take (then 504).")] = None,
    batching: Annotated[bool, typer.Option("--batching/--no-batching",
                                           help="Decode concurrent requests' answers together (continuous batching; "
                                                "see the README's Batched answering). --no-batching answers one "
                                                "request at a time.")] = True,
    ray: Annotated[bool, typer.Option("--ray", help="Serve with replicas on Ray Serve (kvzip-rag\\[ray]): each "
                                                    "loads the model once; all share the store.")] = False,
    replicas: Annotated[int, typer.Option("--replicas", min=1,
                                          help="Replicas on Ray Serve (more than 1 implies --ray).")] = 1,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="The Ray cluster to join (auto, "
                                                                         "ray://head:10001); implies --ray.")] = None,
) -> None:
    """Serve the store over HTTP with the OpenAI chat-completions and completions API (streaming by SSE), plus
    /v1/documents and /health. Ctrl-C (or SIGTERM) stops it after the requests in flight."""
    from kvzip_rag.serve import make_server

    settings = settings_of(ctx)
    settings.open_store(create=True)  # a new store is fine: documents can be added through /v1/documents
    if ray or ray_address or replicas > 1:
        serve_on_ray(settings, host, port, timeout, batching, replicas, ray_address)
        return
    service = settings.service(batching=batching)
    server = make_server(service, host, port, timeout=timeout)
    say(f"[bold]serving[/bold] {show(service.model.name)} over {show(settings.describe_store())} at "
        f"[cyan]http://{host}:{port}/v1[/cyan] [dim](Ctrl-C stops)[/dim]")
    server.run()


def serve_on_ray(settings: Settings, host: str, port: int, timeout: float | None, batching: bool, replicas: int,
                 address: str | None) -> None:
    """``serve --ray``: the same app as replicas on Ray Serve until Ctrl-C or SIGTERM (also while the replicas
    start), then Ray Serve and a local cluster stop."""
    import signal
    import threading

    from kvzip_rag.serve.replicas import ReplicaSettings, deploy, shutdown
    from kvzip_rag.store.distributed import init_ray

    store = {k: str(v) if isinstance(v, Path) else v for k, v in settings.store_location().items()}
    replica = ReplicaSettings(store, model=settings.model, ratio=settings.ratio, level=settings.level,
                              batching=batching, timeout=timeout, threads=settings.threads or 1,
                              matmul=settings.matmul)
    say(f"[dim]starting {replicas} replica(s) on Ray Serve (each loads the model)…[/dim]")
    init_ray(address)  # first: Ray's own SIGTERM handler (which aborts the process) is replaced below
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        url = deploy(replica, replicas, host, port)
        say(f"[bold]serving[/bold] {show(settings.model or 'the default model')} with {replicas} Ray Serve "
            f"replica(s) over {show(settings.describe_store())} at [cyan]{url}/v1[/cyan] [dim](Ctrl-C stops)[/dim]")
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown()


def _interrupt(*_: object) -> None:
    """SIGTERM as Ctrl-C: it interrupts whatever the main thread waits on."""
    raise KeyboardInterrupt


def remote_fields(doc: str | None, k: int, max_tokens: int, compose: str | None, quote: bool, evidence: bool,
                  threshold: float | None, abstain: bool) -> dict:
    """The request's body fields for the options of ``ask``/``chat`` (the server checks them)."""
    fields = {"k": k, "max_tokens": max_tokens, "answer_style": "quote" if quote else "free", "evidence": evidence}
    if doc is not None:
        fields["doc_ids"] = [doc]
    if compose is not None:
        fields["compose"] = compose
    if not abstain:
        fields["abstain_threshold"] = None
    elif threshold is not None:
        fields["abstain_threshold"] = threshold
    return fields


def remote_turn(server: str, messages: Sequence[tuple[str, str]], fields: dict, live: bool):
    """One answer from the server: streamed to stdout when ``live`` (else the final answer only), then the
    abstention and citations on stderr, as ``ask`` prints them; returns the :class:`RemoteAnswer`."""
    from kvzip_rag.abstain import DEFAULT_ABSTAIN_TEXT
    from kvzip_rag.answers import Citation
    from kvzip_rag.serve.client import Remote, RemoteAnswer

    from .answering import print_citations, print_unsupported

    answer = RemoteAnswer()
    pieces = Remote(server).stream(messages, answer, **fields)
    if live:
        stream_to_console(pieces)
    else:
        for _ in pieces:
            pass
        stream_to_console([DEFAULT_ABSTAIN_TEXT if answer.abstained else answer.text])
    if answer.abstained:
        candidate = "the answer above" if live else f"the candidate “{show(answer.text)}”"
        say(f"[bold yellow]{show(DEFAULT_ABSTAIN_TEXT)}[/bold yellow] [dim](the evidence is below the abstention "
            f"threshold: {candidate} is not supported by the documents)[/dim]", soft_wrap=True)
    else:
        print_unsupported(answer.unsupported_numbers)
    names = [f.name for f in Citation.__dataclass_fields__.values()]
    print_citations([Citation(**{n: c[n] for n in names}) for c in answer.citations],
                    fields.get("answer_style") == "quote" and not answer.abstained)
    return answer


def remote_ask(server: str, question: str, fields: dict) -> None:
    """``ask --server``: the answer, its evidence, then its sources and the latency seen here."""
    answer = remote_turn(server, [("user", question)], fields, console.is_terminal)
    lines = ["[bold]sources[/bold]"]
    for source in answer.sources:
        if source["routing"] == "fallback":
            lines.append(f"[cyan]{show(source['doc_id'])}[/cyan] segment {source['segment_index']} (no word of the "
                         "question matched: taken in document order)")
            continue
        snippet = " ".join(source["text"].split())[:90]
        lines.append(f"[cyan]{show(source['doc_id'])}[/cyan] segment {source['segment_index']} (score "
                     f"{source['score'] or 0:.2f}): [dim]{show(snippet)}…[/dim]")
    lines.append(f"[bold]timings[/bold]      {_latency(answer)} · answered by {show(server)}")
    say("\n".join(lines), soft_wrap=True)


def remote_chat(server: str, fields: dict, interactive: bool) -> None:
    """``chat --server``: the conversation is kept here and sent whole each turn (the server replays it)."""
    from .answering import chat_questions

    messages: list[tuple[str, str]] = []
    for question in chat_questions(interactive, messages.clear):
        console.print("[bold blue]kvzip>[/bold blue] ", end="")
        answer = remote_turn(server, [*messages, ("user", question)], fields, True)
        messages += [("user", question), ("assistant", answer.text)]
        names = ", ".join(dict.fromkeys(show(s["doc_id"]) for s in answer.sources))
        say(f"[dim]{_latency(answer)} · turn {len(messages) // 2} · from {names}[/dim]")


def _latency(answer) -> str:
    first = f"first token {answer.first_token_s:.2f} s · " if answer.first_token_s is not None else ""
    return f"{first}total {answer.total_s:.2f} s"
