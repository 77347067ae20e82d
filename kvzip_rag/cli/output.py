"""What the CLI prints: consoles, one-line errors and notes, safe rendering of ids and names, figures."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

from kvzip_rag.text import safe_text

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def show(value: object) -> str:
    """Any id, metadata value or file name, ready for rich markup: control characters escaped, markup escaped."""
    return escape(safe_text(value))


def say(*objects, **options) -> None:
    """Print to stderr (notes, progress, timings) after flushing stdout, so piped output keeps its order."""
    console.file.flush()
    err_console.print(*objects, **options)


def print_table(table) -> None:
    """Tables on stdout; when stdout is not a terminal, as wide as they need (no 80-column folding)."""
    if console.is_terminal:
        console.print(table)
    else:
        width = console.measure(table, options=console.options.update_width(400)).maximum
        Console(file=console.file, width=max(width, 40), highlight=False).print(table)


def fail(message: str, code: int = 1) -> None:
    """One red line on stderr, then exit."""
    first = (safe_text(message).strip().splitlines() or [""])[0]
    say(f"[bold red]error:[/bold red] [red]{escape(first)}[/red]")
    raise typer.Exit(code)


def problem(message: str) -> None:
    say(f"[red]{escape(safe_text(message))}[/red]")


def note(message: str) -> None:
    say(f"[yellow]note:[/yellow] {escape(safe_text(message))}")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def compression_line(cache, read_nbytes: int | None = None) -> str:
    info = cache.info
    kept, full = cache.nbytes, cache.full_nbytes
    parts = [
        f"ratio {info.ratio:g} ({info.level})",
        f"KV {human_bytes(kept)} vs {human_bytes(full)} full ({full / max(kept, 1):.1f}x smaller)",
        f"{info.context_length} context tokens",
    ]
    if read_nbytes is not None:
        parts.append("served from memory" if read_nbytes == 0 else f"{human_bytes(read_nbytes)} read from disk")
    return " · ".join(parts)


def answer_figures(answer, load_s: float, retrieval_s: float | None = None) -> str:
    tokens = len(answer.token_ids)
    rate = (tokens - 1) / answer.decode_s if tokens > 1 and answer.decode_s > 0 else 0.0
    parts = [] if retrieval_s is None else [f"retrieval {retrieval_s * 1000:.0f} ms"]
    parts += [f"cache load {load_s * 1000:.0f} ms", f"first token {answer.time_to_first_token_s * 1000:.0f} ms",
              f"decode {rate:.1f} tok/s ({tokens} tokens)"]
    return " · ".join(parts)


def stream_to_console(pieces) -> None:
    """Print text pieces as they come (markup off: answers are plain text), then a newline."""
    for piece in pieces:
        console.print(safe_text(piece, keep_newlines=True), end="", markup=False, soft_wrap=True)
        console.file.flush()
    console.print()
