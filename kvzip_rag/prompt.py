"""Split a model's chat template into the pieces KVzip needs.

The layout is ``prefix + context + "\\n\\n" + question + suffix`` (one user turn). The prefix is never evicted;
the suffix closes the user turn and opens the assistant turn. Deriving both from the tokenizer's own template
(instead of a table per model family) is what lets any chat model work.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

INSTRUCTION = "Given the context, answer to the following question or request without explanation."
_SENTINELS = ("\x00KVZIP_A\x00", "\x00KVZIP_B\x00", "\x00KVZIP_C\x00")


@dataclass(frozen=True)
class PromptTemplate:
    """Text pieces around the context, questions and follow-up turns."""

    prefix: str
    suffix: str
    turn_separator: str  # closes an assistant answer and opens the next user turn
    question_lead: str = "\n\n"  # between the context and the first question

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "PromptTemplate":
        """Use the chat template when there is one, else a plain Question/Answer layout for base models."""
        if not getattr(tokenizer, "chat_template", None):
            bos = tokenizer.bos_token or ""
            return cls(
                prefix=f"{bos}{INSTRUCTION}\n\nContext:\n",
                suffix="\nAnswer:",
                turn_separator="\n\nQuestion: ",
                question_lead="\n\nQuestion: ",
            )
        a, b, c = _SENTINELS
        one_turn = tokenizer.apply_chat_template(
            [{"role": "user", "content": a}], tokenize=False, add_generation_prompt=True
        )
        before, after = one_turn.split(a)
        three_turns = tokenizer.apply_chat_template(
            [
                {"role": "user", "content": a},
                {"role": "assistant", "content": b},
                {"role": "user", "content": c},
            ],
            tokenize=False,
            add_generation_prompt=True,
        )
        turn_separator = three_turns.split(b)[1].split(c)[0]
        return cls(prefix=f"{before}{INSTRUCTION}\n\n", suffix=after, turn_separator=turn_separator)

    def question_text(self, question: str, first_turn: bool = True) -> str:
        """Text appended after the cache for one question (or a follow-up turn)."""
        lead = self.question_lead if first_turn else self.turn_separator
        return f"{lead}{question.strip()}{self.suffix}"

    @property
    def digest(self) -> str:
        """Stable hash of the layout, stored with every cache so a different template is refused."""
        text = "\x1f".join([self.prefix, self.suffix, self.turn_separator, self.question_lead])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def chat_text(tokenizer, messages: Sequence[dict]) -> str:
    """``messages`` (``role``/``content`` dicts) as the model reads a whole prompt with no document cache (the
    LlamaIndex LLM): the tokenizer's chat template, or for a base model the Question/Answer layout of
    :meth:`PromptTemplate.from_tokenizer` (system messages lead the next question, answers follow their question)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    template = PromptTemplate.from_tokenizer(tokenizer)
    text, leading, asked = tokenizer.bos_token or "", [], False
    for message in messages:
        content = (message.get("content") or "").strip()
        if message["role"] == "system":
            leading.append(content)
        elif message["role"] == "assistant":
            text += f" {content}"
        else:
            lead = template.turn_separator if asked else template.question_lead.lstrip()
            question = "\n\n".join([*leading, content])
            text += f"{lead}{question}{template.suffix}"
            leading, asked = [], True
    return text
