"""Segmentation: paragraphs, then sentences, then tokens; every piece fits and is an exact slice of the text."""

from __future__ import annotations

import re

import pytest

from kvzip_rag.errors import EmptyDocumentError, InvalidArgumentError
from kvzip_rag.store.segment import default_max_tokens, segment_document, split_text


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def check(text, segments, limit, encode):
    assert segments
    for s in segments:
        assert s.text == text[s.char_start : s.char_end] and s.text == s.text.strip() and s.text
        assert s.token_count == len(encode(s.text)) <= limit
    assert [s.char_start for s in segments] == sorted(s.char_start for s in segments)
    assert sum((words(s.text) for s in segments), []) == words(text) or \
        "".join(sum((words(s.text) for s in segments), [])) == "".join(words(text))  # token cuts may split a word


def test_paragraphs_are_kept_whole_when_they_fit(tiny_llama):
    paragraphs = [f"Paragraph {i} talks about topic {i}. It has two sentences." for i in range(12)]
    text = "\n\n".join(paragraphs)
    segments = segment_document(tiny_llama, text, max_segment_tokens=40)
    check(text, segments, 40, tiny_llama.encode)
    assert len(segments) > 2
    for paragraph in paragraphs:  # never cut inside a paragraph that fits
        assert sum(paragraph in s.text for s in segments) == 1


def test_long_paragraph_splits_on_sentences(tiny_llama):
    sentences = [f"Sentence number {i} describes the harbour at some length." for i in range(30)]
    text = " ".join(sentences)
    segments = segment_document(tiny_llama, text, max_segment_tokens=50)
    check(text, segments, 50, tiny_llama.encode)
    assert len(segments) > 3
    assert all(s.text.endswith(".") for s in segments)


def test_overlong_sentence_splits_on_token_boundaries(tiny_llama):
    text = "Intro.\n\n" + " ".join(f"word{i}" for i in range(400)) + "\n\nOutro."
    segments = segment_document(tiny_llama, text, max_segment_tokens=64)
    check(text, segments, 64, tiny_llama.encode)
    assert len(segments) >= 4


def test_fallback_without_offsets(tiny_llama):
    """Any tokenizer works: without a fast tokenizer's offsets, cut points come from a binary search."""
    text = " ".join(f"word{i}" for i in range(300))
    segments = split_text(text, tiny_llama.encode, 50, tokenizer=None)
    check(text, segments, 50, tiny_llama.encode)


def test_limits_and_defaults(tiny_llama):
    prefix = len(tiny_llama.encode(tiny_llama.template.prefix))
    assert default_max_tokens(tiny_llama) == min(tiny_llama.context_limit - prefix, 4096)
    assert len(segment_document(tiny_llama, "One short text.")) == 1
    with pytest.raises(EmptyDocumentError):
        segment_document(tiny_llama, " \n\n ")
    with pytest.raises(InvalidArgumentError):
        segment_document(tiny_llama, "text", max_segment_tokens=0)


def test_unicode_and_cjk(tiny_llama):
    text = "第一句话。第二句话！第三句话？" * 20 + "\n\n" + "Émile a écrit « bonjour ». Ça va ? " * 20
    segments = segment_document(tiny_llama, text, max_segment_tokens=30)
    check(text, segments, 30, tiny_llama.encode)
