"""``kvzip-rag ask`` and ``chat``: the core QA service (:mod:`kvzip_rag.qa`) with streaming to the terminal.

``ask --k N`` does what ``similarity_top_k=N`` and LangChain's ``k=N`` do: the N routed caches are joined into one
that answers once (``--compose``, default parallel; best-of-k keeps the best of N answers); ``--k 1`` answers from
the one cache. Tokens stream live (best-of-k: once the best answer is chosen) when stdout is a terminal; piped,
stdout gets the final answer only, which is the abstention when the evidence is too weak (:mod:`kvzip_rag.abstain`).
The quoted evidence and the abstention notice go to stderr with the sources.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Annotated

import typer

from kvzip_rag.composers import DEFAULT_COMPOSE

from .app import app, settings_of
from .output import answer_figures, compression_line, console, say, show, stream_to_console
from .serving import ServerOpt, remote_ask, remote_chat, remote_fields
from .settings import CLIError, Settings, handle_errors


def check_doc(settings: Settings, store, doc: str | None) -> None:
    from kvzip_rag.errors import DocumentNotFoundError

    if doc is not None and doc not in store:
        raise DocumentNotFoundError(f"no document {doc!r} in the store at {settings.describe_store()} "
                                    "(see `kvzip-rag ls`)")
    if len(store) == 0:
        raise CLIError(f"the store at {settings.describe_store()} holds no documents; index some first: "
                       "kvzip-rag index PATH")


def refuse_unmatched(fallback: bool, doc: str | None) -> None:
    """Without --doc, a question that matches no word is refused (not guessed)."""
    if fallback and doc is None:
        raise CLIError("no indexed document matches the words of this question; rephrase it, or pick a "
                       "document with --doc (see `kvzip-rag ls`)")


def route(qa, question: str, k: int, doc: str | None):
    """The service's routing (see :func:`refuse_unmatched`); the store was checked by :func:`check_doc`."""
    routing = qa.route(question, k, [doc] if doc else None)
    refuse_unmatched(routing.fallback, doc)
    return routing


@app.command()
@handle_errors
def ask(
    ctx: typer.Context,
    question: Annotated[str, typer.Argument(help="The question.", show_default=False)],
    doc: Annotated[str | None, typer.Option("--doc", help="Answer from this document only.")] = None,
    k: Annotated[int, typer.Option("--k", min=1, help="Segments to retrieve; their caches make one answer (see "
                                                      "--compose; as similarity_top_k / k).")] = 1,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, help="Most tokens in the answer.")] = 128,
    compose: Annotated[str, typer.Option("--compose", help="With --k > 1: parallel or sequential (the k caches "
                                                           "joined into one that answers once), or best-of-k (each "
                                                           "cache answers, the best is kept).")] = DEFAULT_COMPOSE,
    quote: Annotated[bool, typer.Option("--quote", help="Answer with a verbatim span of the documents (quote "
                                                        "mode), cited exactly.")] = False,
    evidence: Annotated[bool, typer.Option("--evidence/--no-evidence", help="Quote the sentences the answer "
                                           "attended to (and allow abstention).")] = True,
    abstain_threshold: Annotated[float | None, typer.Option(
        "--abstain-threshold", min=0.0, max=1.0, show_default="calibrated",
        help="Abstain when the evidence score (a probability) is below this.")] = None,
    no_abstain: Annotated[bool, typer.Option("--no-abstain", help="Never abstain.")] = False,
    server: ServerOpt = None,
) -> None:
    """Answer a question from the best matching compressed cache(s), streaming the answer, then the evidence it
    rests on (or that the documents do not say)."""
    if server:  # the server checks everything; nothing heavy is imported here
        return remote_ask(server, question, remote_fields(doc, k, max_tokens, compose, quote, evidence,
                                                          abstain_threshold, not no_abstain))
    from kvzip_rag.abstain import DEFAULT_THRESHOLD
    from kvzip_rag.composers import get_composer
    from kvzip_rag.qa import check_question

    settings = settings_of(ctx)
    question = check_question(question)
    get_composer(compose)  # arguments and the store first: a mistake is reported before the model loads
    check_doc(settings, settings.open_store(), doc)
    qa = settings.service()
    routing = route(qa, question, k, doc)
    threshold = None if no_abstain else DEFAULT_THRESHOLD if abstain_threshold is None else abstain_threshold
    stream = qa.stream(question, targets=routing.targets, max_new_tokens=max_tokens, compose=compose,
                       answer_style="quote" if quote else "free", evidence=evidence, abstain_threshold=threshold)
    live = console.is_terminal  # a person watching: stream; a pipe gets only the final answer (or the abstention)
    if live:
        stream_to_console(stream)
    else:
        for _ in stream:
            pass
        stream_to_console([stream.result.text])
    print_evidence(stream.result, live, quoted=quote and not stream.result.abstained)
    print_footer(stream.result, routing)


def print_evidence(result, streamed: bool, quoted: bool = False) -> None:
    """The abstention (a ``streamed`` text was only the candidate), then the evidence, dim, by document (a
    ``quoted`` answer's exact place in the stored text). ``result``: a ``QAResult`` or a chat ``Turn``."""
    if result.abstained:
        candidate = "the answer above" if streamed else f"the candidate “{show(result.candidate)}”"
        say(f"[bold yellow]{show(result.abstain_text)}[/bold yellow] [dim](evidence score "
            f"{result.evidence_score:.2f} is below the abstention threshold: {candidate} is not supported by the "
            "documents)[/dim]", soft_wrap=True)
    else:
        print_unsupported(result.unsupported_numbers)
    print_citations(result.citations, quoted)


def print_unsupported(numbers) -> None:
    """A warning, before the citations, for the answer's numbers that none of its documents holds
    (:func:`kvzip_rag.abstain.unsupported_numbers`)."""
    if numbers:
        say(f"[bold yellow]Not in the documents: {show(', '.join(numbers))}[/bold yellow] [dim](numbers in the "
            "answer that none of the documents it was answered from holds, in digits or in words: check "
            "them)[/dim]", soft_wrap=True)


def print_citations(citations, quoted: bool = False) -> None:
    for citation in citations:
        if quoted:
            say(f"[dim]quoted from {show(citation.doc_id)} segment {citation.segment_index}, characters "
                f"{citation.start}-{citation.end}[/dim]")
            continue
        quote = " ".join(citation.text.split())
        say(f"[dim]  “{show(quote)}” — [cyan]{show(citation.doc_id)}[/cyan] segment {citation.segment_index}, "
            f"{citation.weight:.0%} of the evidence[/dim]", soft_wrap=True)


def print_footer(result, routing) -> None:
    """Every routed segment, in routing order, marked with what it did for the answer (``source_metadata``)."""
    roles = result.source_metadata()
    if result.composed:
        how = f" [dim]({show(result.compose)}: one answer from {len(result.used)} caches joined)[/dim]"
    elif len(result.answers) > 1:
        how = f" [dim](best of {len(result.answers)}: each cache answered, the marked answer was kept)[/dim]"
    else:
        how = ""
    lines = [f"[bold]sources[/bold]{how}"]
    for target in routing.targets:
        role = roles.get(target.node_id, {})
        mark = (" [green]← answer[/green]" if role.get("chosen") and len(result.answers) > 1
                else " [yellow]← left out: the model's window was full[/yellow]" if role.get("composed") is False
                else "")
        if target.routing == "fallback":
            lines.append(f"[cyan]{show(target.doc_id)}[/cyan] segment {target.segment_index} (no word of the "
                         f"question matched: taken in document order){mark}")
            continue
        snippet = " ".join(target.text.split())[:90]
        lines.append(f"[cyan]{show(target.doc_id)}[/cyan] segment {target.segment_index} (score "
                     f"{target.score:.2f}): [dim]{show(snippet)}…[/dim]{mark}")
    best = result.best
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
    quote: Annotated[bool, typer.Option("--quote", help="Answer with a verbatim span of the documents (quote "
                                                        "mode), cited exactly.")] = False,
    server: ServerOpt = None,
) -> None:
    """A conversation over the compressed caches: every question is routed, follow-ups continue in the cache.

    A question about another document brings that document into the conversation's cache (composed beside the
    earlier ones; the footer says which documents each answer used). Reads one question per line until end of input
    or "exit"; "/reset" forgets the conversation.
    """
    from kvzip_rag.dialogue import ChatSession
    from kvzip_rag.errors import ContextTooLongError

    if server:
        return remote_chat(server, remote_fields(doc, 1, max_tokens, None, quote, True, None, True),
                           sys.stdin.isatty())
    settings = settings_of(ctx)
    check_doc(settings, settings.open_store(), doc)  # before the model loads
    qa = settings.service()
    sampling = {"max_new_tokens": max_tokens, "answer_style": "quote" if quote else "free"}
    session = ChatSession(qa, doc_ids=[doc] if doc else None, sampling=sampling)
    interactive = sys.stdin.isatty()
    say("[dim]Ask a question; follow-ups continue the conversation, another topic brings in its document. /reset "
        "starts over, exit or Ctrl-D quits.[/dim]")
    for question in chat_questions(interactive, session.reset):
        try:
            plan = session.plan(question)
            if plan.change == "new":
                refuse_unmatched(plan.fallback, doc)
            console.print("[bold blue]kvzip>[/bold blue] ", end="")
            try:
                turn = _turn(session, question, plan)
            except ContextTooLongError:
                if session.conversation is None:  # the document alone leaves no room for this answer
                    raise
                session.conversation.reset()
                say("[yellow]the conversation filled the model's window: it starts over from the document[/yellow]")
                turn = _turn(session, question, None)
            print_evidence(turn, streamed=True, quoted=quote and not turn.abstained)
            print_chat_footer(session, turn)
        except CLIError as error:  # e.g. no document matches: say so and keep the loop going
            say(f"[red]{show(str(error))}[/red]")


def _turn(session, question: str, plan):
    from kvzip_rag.bridge import push_in_thread

    def work(emit) -> None:
        holder.append(session.ask(question, emit=emit, plan=plan))

    holder = []
    stream_to_console(push_in_thread(work))
    return holder[0]


_CHANGES = {"new": "talking about", "recomposed": "now talking about", "switched": "switched to"}


def print_chat_footer(session, turn) -> None:
    """Which documents the answer used (and what changed in the conversation's cache), then its figures."""
    names = ", ".join(show(d) for d in turn.info["doc_ids"])
    if turn.change in _CHANGES:
        say(f"[dim]{_CHANGES[turn.change]} {names} · "
            f"{compression_line(session.conversation.cache, turn.info['bytes_loaded'])}[/dim]")
    for dropped in turn.dropped:
        why = ("the model's window cannot hold it beside the conversation" if dropped.reason == "window" else
               f"a conversation keeps at most {session.max_documents} documents")
        say(f"[yellow]left {show(dropped.target.doc_id)} out of the conversation ({why})[/yellow]")
    say(f"[dim]{answer_figures(turn.answer, turn.info['cache_load_s'])} · turn {len(session.conversation.turns)} "
        f"· from {names}[/dim]")


def chat_questions(interactive: bool, reset: Callable[[], None]) -> Iterator[str]:
    """The questions typed into a chat (local or ``--server``): a line that is not UTF-8 is refused and the chat
    goes on, ``exit``/``quit`` or the end of input ends it, ``/reset`` calls ``reset``; piped questions are echoed."""
    while True:
        try:
            question = _read_line(interactive)
        except UnicodeError:
            say("[red]that line is not UTF-8 text: it was ignored; type the question again[/red]")
            continue
        if question is None or question.lower() in ("exit", "quit", "/exit", "/quit"):
            return
        if not question:
            continue
        if question == "/reset":
            reset()
            say("[dim]conversation reset[/dim]")
            continue
        if not interactive:
            console.print(f"[bold green]you>[/bold green] {show(question)}")
        yield question


def _read_line(interactive: bool) -> str | None:
    """One question; None at end of input. ``UnicodeError`` for a line that is not UTF-8 (undecodable bytes, or
    the lone surrogates Python's surrogateescape makes of them, never reach the model)."""
    if interactive:
        say("[bold green]you>[/bold green] ", end="")
        try:
            line = input()  # line editing and history where readline is available
        except EOFError:
            return None
    else:
        stream = getattr(sys.stdin, "buffer", None)
        raw = stream.readline() if stream is not None else sys.stdin.readline()
        if not raw:
            return None
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    line.encode("utf-8")
    return line.strip()
