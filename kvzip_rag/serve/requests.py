"""What an OpenAI-style request asks, checked once: the question (and earlier turns), the answer options and our
extra body fields. Every mistake is a one-line :class:`~kvzip_rag.errors.InvalidArgumentError` (HTTP 400)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvzip_rag.errors import InvalidArgumentError

# answer options by body field (OpenAI's, and our extras top_k, clean, answer_style); our other extra fields are
# read by _extras. Other OpenAI fields that do not change an answer (user, metadata, penalties...) are ignored.
SAMPLING_FIELDS = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens",
                   "temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
                   "top_k": "top_k", "clean": "clean", "answer_style": "answer_style"}
# features this server does not have: asking for them is refused, not silently ignored
UNSUPPORTED = {"tools": "tool calling", "functions": "function calling", "tool_choice": "tool calling",
               "response_format": "structured output", "logprobs": "log-probabilities", "suffix": "suffix",
               "audio": "audio output", "best_of": "best_of", "prediction": "predicted outputs"}


@dataclass
class AnswerRequest:
    """One request's question, earlier ``(question, answer)`` turns and options, as the service takes them."""

    question: str
    turns: list[tuple[str, str]]
    model: str
    stream: bool
    include_usage: bool
    sampling: dict
    k: int = 1
    doc_ids: list[str] | None = None
    compose: str | None = None
    ratio: float | None = None
    grounding: dict = field(default_factory=dict)  # abstain.GROUNDING_OPTIONS given in the body


def _body(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidArgumentError("the request body must be a JSON object")
    for name, feature in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}, {"type": "text"}, ""):
            raise InvalidArgumentError(f"{feature} ({name}) is not supported by kvzip-rag serve")
    if body.get("n", 1) != 1:
        raise InvalidArgumentError(f"n must be 1 (one answer per request), got {body.get('n')!r}")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidArgumentError("model is required (see GET /v1/models)")
    return body


def text_of(content: Any, where: str) -> str:
    """A message's text: a string, or OpenAI content parts of type ``text`` only."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise InvalidArgumentError(f"{where} content must be text (a string or text parts); images, audio and files "
                               "are not supported")


def _options(body: Mapping[str, Any]) -> dict:
    from kvzip_rag.qa import check_sampling

    given = {}
    for name, canonical in SAMPLING_FIELDS.items():
        if body.get(name) is not None:
            if canonical in given:
                raise InvalidArgumentError("give max_tokens or max_completion_tokens, not both")
            given[canonical] = body[name]
    if isinstance(given.get("stop"), str):
        given["stop"] = [given["stop"]]
    return check_sampling(given)


def _extras(body: Mapping[str, Any]) -> dict:
    from kvzip_rag.abstain import GROUNDING_OPTIONS, Grounding
    from kvzip_rag.budget import Budget
    from kvzip_rag.composers import get_composer
    from kvzip_rag.qa import check_k

    doc_ids = body.get("doc_ids")
    if isinstance(doc_ids, str):
        doc_ids = [doc_ids]
    if doc_ids is not None and (not isinstance(doc_ids, list) or not doc_ids
                                or not all(isinstance(d, str) and d for d in doc_ids)):
        raise InvalidArgumentError(f"doc_ids must be a non-empty list of document ids, got {body['doc_ids']!r}")
    k = body.get("k", 1)
    check_k(k)
    compose = body.get("compose")
    if compose is not None:
        if not isinstance(compose, str):
            raise InvalidArgumentError(f"compose must be a strategy's name, got {compose!r}")
        get_composer(compose)
    ratio = body.get("ratio")
    if ratio is not None:
        Budget(ratio, None)  # the one range check of a ratio
    grounding = {name: body[name] for name in GROUNDING_OPTIONS if name in body}
    Grounding(**grounding)  # checked here, used by the service
    return {"doc_ids": doc_ids, "k": k, "compose": compose, "ratio": ratio, "grounding": grounding}


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise InvalidArgumentError(f"stream must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, Mapping):
        raise InvalidArgumentError("stream_options must be an object")
    return stream, bool(options.get("include_usage"))


def chat_request(body: Any) -> AnswerRequest:
    """``POST /v1/chat/completions``: the last user message is the question, earlier messages its history
    (folded by :func:`kvzip_rag.dialogue.fold_messages`)."""
    from kvzip_rag.dialogue import fold_messages
    from kvzip_rag.qa import check_question

    body = _body(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {role, content} objects")
    roles = []
    for n, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise InvalidArgumentError(f"messages[{n}] must be an object with a role and content")
        if message.get("tool_calls") or message["role"] in ("tool", "function"):
            raise InvalidArgumentError(f"messages[{n}]: tool messages are not supported by kvzip-rag serve")
        roles.append((message["role"], text_of(message.get("content"), f"messages[{n}]")))
    dialogue = fold_messages(roles)
    stream, usage = _stream_flags(body)
    return AnswerRequest(check_question(dialogue.question, "last user message"), dialogue.turns, body["model"],
                         stream, usage, _options(body), **_extras(body))


def completion_request(body: Any) -> AnswerRequest:
    """``POST /v1/completions``: the prompt is the question (one prompt per request)."""
    from kvzip_rag.qa import check_question

    body = _body(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidArgumentError("prompt must be one string (one question per request)")
    if body.get("echo"):
        raise InvalidArgumentError("echo is not supported by kvzip-rag serve")
    stream, usage = _stream_flags(body)
    return AnswerRequest(check_question(prompt, "prompt"), [], body["model"], stream, usage, _options(body),
                         **_extras(body))
