"""``kvzip-rag ask`` and ``chat``: the core QA service (:mod:`kvzip_rag.qa`) with streaming to the terminal.

``ask --k N`` does what ``similarity_top_k=N`` and LangChain's ``k=N`` do: every routed cache answers and the best
answer is kept (best-of-k); ``--k 1`` streams tokens live.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .app import app, settings_of
from .output import answer_figures, compression_line, console, say, show, stream_to_console
from .settings import (
    BlobUrlOpt,
    CLIError,
    DbOpt,
    DeviceOpt,
    LevelOpt,
    ModelOpt,
    RatioOpt,
    Settings,
    StoreOpt,
    ThreadsOpt,
    handle_errors,
)


def check_doc(settings: Settings, store, doc: str | None) -> None:
    from kvzip_rag.errors import DocumentNotFoundError

    if doc is not None and doc not in store:
        raise DocumentNotFoundError(f"no document {doc!r} in the store at {settings.describe_store()} "
                                    "(see `kvzip-rag ls`)")
    if len(store) == 0:
        raise CLIError(f"the store at {settings.describe_store()} holds no documents; index some first: "
                       "kvzip-rag index PATH")


def route(settings: Settings, qa, question: str, k: int, doc: str | None):
    """The service's routing; without --doc, a question that matches no word is refused (not guessed)."""
    check_doc(settings, qa.store, doc)
    routing = qa.route(question, k, [doc] if doc else None)
    if routing.fallback and doc is None:
        raise CLIError("no indexed document matches the words of this question; rephrase it, or pick a "
                       "document with --doc (see `kvzip-rag ls`)")
    return routing


@app.command()
@handle_errors
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.", show_default=False)],
    doc: Annotated[str | None, typer.Option("--doc", help="Answer from this document only.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Segments to retrieve; each one's cache answers and the best "
                                                      "answer is kept (as similarity_top_k / k).")] = 1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens in the answer.")] = 128,
    compose: Annotated[str, typer.Option("--compose", help="With --k > 1: best-of-k (each cache answers, the best "
                                                           "is kept), or parallel / sequential (the k caches joined "
                                                           "into one that answers once).")] = "best-of-k",
    store: StoreOpt = None, db: DbOpt = None, blob_url: BlobUrlOpt = None, model: ModelOpt = None,
    ratio: RatioOpt = None, level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Answer a question from the best matching compressed cache(s), streaming the answer."""
    from kvzip_rag.qa import check_question

    settings = settings_of(ctx, store=store, db=db, blob_url=blob_url, model=model, ratio=ratio, level=level,
                           device=device, threads=threads)
    question = check_question(question)
    qa = settings.service()
    routing = route(settings, qa, question, k, doc)
    stream = qa.stream(question, targets=routing.targets, max_new_tokens=max_tokens, compose=compose)
    stream_to_console(stream)
    print_footer(stream.result, routing)


def print_footer(result, routing) -> None:
    lines = ["[bold]sources[/bold]"]
    for answer, target in ((a, t) for a in result.answers for t in (a.target, *a.also)):
        chosen = " [green]← answer[/green]" if len(result.answers) > 1 and answer is result.best else ""
        if target.routing == "fallback":
            lines.append(f"[cyan]{show(target.doc_id)}[/cyan] segment {target.segment_index} (no word of the "
                         f"question matched; answered from the first segment){chosen}")
            continue
        snippet = " ".join(target.text.split())[:90]
        lines.append(f"[cyan]{show(target.doc_id)}[/cyan] segment {target.segment_index} (score "
                     f"{target.score:.2f}): [dim]{show(snippet)}…[/dim]{chosen}")
    best = result.best
    if best.dropped:
        lines.append("[yellow]left out (the model's window was full):[/yellow] "
                     + ", ".join(f"{show(t.doc_id)} segment {t.segment_index}" for t in best.dropped))
    lines.append("[bold]timings[/bold]      " + answer_figures(best.answer, result.cache_load_s, routing.seconds))
    lines.append("[bold]compression[/bold]  " + _compression(best))
    say("\n".join(lines), soft_wrap=True)


def _compression(answer) -> str:
    kept, full = answer.cache_nbytes, answer.full_nbytes
    from .output import human_bytes

    read = "served from memory" if answer.bytes_loaded == 0 else f"{human_bytes(answer.bytes_loaded)} read from disk"
    return (f"ratio {answer.ratio:g} ({answer.level}) · KV {human_bytes(kept)} vs {human_bytes(full)} full "
            f"({full / max(kept, 1):.1f}x smaller) · {answer.target_tokens} context tokens · {read}")


@app.command()
@handle_errors
def chat(
    ctx: typer.Context,
    doc: Annotated[str | None, typer.Option("--doc", help="Talk about this document (default: the one the first "
                                                          "question matches).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens per answer.")] = 128,
    store: StoreOpt = None, db: DbOpt = None, blob_url: BlobUrlOpt = None, model: ModelOpt = None,
    ratio: RatioOpt = None, level: LevelOpt = None, device: DeviceOpt = None, threads: ThreadsOpt = None,
) -> None:
    """Follow-up questions about one document; the conversation stays in its compressed cache.

    Reads one question per line until end of input or "exit"; "/reset" forgets the conversation (the next
    question is routed again).
    """
    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.errors import ContextTooLongError

    settings = settings_of(ctx, store=store, db=db, blob_url=blob_url, model=model, ratio=ratio, level=level,
                           device=device, threads=threads)
    qa = settings.service()
    check_doc(settings, qa.store, doc)
    session = ChatSession(qa, doc_ids=[doc] if doc else None, sampling={"max_new_tokens": max_tokens})
    interactive = sys.stdin.isatty()
    say("[dim]Ask a question; follow-ups stay in the same document. /reset starts over, exit or Ctrl-D quits.[/dim]")
    while True:
        question = _read_line(interactive)
        if question is None or question.lower() in ("exit", "quit", "/exit", "/quit"):
            break
        if not question:
            continue
        if question == "/reset":
            session.reset()
            say("[dim]conversation reset[/dim]")
            continue
        if not interactive:
            console.print(f"[bold green]you>[/bold green] {show(question)}")
        try:
            if session.conversation is None:
                route(settings, qa, question, 1, doc)
                session.route(question)
            console.print("[bold blue]kvzip>[/bold blue] ", end="")
            try:
                turn = _turn(session, question)
            except ContextTooLongError:
                session.conversation.reset()
                say("[yellow]the conversation filled the model's window: it starts over from the document[/yellow]")
                turn = _turn(session, question)
            if len(session.conversation.turns) == 1:
                cache = session.conversation.cache
                say(f"[dim]talking about {show(session.targets[0].doc_id)} · "
                    f"{compression_line(cache, turn.info.get('bytes_loaded'))}[/dim]")
            say(f"[dim]{answer_figures(turn.answer, turn.info.get('cache_load_s', 0.0))} · "
                f"turn {len(session.conversation.turns)}[/dim]")
        except CLIError as error:  # e.g. no document matches: say so and keep the loop going
            say(f"[red]{show(str(error))}[/red]")


def _turn(session, question: str):
    from kvzip_rag.bridge import push_in_thread

    holder = []
    stream_to_console(push_in_thread(lambda emit: holder.append(session.ask(question, emit=emit))))
    return holder[0]


def _read_line(interactive: bool) -> str | None:
    if interactive:
        say("[bold green]you>[/bold green] ", end="")
        try:
            return input().strip()  # line editing and history where readline is available
        except EOFError:
            return None
    line = sys.stdin.readline()
    return line.strip() if line else None
