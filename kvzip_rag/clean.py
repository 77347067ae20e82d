"""Short, clean free answers (``clean=True``, the default): the answer ends at its own end rather than at the
token cap. (A request for the short answer only, after the question, measured worse and is not made.)

An answer ends at its first line break (the model has moved on to an explanation or a list), or where it starts
repeating itself: when its last :data:`REPEAT_TOKENS` tokens already occurred earlier in it, it is cut before the
repeat. Nothing is banned while decoding (a no-repeat-n-gram ban made the model invent facts): a loop only stops.
"""

from __future__ import annotations

import re

REPEAT_TOKENS = 6  # a repeated run this long, holding a word, is a loop (digit runs like 1,000,000 are not)
_WORD = re.compile(r"[^\W\d_]{2}")


def answer_end(text: str, token_ids: list[int], tokenizer) -> str | None:
    """The whole answer when ``text`` (decoded from ``token_ids``, stripped on the left) has reached its end, else
    ``None`` (go on generating)."""
    if "\n" in text:
        return text[: text.index("\n")].rstrip()
    n = REPEAT_TOKENS
    if len(token_ids) >= 2 * n:
        tail = token_ids[-n:]
        earlier = token_ids[:-1]
        if any(earlier[i : i + n] == tail for i in range(len(earlier) - n + 1)):
            if _WORD.search(tokenizer.decode(tail, skip_special_tokens=True)):
                return tokenizer.decode(token_ids[:-n], skip_special_tokens=True).strip()
    return None
