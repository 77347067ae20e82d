"""Quote mode (``answer_style="quote"``): the answer is a verbatim span of a routed document, by construction.

Decoding follows the routed segments' own tokens (their stored text, re-tokenized by the model's tokenizer):

1. **Lead-in.** The model answers as it would (these tokens are not part of the answer, and it may not end here)
   until it writes a token that can start a quote: a document token (or that token without its leading space, as
   an answer's first word is written) that begins a word of the document which is neither a function word nor
   begins with a word of the question (a SQuAD answer almost never starts so; otherwise the small model quotes the sentence
   restating the question).
   After ``LEAD_IN`` tokens without one, the next token is forced to be such a start.
2. **Quote.** Every later token must be the one that follows, in some document, the span so far; the quote ends
   (end of answer) as soon as the model's own choice leaves the document, or it ends the answer, but never inside
   a word: while the span so far ends mid-word everywhere it occurs, the word's next token is taken (the best the
   model scores), so a quote is never "Norm" of "Normans".

The model picks the span; the constraint guarantees it exists, so the answer's :class:`~kvzip_rag.answers.Citation`
is exact (:func:`quote_citations` finds it in the stored text and checks it character for character). Spans never
cross a line break (a paragraph boundary) nor start inside a character split over byte tokens.
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

ANSWER_STYLES = ("free", "quote")
DEFAULT_ANSWER_STYLE = "free"
LEAD_IN = 16  # tokens the model may write before it starts quoting (at most half the answer's token cap)
NO_START = frozenset("the a an in on at of it its this that these those to by for and or is was were are be as with "
                     "from he she they his her their".split())


def check_answer_style(style: object) -> str:
    if style not in ANSWER_STYLES:
        raise InvalidArgumentError(f"answer_style must be one of {', '.join(ANSWER_STYLES)}, got {style!r}")
    return str(style)


class QuoteConstraint:
    """Masks the logits so that the answer is a document span (see the module); ``advance`` follows each token.

    State: ``positions``, the document positions (document, index of the next token) the quote so far can end
    before, ``None`` during the lead-in (at most ``max_lead_in`` tokens)."""

    def __init__(self, model: KVzipModel, texts: Sequence[str], question: str = "", max_lead_in: int = LEAD_IN) -> None:
        self.tokenizer = model.tokenizer
        self.stop_ids = sorted(model.stop_token_ids)
        self.documents = [model.encode(text) for text in texts]
        if not any(self.documents):
            raise InvalidArgumentError("quote mode needs at least one routed document with text")
        self.question_words = set(re.findall(r"\w+", question.lower()))
        self._pieces: dict[int, str] = {}
        self.starts = self._starts()
        self.positions: list[tuple[int, int]] | None = None
        self.lead_in, self.max_lead_in = 0, max_lead_in

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.tokenizer.decode([token])
        return self._pieces[token]

    def _is_usable(self, token: int) -> bool:
        """A token a span may hold: no line break, no broken character."""
        piece = self._piece(token)
        return bool(piece) and "\n" not in piece and "\ufffd" not in piece

    def _inside_word(self, ids: list[int], i: int) -> bool:
        """The token at position ``i`` continues the word the token before it began."""
        piece = self._piece(ids[i])
        return i > 0 and piece[:1].isalnum() and self._piece(ids[i - 1])[-1:].isalnum()

    def _can_start(self, ids: list[int], i: int) -> bool:
        """Position ``i`` begins a word (not inside one) that is neither a function word nor a question word."""
        piece = self._piece(ids[i])
        if not self._is_usable(ids[i]) or not piece.strip()[:1].isalnum() or self._inside_word(ids, i):
            return False
        word = re.match(r"\s*(\w*)", self.tokenizer.decode(ids[i : i + 4])).group(1).lower()
        # the model writes a word token by token: "50th" must not start where it means the question's "50"
        return word not in NO_START and not any(word.startswith(q) for q in self.question_words - NO_START)

    def _without_space(self, token: int) -> int | None:
        """The single token spelling ``token`` without its leading space (how an answer's first word is written)."""
        piece = self._piece(token)
        ids = self.tokenizer.encode(piece.lstrip(), add_special_tokens=False) if piece[:1].isspace() else []
        return ids[0] if len(ids) == 1 and ids[0] != token else None

    def _starts(self) -> dict[int, list[tuple[int, int]]]:
        """Every token that may start a quote, with the positions after it."""
        starts: dict[int, list[tuple[int, int]]] = {}
        for d, ids in enumerate(self.documents):
            for i, token in enumerate(ids):
                if self._can_start(ids, i):
                    for variant in (token, self._without_space(token)):
                        if variant is not None:
                            starts.setdefault(variant, []).append((d, i + 1))
        return starts

    def _following(self) -> set[int]:
        return {self.documents[d][i] for d, i in self.positions
                if i < len(self.documents[d]) and self._is_usable(self.documents[d][i])}

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with the tokens this step may not take set to ``-inf``."""
        if self.positions is None:
            if self.lead_in < self.max_lead_in and self.starts:
                masked = logits.clone()
                masked[self.stop_ids] = float("-inf")  # no answer without a quote
                return masked
            allowed = list(self.starts) or self.stop_ids
        else:
            following = self._following()
            choice = int(logits.argmax())
            if following and not any(i >= len(self.documents[d]) or not self._inside_word(self.documents[d], i)
                                     for d, i in self.positions):
                allowed = sorted(following)  # mid-word everywhere: the word goes on
            else:
                allowed = sorted(following) + self.stop_ids if choice in following else self.stop_ids
        index = torch.tensor(allowed, dtype=torch.long, device=logits.device)
        masked = torch.full_like(logits, float("-inf"))
        masked[index] = logits[index]
        return masked

    def advance(self, token: int) -> bool:
        """Follow ``token`` (one :meth:`mask` allowed); True when it is part of the quote (the answer)."""
        if self.positions is None:
            if token not in self.starts:
                self.lead_in += 1
                return False
            self.positions = self.starts[token]
            return True
        self.positions = [(d, i + 1) for d, i in self.positions
                          if i < len(self.documents[d]) and self.documents[d][i] == token]
        return True


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
