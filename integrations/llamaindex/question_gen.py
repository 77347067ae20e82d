"""``KVzipQuestionGenerator``: sub-questions for LlamaIndex's ``SubQuestionQueryEngine`` from a small local model.

    >>> from llama_index.core.query_engine import SubQuestionQueryEngine
    >>> llm = KVzipLLM(model)
    >>> engine = SubQuestionQueryEngine.from_defaults(query_engine_tools=tools, llm=llm,
    ...                                               question_gen=KVzipQuestionGenerator(llm))

LlamaIndex's ``LLMQuestionGenerator`` asks for one JSON list of ``{sub_question, tool_name}``, which SmolLM2-135M
does not write; asked instead for "the part of the question this tool answers", it gives every tool the same
clause. It does two smaller steps well, and each is checked rather than trusted:

1. **split**: the question into standalone questions, one per line (a few-shot chat prompt, replaceable as
   ``question_gen_prompt``). The split is used only when it is at least two lines that are all questions (end
   with "?"); anything else is logged and the question is asked as written, never a guessed fragment.
2. **route**: each question goes to the tool under whose description the model finds it most likely
   (:meth:`KVzipLLM.logprob`: a comparison of likelihoods, not generated text to parse).

A tool that no question is routed to is not asked, as with LlamaIndex's own generators.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Optional

from llama_index.core.llms import ChatMessage, MessageRole
from llama_index.core.prompts import BasePromptTemplate, ChatPromptTemplate
from llama_index.core.prompts.mixin import PromptDictType
from llama_index.core.question_gen.types import BaseQuestionGenerator, SubQuestion
from llama_index.core.schema import QueryBundle
from llama_index.core.settings import Settings
from llama_index.core.tools.types import ToolMetadata

from kvzip_rag.errors import InvalidArgumentError

from .llm import KVzipLLM

logger = logging.getLogger(__name__)

_EXAMPLES = (
    ("What is the capital of Peru, and how far is Mars from the Sun?",
     "What is the capital of Peru?\nHow far is Mars from the Sun?"),
    ("Compare the populations of France and Spain.",
     "What is the population of France?\nWhat is the population of Spain?"),
    ("Who was the first Roman emperor?", "Who was the first Roman emperor?"),
)
DEFAULT_SPLIT_PROMPT = ChatPromptTemplate([
    ChatMessage(role=MessageRole.SYSTEM,
                content="You split a user's message into separate, self-contained questions, one per line."),
    *(ChatMessage(role=role, content=text) for question, split in _EXAMPLES
      for role, text in ((MessageRole.USER, question), (MessageRole.ASSISTANT, split))),
    ChatMessage(role=MessageRole.USER, content="{query_str}"),
])
TOOL_CONTEXT = "A tool for: {description}\nA question for it:"


def split_questions(text: str) -> list[str] | None:
    """The model's split as distinct questions, or None unless it is at least two lines that all end with "?"."""
    lines = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if len(lines) < 2 or not all(line.endswith("?") for line in lines):
        return None
    return lines


class KVzipQuestionGenerator(BaseQuestionGenerator):
    """Split with a short completion, route by likelihood (see the module docstring); needs a :class:`KVzipLLM`."""

    def __init__(self, llm: Optional[KVzipLLM] = None, *, prompt: Optional[BasePromptTemplate] = None,
                 max_tokens: int = 96) -> None:
        llm = llm if llm is not None else Settings.llm
        if not isinstance(llm, KVzipLLM):
            raise InvalidArgumentError(
                "KVzipQuestionGenerator routes sub-questions by the local model's likelihoods: give it a KVzipLLM "
                f"(or set Settings.llm to one), got {type(llm).__name__}")
        self._llm = llm
        self._prompt = prompt or DEFAULT_SPLIT_PROMPT
        self.max_tokens = max_tokens

    def _get_prompts(self) -> PromptDictType:
        return {"question_gen_prompt": self._prompt}

    def _update_prompts(self, prompts: PromptDictType) -> None:
        if "question_gen_prompt" in prompts:
            self._prompt = prompts["question_gen_prompt"]

    def split(self, query: str) -> list[str]:
        """The standalone questions in ``query``: the model's split when it passes the check, else ``[query]``."""
        messages = self._prompt.format_messages(query_str=query)
        text = self._llm.chat(messages, max_tokens=self.max_tokens).message.content or ""
        questions = split_questions(text)
        if questions is not None:
            return questions
        one_question = len(text.strip().splitlines()) == 1 and text.strip().endswith("?")
        (logger.info if one_question else logger.warning)(
            "the model's split of %r is %s (%r); asking it as written", query,
            "one question" if one_question else "not a list of questions", text)
        return [query]

    def route(self, question: str, tools: Sequence[ToolMetadata]) -> ToolMetadata:
        """The tool under whose description ``question`` is most likely (the first on a tie)."""
        if len(tools) == 1:
            return tools[0]
        scores = [self._llm.logprob(TOOL_CONTEXT.format(description=tool.description or tool.name), " " + question)
                  for tool in tools]
        return tools[scores.index(max(scores))]

    def generate(self, tools: Sequence[ToolMetadata], query: QueryBundle) -> list[SubQuestion]:
        if not tools:
            return []
        return [SubQuestion(sub_question=question, tool_name=self.route(question, tools).name)
                for question in self.split(query.query_str)]

    async def agenerate(self, tools: Sequence[ToolMetadata], query: QueryBundle) -> list[SubQuestion]:
        return await asyncio.to_thread(self.generate, tools, query)
