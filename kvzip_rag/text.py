"""Text shown to people: ids, metadata and file names rendered without terminal control sequences."""

from __future__ import annotations

import os
import unicodedata


def safe_text(value: object, keep_newlines: bool = False) -> str:
    """``value`` as printable text: control characters (ESC, BEL, CR, ...; C0, C1 and DEL) and lone surrogates
    are shown as ``\\xNN`` / ``\\uNNNN`` escapes, so a document id or file name cannot move the cursor, clear the
    screen or set the window title. Tabs stay as they are (and newlines with ``keep_newlines``, for answers)."""
    text = value if isinstance(value, str) else str(value)
    out = []
    for char in text:
        code = ord(char)
        if char == "\t" or (keep_newlines and char == "\n"):
            out.append(char)
        elif unicodedata.category(char) in ("Cc", "Cs") or char in "\u2028\u2029":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


def safe_path(path: os.PathLike | str) -> str:
    """A file name for messages, whatever bytes it holds (undecodable bytes as ``\\xNN``)."""
    raw = os.fsencode(path)
    return safe_text(raw.decode("utf-8", errors="backslashreplace"))


WESTERN = "cp1252"


def decode_text(data: bytes, name: str) -> tuple[str, str]:
    """``(text, encoding)`` of a text file's bytes: UTF-8 (a BOM is dropped) when they are valid UTF-8, else the
    encoding charset-normalizer detects, so a Latin-1 file is read as written instead of indexed with U+FFFD
    replacement characters. Bytes that decode in no detected encoding are refused (``InvalidArgumentError`` naming
    ``name``): nothing is ever decoded with replacements."""
    from charset_normalizer import from_bytes

    from .errors import InvalidArgumentError

    try:
        return data.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        pass
    matches = from_bytes(data)
    best = matches.best()
    if best is not None:  # a short text often scores the same in several code pages: Windows-1252 (Western
        # Europe, what WHATWG reads "latin-1" as) is by far the likeliest of them, so it wins a tie
        tied = [m for m in matches if (m.chaos, m.coherence) == (best.chaos, best.coherence)]
        western = next((m for m in tied if WESTERN in m.could_be_from_charset), None)
        if western is not None:
            return data.decode(WESTERN), WESTERN
    text = str(best) if best is not None else ""
    if best is None or "\ufffd" in text:
        raise InvalidArgumentError(f"{safe_text(name)} is not UTF-8 text and its encoding could not be detected; "
                                   "convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8)")
    return text, best.encoding
