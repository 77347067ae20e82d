"""Quote mode (``answer_style="quote"``): the answer is a verbatim span of a routed document, by construction.

Decoding is constrained by the routed segments' own tokens (their stored text, re-tokenized by the model's
tokenizer): the first token may be any document token (or the same token without its leading space, since an answer
starts at a word while the word inside the text carries the space), and every later token must be the token that
follows, in some document, the span chosen so far. End of answer is allowed once the span holds some text. The model
picks which span; the constraint guarantees it exists, so the answer's :class:`~kvzip_rag.answers.Citation` is exact
(:func:`quote_citations` finds it in the stored text and checks it character for character).

Spans never cross a line break (a paragraph boundary), and never start inside a character split over byte tokens.
A span does not start with a function word or a word of the question (left alone, the small model starts by copying
the sentence that restates the question; SQuAD answers almost never start so), and the prompt asks for the shortest
phrase of the context that answers (``prompt.QUOTE_ANSWER``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .answers import Citation, Target
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .models import KVzipModel
    from .store import CacheStore

ANSWER_STYLES = ("free", "quote")
DEFAULT_ANSWER_STYLE = "free"
NO_START = frozenset("the a an in on at of it its this that these those to by for and or is was were are be as with "
                     "from he she they his her their".split())


def check_answer_style(style: object) -> str:
    if style not in ANSWER_STYLES:
        raise InvalidArgumentError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {style!r}")
    return str(style)


class QuoteConstraint:
    """The set of document spans that extend the answer so far; masks the logits to the tokens that keep it a span.

    State: the document positions (document, index of the next token) the answer so far can end before."""

    def __init__(self, model: KVzipModel, texts: Sequence[str], question: str = "") -> None:
        self.tokenizer = model.tokenizer
        self.stop_ids = sorted(model.stop_token_ids)
        self.documents = [model.encode(text) for text in texts]
        if not any(self.documents):
            raise InvalidArgumentError("quote mode needs at least one routed document with text")
        self.no_start = NO_START | set(re.findall(r"\w+", question.lower()))
        self._usable: dict[int, bool] = {}
        self._stripped: dict[int, int | None] = {}
        self.positions: list[tuple[int, int]] | None = None  # None: nothing generated yet
        self.has_text = False

    def _is_usable(self, token: int) -> bool:
        """A token a span may hold: no line break, no broken character."""
        if token not in self._usable:
            piece = self.tokenizer.decode([token])
            self._usable[token] = bool(piece) and "\n" not in piece and "\ufffd" not in piece
        return self._usable[token]

    def _without_space(self, token: int) -> int | None:
        """The single token spelling ``token`` without its leading space (how an answer's first word is written)."""
        if token not in self._stripped:
            piece = self.tokenizer.decode([token])
            ids = self.tokenizer.encode(piece.lstrip(), add_special_tokens=False) if piece[:1].isspace() else []
            self._stripped[token] = ids[0] if len(ids) == 1 and ids[0] != token else None
        return self._stripped[token]

    def _starts(self) -> dict[int, list[tuple[int, int]]]:
        starts: dict[int, list[tuple[int, int]]] = {}
        for d, ids in enumerate(self.documents):
            for i, token in enumerate(ids):
                if self._is_usable(token) and self.tokenizer.decode([token]).strip().lower() not in self.no_start:
                    starts.setdefault(token, []).append((d, i + 1))
                    plain = self._without_space(token)
                    if plain is not None:
                        starts.setdefault(plain, []).append((d, i + 1))
        return starts

    def allowed(self) -> list[int]:
        """Token ids that keep the answer a document span (and end of answer once it holds text)."""
        if self.positions is None:
            self._start_map = self._starts()
            return list(self._start_map)
        following = {self.documents[d][i] for d, i in self.positions
                     if i < len(self.documents[d]) and self._is_usable(self.documents[d][i])}
        return sorted(following) + (self.stop_ids if self.has_text else [])

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every token outside :meth:`allowed` set to ``-inf``."""
        allowed = torch.tensor(self.allowed() or self.stop_ids, dtype=torch.long, device=logits.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[allowed] = logits[allowed]
        return masked

    def advance(self, token: int) -> None:
        """Follow ``token`` (one :meth:`allowed` returned)."""
        if self.positions is None:
            self.positions = self._start_map.get(token, [])
        else:
            self.positions = [(d, i + 1) for d, i in self.positions
                              if i < len(self.documents[d]) and self.documents[d][i] == token]
        self.has_text = self.has_text or bool(self.tokenizer.decode([token]).strip())


def segment_text(store: CacheStore, target: Target) -> str:
    """The stored text of a routed segment (a target built from an id pair carries none)."""
    if target.text:
        return target.text
    record = store.get_document(target.doc_id)
    for segment in record.segments if record is not None else ():
        if segment.index == target.segment_index:
            return segment.text
    return ""


def quote_citations(answer: str, targets: Sequence[Target], texts: Sequence[str]) -> list[Citation]:
    """The exact citation of a quoted ``answer``: its first occurrence in the routed segments, verified equal to
    the stored text; empty when the answer is empty (or, which the constraint rules out, not found)."""
    if not answer:
        return []
    for target, text in zip(targets, texts):
        start = text.find(answer)
        if start >= 0 and text[start : start + len(answer)] == answer:
            return [Citation(target.doc_id, target.segment_index, start, start + len(answer), answer, 1.0)]
    return []
