"""Files to index: which ones, under which ids, and their plain text (.txt .md .html .htm .pdf)."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

from kvzip_rag.text import decode_text, safe_path

from .output import note, problem
from .settings import CLIError

SUPPORTED = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html",
             ".htm": "html", ".pdf": "pdf"}
KINDS = ".txt, .md, .html, .htm or .pdf"


def extract_text(path: Path) -> str:
    """The plain text of a .txt, .md, .html/.htm (BeautifulSoup) or .pdf (pypdf) file. Text and HTML that are not
    UTF-8 are decoded in their detected (HTML: declared) encoding, with a note saying which; a file no encoding
    decodes without replacement characters is refused (nothing is indexed with U+FFFD in it)."""
    kind = SUPPORTED.get(path.suffix.lower())
    if kind in ("text", "markdown"):
        text, encoding = decode_text(path.read_bytes(), safe_path(path))
        _say_encoding(path, encoding)
        return text
    if kind == "html":
        from bs4 import BeautifulSoup, UnicodeDammit

        dammit = UnicodeDammit(path.read_bytes(), is_html=True)
        if dammit.unicode_markup is None or dammit.contains_replacement_characters:
            raise CLIError(f"{safe_path(path)} is not UTF-8 and its encoding could not be detected; convert it to "
                           "UTF-8")
        _say_encoding(path, dammit.original_encoding or "utf-8")
        soup = BeautifulSoup(dammit.unicode_markup, "html.parser")
        for tag in soup(["script", "style", "noscript", "template", "head"]):
            tag.decompose()
        title = soup.title.get_text(strip=True) if soup.title else ""
        lines = [line.strip() for line in soup.get_text("\n").splitlines()]
        text = "\n".join(_collapse_blank(lines))
        return f"{title}\n\n{text}" if title and not text.startswith(title) else text
    if kind == "pdf":
        from pypdf import PdfReader
        from pypdf.errors import PdfReadError

        try:
            reader = PdfReader(str(path))
            pages = [page.extract_text() or "" for page in reader.pages]
        except (PdfReadError, ValueError, KeyError) as error:
            raise CLIError(f"cannot read PDF {path}: {error}") from error
        return "\n\n".join(p.strip() for p in pages if p.strip())
    raise CLIError(f"unsupported file type {path.suffix!r}: {path}")


def _say_encoding(path: Path, encoding: str) -> None:
    if encoding.lower().replace("_", "-") not in ("utf-8", "ascii"):
        note(f"{path} is not UTF-8: decoded as {encoding} (detected)")


def _collapse_blank(lines: list[str]) -> Iterator[str]:
    blank = False
    for line in lines:
        if line:
            blank = False
            yield line
        elif not blank:
            blank = True
            yield ""


def _regular(path: Path) -> bool:
    """A regular file (following links)? FIFOs, sockets and devices would block or never end when read."""
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def _valid_name(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in the file name (surrogate escapes)
        return False
    return True


def collect_files(paths: list[Path]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """``(file, document id)`` for every supported regular file under ``paths`` (ids: paths relative to the folder
    given, or the file's name), and the files that cannot be indexed (reported here: the others go on)."""
    found: list[tuple[Path, str]] = []
    rejected: list[Path] = []

    def add(path: Path, doc_id: str) -> None:
        if not _regular(path):
            note(f"skipping {path}: not a regular file (a pipe, socket or device cannot be indexed)")
        elif not _valid_name(doc_id):
            problem(f"{path}: the file name is not valid UTF-8, so it cannot be a document id; rename the file "
                    "(or index it alone with --id)")
            rejected.append(path)
        else:
            found.append((path, doc_id))

    for path in paths:
        if not path.exists():
            raise CLIError(f"no such file or folder: {path}")
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*")
                if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            supported = [p for p in files if p.suffix.lower() in SUPPORTED]
            for skipped in (p for p in files if p.suffix.lower() not in SUPPORTED):
                note(f"skipping {skipped} (not {KINDS})")
            if not supported:
                raise CLIError(f"folder {path} holds no {KINDS} files: nothing to index")
            for p in supported:
                add(p, p.relative_to(path).as_posix())
        elif path.suffix.lower() in SUPPORTED:
            add(path, path.name)
        else:
            note(f"skipping {path} (not {KINDS})")
    if not found and not rejected:
        raise CLIError(f"none of the given paths is a {KINDS} file: nothing to index")
    return found, rejected
