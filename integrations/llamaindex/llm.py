"""``KVzipLLM``: a LlamaIndex LLM over the local model, so LlamaIndex's own engines work offline.

    >>> from llama_index.core import Settings
    >>> from kvzip_rag.integrations.llamaindex import KVzipLLM
    >>> Settings.llm = KVzipLLM(index.kvzip_model)       # or KVzipLLM("smollm2", threads=1)

``RouterQueryEngine``, ``SubQuestionQueryEngine``, ``RetrieverQueryEngine.from_args`` and the condense-question
chat engine then use the local model instead of reaching for OpenAI. These prompts carry their own text (no
document cache), so this LLM reads the whole prompt in the model's layout (:func:`kvzip_rag.prompt.chat_text`) and
decodes with kvzip_rag's one decode loop (``AnswerStream``); the KVzip engines keep
answering questions about documents from the compressed caches. Completion, chat, streaming and async are
LlamaIndex's ``CustomLLM`` machinery (with its callback and instrumentation events); a lock serialises model use
(pass ``lock=index.lock`` to share the index's). ``SubQuestionQueryEngine`` needs a question generator that this
small model can drive: :class:`~.question_gen.KVzipQuestionGenerator`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Optional

import torch
from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.llms.callbacks import llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from pydantic import PrivateAttr

from kvzip_rag.errors import ContextTooLongError, InvalidArgumentError
from kvzip_rag.generate import AnswerStream, SamplingOptions
from kvzip_rag.models import KVzipModel, load_model
from kvzip_rag.prompt import chat_text
from kvzip_rag.qa import check_question


def _messages_text(model: KVzipModel, messages: Sequence[Any]) -> str:
    """LlamaIndex chat messages in the model's prompt layout (:func:`kvzip_rag.prompt.chat_text`)."""
    return chat_text(model.tokenizer, [{"role": getattr(m.role, "value", str(m.role)), "content": m.content or ""}
                                       for m in messages])


class KVzipLLM(CustomLLM):
    """A LlamaIndex ``CustomLLM`` generating with a :class:`kvzip_rag.KVzipModel` (greedy unless ``temperature``)."""

    model_name: str = "kvzip"
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    context_window: int = 2048

    _model: KVzipModel = PrivateAttr()
    _lock: Any = PrivateAttr()

    def __init__(self, model: KVzipModel | str | os.PathLike | None = None, *, threads: Optional[int] = None,
                 lock: Any = None, **kwargs: Any) -> None:
        loaded = model if isinstance(model, KVzipModel) else load_model(
            os.fspath(model) if model is not None else None, threads=threads)
        if isinstance(model, KVzipModel) and threads is not None:
            from kvzip_rag.runtime import apply_thread_policy

            apply_thread_policy(loaded.device, threads)
        kwargs.setdefault("messages_to_prompt", lambda messages: _messages_text(loaded, messages))
        kwargs.setdefault("completion_to_prompt", lambda text: chat_text(loaded.tokenizer, [{"role": "user",
                                                                                           "content": text}]))
        kwargs.setdefault("model_name", loaded.name)
        kwargs.setdefault("context_window", loaded.max_positions)
        super().__init__(**kwargs)
        self._model = loaded
        self._lock = lock or threading.RLock()

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window, num_output=self.max_new_tokens,
                           model_name=self.model_name, is_chat_model=False)

    # ------------------------------------------------------------------------------------------ generation

    def _generate(self, prompt: str, formatted: bool, **kwargs: Any) -> Iterator[CompletionResponse]:
        """The completion's text pieces as generated (the text so far and the piece), then a last response with
        the token usage: kvzip_rag's decode loop (:class:`~kvzip_rag.generate.AnswerStream`) over a plain cache of
        the whole prompt."""
        from transformers import DynamicCache

        model = self._model
        check_question(prompt, "prompt")  # a non-empty string of valid text (used as given, not stripped)
        options = SamplingOptions(  # checked before any model work
            max_new_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens)),
            temperature=kwargs.get("temperature", self.temperature), top_p=self.top_p,
            clean=False)  # a completion (JSON, a list) may span lines: not a short answer
        ids = model.encode(prompt if formatted else self.completion_to_prompt(prompt))
        options = replace(options, max_new_tokens=min(options.max_new_tokens, max(1, model.max_positions - len(ids))),
                          seed=0 if options.temperature > 0 else None)  # sampled completions are repeatable
        text = ""
        with self._lock:
            stream = AnswerStream(model, DynamicCache(config=model.model.config), ids, options, keep=True)
            for piece in stream:
                text += piece
                yield CompletionResponse(text=text, delta=piece)
        answer = stream.result
        yield CompletionResponse(text=answer.text, delta="", raw=self._raw(len(ids), len(answer.token_ids)))

    def logprob(self, context: str, continuation: str) -> float:
        """log p(``continuation`` | ``context``) under the model, both raw text (no chat template). Choosing
        between options by their likelihood is what a small model does reliably, where writing its choice out (as
        JSON, or a tool's name) it often does not; :class:`~.question_gen.KVzipQuestionGenerator` routes by it."""
        from transformers import DynamicCache

        model = self._model
        head, tail = model.encode(context), model.encode(continuation)
        if not head or not tail:
            raise InvalidArgumentError("logprob() needs a non-empty context and continuation")
        if len(head) + len(tail) > model.max_positions:
            raise ContextTooLongError(f"logprob(): {len(head) + len(tail)} tokens do not fit the model's "
                                      f"{model.max_positions} positions")
        with self._lock, torch.inference_mode():
            logits = model.forward(head + tail, DynamicCache(config=model.model.config)).logits[0]
            scores = torch.log_softmax(logits[len(head) - 1 : -1].float(), dim=-1)
            return scores.gather(1, torch.tensor(tail, device=scores.device)[:, None]).sum().item()

    @staticmethod
    def _raw(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        *_, last = self._generate(prompt, formatted, **kwargs)
        return last

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._generate(prompt, formatted, **kwargs)
