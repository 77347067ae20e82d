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
