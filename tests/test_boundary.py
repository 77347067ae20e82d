"""The QA core's boundary (issues 21 and 22): the model's window clamps every one-shot answer, every public argument
is checked once with a one-line ``InvalidArgumentError``, one rule picks the cache that serves (``select_cache``),
routing stays among the answering model's caches, and sources and cache come from one snapshot (tiny models, real
SQLite)."""

from __future__ import annotations

import asyncio
import math

import pytest

import kvzip_rag
from conftest import build_tiny
from kvzip_rag.budget import AS_STORED, DEFAULT_BUDGET, Budget, CacheKind, select_cache
from kvzip_rag.errors import CacheChangedError, ContextTooLongError, InvalidArgumentError, ModelMismatchError
from kvzip_rag.generate import SamplingOptions
from kvzip_rag.qa import DEFAULT_RATIO, QAService, check_k, check_question, check_sampling
from kvzip_rag.store import CacheStore, loading

WINDOW = 700  # positions of the small-window tiny model: answers reach the window within a few hundred tokens
HARBOUR = "The harbour of Velmora was built in 1731 by the engineer Ansel Brask."
LIGHTHOUSE = "The lighthouse beside the harbour is painted red and white; its keeper is Ida Holm."
QUESTION = "Who built the harbour of Velmora?"


@pytest.fixture(scope="module")
def small(smol_tokenizer) -> kvzip_rag.KVzipModel:
    return build_tiny("llama", smol_tokenizer, seed=3, max_position_embeddings=WINDOW)


@pytest.fixture(scope="module")
def other(smol_tokenizer) -> kvzip_rag.KVzipModel:
    """Another model (other weights, so another fingerprint) with the same window."""
    return build_tiny("llama", smol_tokenizer, seed=4, max_position_embeddings=WINDOW)


@pytest.fixture(scope="module")
def store(tmp_path_factory, small) -> CacheStore:
    store = CacheStore(tmp_path_factory.mktemp("boundary-store"))
    store.add_document(small, HARBOUR, doc_id="harbour")
    return store


@pytest.fixture
def forwards(small, monkeypatch) -> list[int]:
    """The cache length before every forward of ``small``: proves where model work happened, and how far."""
    seen: list[int] = []
    forward = small.forward

    def spy(ids, cache, **kwargs):
        seen.append(cache.get_seq_length() + len(ids))
        return forward(ids, cache, **kwargs)

    monkeypatch.setattr(small, "forward", spy)
    return seen


# ------------------------------------------------------------------------------------------------ the window


@pytest.mark.parametrize("huge", [2**63, 10**12])
def test_a_huge_max_new_tokens_is_clamped_to_the_window(store, small, forwards, huge):
    result = QAService(store, small).answer(QUESTION, max_new_tokens=huge, clean=False)  # a random model repeats itself
    assert result.finish_reason == "window"
    assert result.metadata()["finish_reason"] == "window"
    assert max(forwards) <= small.max_positions  # never a position past the model's


def test_a_one_shot_answer_says_when_the_window_cut_it(store, small, forwards):
    cache = store.load_cache("harbour", small)
    cut = kvzip_rag.answer(small, cache, QUESTION, max_new_tokens=2500, clean=False)
    assert cut.finish_reason == "window"
    assert max(forwards) <= small.max_positions
    assert cache.get_seq_length() + cut.prompt_tokens + len(cut.token_ids) <= small.max_positions
    short = kvzip_rag.answer(small, cache, QUESTION, max_new_tokens=3, clean=False)
    assert short.finish_reason == "length" and len(short.token_ids) == 3


def test_a_stream_is_clamped_too(store, small, forwards):
    stream = QAService(store, small).stream(QUESTION, max_tokens=2**63, clean=False)
    "".join(stream)
    assert stream.result.finish_reason == "window"
    assert max(forwards) <= small.max_positions


@pytest.mark.parametrize("question", ["a " * 1500, "x" * 1_000_000], ids=["tokens", "1MB"])
def test_a_question_longer_than_the_window_is_refused_before_any_model_work(store, small, forwards, question):
    service = QAService(store, small)
    with pytest.raises(ContextTooLongError):
        service.answer(question)
    with pytest.raises(ContextTooLongError):
        service.stream(question, targets=[("harbour", 0)])
    with pytest.raises(ContextTooLongError):
        asyncio.run(service.aanswer(question))
    with pytest.raises(ContextTooLongError):
        kvzip_rag.answer(small, store.load_cache("harbour", small), question)
    assert forwards == []


def test_a_question_that_leaves_no_room_for_an_answer_is_refused(store, small, forwards):
    cache = store.load_cache("harbour", small)
    question = "a " * (WINDOW - cache.get_seq_length())  # fits the window alone, not beside the cache
    with pytest.raises(ContextTooLongError, match="no room"):
        kvzip_rag.answer(small, cache, question)
    assert forwards == []


# ------------------------------------------------------------------------------------------------ arguments


@pytest.mark.parametrize("options", [
    {"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan}, {"top_p": -math.inf},
    {"seed": 2**70}, {"seed": -1}, {"max_new_tokens": 2.0}, {"max_new_tokens": True}, {"max_new_tokens": "8"},
    {"top_k": 1.5}, {"stop": "end"}, {"stop": 3}, {"max_tokens": 4, "max_new_tokens": 4}, {"colour": "red"},
])
def test_bad_sampling_options_are_one_line_errors(store, small, forwards, options):
    with pytest.raises(InvalidArgumentError) as error:
        SamplingOptions.from_options(options)
    assert "\n" not in str(error.value)
    with pytest.raises(InvalidArgumentError):
        QAService(store, small).answer(QUESTION, **options)
    with pytest.raises(InvalidArgumentError):
        QAService(store, small).stream(QUESTION, **options)
    assert forwards == []


def test_sampling_options_are_normalised_in_one_place():
    assert SamplingOptions.from_options({"max_tokens": 7, "stop": None}) == SamplingOptions(max_new_tokens=7)
    assert SamplingOptions(seed=2**64 - 1).seed == 2**64 - 1
    assert SamplingOptions(stop=["", "END"]).stop == ("END",)
    assert check_sampling({"max_tokens": 7, "stop": ["x", ""]}) == {"max_new_tokens": 7, "stop": ("x",)}


@pytest.mark.parametrize("k", [0, -1, 2**63, 9223372036854775808, 10_001, True, 2.0])
def test_k_is_bounded(store, small, k):
    with pytest.raises(InvalidArgumentError):
        check_k(k)
    with pytest.raises(InvalidArgumentError):
        QAService(store, small).answer(QUESTION, k)
    with pytest.raises(InvalidArgumentError):
        store.search(QUESTION, k=k)


@pytest.mark.parametrize("question", ["who built \ud800 the harbour?", "who built\x00 the harbour?", "  ", None, 3])
def test_bad_questions_are_one_line_errors(store, small, forwards, question):
    with pytest.raises(InvalidArgumentError) as error:
        check_question(question)
    assert "\n" not in str(error.value)
    with pytest.raises(InvalidArgumentError):
        QAService(store, small).answer(question, targets=[("harbour", 0)])
    assert forwards == []


# ------------------------------------------------------------------------------------------------ one cache identity


def test_budget_is_validated_once():
    assert DEFAULT_BUDGET == Budget(0.3, "pair") and DEFAULT_RATIO == DEFAULT_BUDGET.ratio
    assert Budget(1, "head").ratio == 1.0 and AS_STORED == Budget(None, None)
    for ratio, level in [(math.nan, "pair"), (0.0, "pair"), (1.5, None), (True, "pair"), ("0.3", "pair"),
                         (0.3, "bogus")]:
        with pytest.raises(InvalidArgumentError):
            Budget(ratio, level)
    with pytest.raises(InvalidArgumentError):
        QAService(None, ratio=math.inf)


class _Row:
    def __init__(self, id, ratio, level="pair", fingerprint="f", digest="t"):
        self.id, self.ratio, self.level = id, ratio, level
        self.model_fingerprint, self.template_digest = fingerprint, digest


def test_select_cache_is_one_rule():
    rows = [_Row(1, 1.0), _Row(2, 0.5), _Row(3, 0.2, fingerprint="g"), _Row(4, 0.6, "uniform")]
    kind = CacheKind("f", "t")
    assert select_cache(rows, kind, AS_STORED).id == 1  # as stored: the most kept
    assert select_cache(rows, kind, Budget(None, "uniform")).id == 4  # its own level first
    assert select_cache(rows, kind, Budget(0.3, "pair")).id == 2  # a ratio: the smallest that covers it
    assert select_cache(rows, kind, Budget(0.7, "pair")).id == 1
    assert select_cache(rows, kind, Budget(0.7, "uniform")).id == 1  # derived from ratio 1.0
    assert select_cache(rows, kind, Budget(0.3, "uniform")).id == 4
    assert select_cache(rows, kind, Budget(0.5, "head")) is None
    assert select_cache(rows, CacheKind("g", "t"), AS_STORED).id == 3
    assert select_cache(rows, CacheKind("h", "t"), AS_STORED) is None
    assert select_cache(rows, kind, Budget(0.4, None)).id == 2


def test_loading_and_metadata_describe_the_same_cache(tmp_path, small):
    store = CacheStore(tmp_path / "store")
    store.add_document(small, HARBOUR, doc_id="harbour", ratio=0.5)
    store.add_document(small, HARBOUR, doc_id="harbour", ratio=1.0)
    records = store.caches_for("harbour", small)
    for ratio, stored in [(None, 1.0), (0.4, 0.5)]:
        chosen = select_cache(records, CacheKind.of_model(small), Budget(ratio, None))
        assert chosen.ratio == stored
        assert loading.pick(store, small, "harbour", 0, ratio, None)[0].id == chosen.id
        assert store.load_cache("harbour", small, ratio=ratio).info.ratio == (ratio or stored)
        target = QAService(store, small, ratio=ratio).route(QUESTION).targets[0]
        assert target.cache.id == chosen.id


# ------------------------------------------------------------------------------------------------ several models


def test_a_store_of_several_models_answers_from_the_answering_models_caches(tmp_path, small, other):
    assert small.fingerprint != other.fingerprint
    store = CacheStore(tmp_path / "store")
    store.add_document(small, HARBOUR, doc_id="harbour")
    store.add_document(other, LIGHTHOUSE, doc_id="lighthouse")
    store.add_document(other, HARBOUR + " It has two piers.", doc_id="piers")
    store.add_document(small, LIGHTHOUSE + " The harbour is old.", doc_id="both")
    store.add_document(other, LIGHTHOUSE + " The harbour is old.", doc_id="both")
    for model, mine in [(small, {"harbour", "both"}), (other, {"lighthouse", "piers", "both"})]:
        service = QAService(store, model)
        routed = service.route("Who is the keeper of the harbour lighthouse?", k=3).targets
        assert {t.doc_id for t in routed} <= mine and routed
        result = service.answer("Who is the keeper of the harbour lighthouse?", k=3, max_new_tokens=4)
        assert {t.doc_id for t in result.used} <= mine
        assert {t.doc_id for t in service.route("nothing matches zzz", k=3).targets} <= mine  # the fallback too
    with pytest.raises(ModelMismatchError):  # a document of another model only, asked for by id
        QAService(store, small).answer(QUESTION, targets=[("piers", 0)], max_new_tokens=2)


# ------------------------------------------------------------------------------------------------ one snapshot


def test_a_document_replaced_between_routing_and_loading_is_routed_again(tmp_path, small):
    store = CacheStore(tmp_path / "store")
    store.add_document(small, HARBOUR, doc_id="harbour")
    service = QAService(store, small)
    routed = service.route(QUESTION).targets
    old = routed[0].cache
    replaced = "The harbour of Velmora was rebuilt in 1802 by Mira Lund after a storm."
    store.add_document(small, replaced, doc_id="harbour", force=True)
    with pytest.raises(CacheChangedError):
        store.load_cache(old, small)
    result = service.answer(QUESTION, targets=routed, max_new_tokens=3)
    (used,) = result.used
    assert used.text == replaced  # the sources come from the snapshot the cache came from
    (current,) = store.caches_for("harbour", small)
    assert used.cache.id == current.id != old.id
    stream = service.stream(QUESTION, max_new_tokens=3)
    store.add_document(small, HARBOUR, doc_id="harbour", force=True)
    "".join(stream)
    assert [t.text for t in stream.result.used] == [HARBOUR]


def test_a_model_argument_is_checked_by_one_rule():
    from kvzip_rag.integrations.llamaindex import KVzipIndex

    for build in (lambda: QAService(None, model=42), lambda: KVzipIndex(model=42)):
        with pytest.raises(InvalidArgumentError, match="model must be a kvzip_rag.KVzipModel") as error:
            build()
        assert "\n" not in str(error.value)
