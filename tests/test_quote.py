"""Quote mode (every answer a verbatim span of a routed document, cited exactly), the clean-answer rules of free
generation, and ``kvzip-rag bench --task grounding`` (tiny random-weight models; a few SQuAD questions with the
default model)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import kvzip_rag
from kvzip_rag.abstain import DEFAULT_ABSTAIN_TEXT
from kvzip_rag.clean import answer_end
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.qa import QAService
from kvzip_rag.store import CacheStore
from conftest import DATA_DIR, build_tiny

DOCS = {
    "harbour": "The harbour of Velmora was built in 1731 by the engineer Ansel Brask for 12,500 crowns.\n\n"
               "Ferries leave the harbour for the island of Tessin every morning at seven.",
    "cafe": "Le café Zoë, on the Rue Müller, serves crêpes — 3,40 € each — since 1998. Its owner, Anaïs Brûlé, "
            "bakes them at dawn.",
    "numbers": "The bridge is 1,204 metres long; 14 pillars carry it 62.5 m above the river Aare.",
}
QUESTIONS = ("Who built the harbour?", "How long is the bridge?", "What does the café serve?", "When do ferries leave?",
             "Velmora crêpes pillars")


@pytest.fixture(scope="module")
def tiny_stores(tmp_path_factory, smol_tokenizer):
    """(model, store holding DOCS for it) by seed, built on first use (caches belong to one model)."""
    built: dict[int, tuple] = {}

    def get(seed: int):
        if seed not in built:
            model = build_tiny("llama", smol_tokenizer, seed=seed)
            store = CacheStore(tmp_path_factory.mktemp("quote-store"))
            for doc_id, text in DOCS.items():
                store.add_document(model, text, doc_id=doc_id, ratio=1.0)
            built[seed] = model, store
        return built[seed]

    return get


@pytest.fixture(scope="module")
def tiny_store(tiny_stores):
    return tiny_stores(3)


def _check_quoted(result) -> None:
    """The answer is a span of a routed segment, and its citation is that exact span of the stored text."""
    texts = [DOCS[t.doc_id] for t in result.used]
    assert result.text and any(result.text in text for text in texts), result.text
    assert "\n" not in result.text
    (cited,) = result.citations
    assert cited.text == result.text == DOCS[cited.doc_id][cited.start : cited.end]
    assert cited.doc_id in {t.doc_id for t in result.used} and cited.weight == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k,compose", [(1, None), (3, None), (3, "best-of-k")])
def test_random_weights_still_quote_a_document_span(tiny_stores, seed, k, compose):
    """Random weights write arbitrary answers: each is still shown as a span of a routed segment, across sampling,
    composition and caps; ratio 0.3 and as stored."""
    model, store = tiny_stores(seed)
    for ratio in (0.3, None):
        service = QAService(store, model, ratio=ratio)
        for n, question in enumerate(QUESTIONS):
            sampling = {"temperature": 1.5, "seed": seed * 10 + n} if n % 2 else {}
            result = service.answer(question, k=k, compose=compose, answer_style="quote",
                                    max_new_tokens=(3, 12, 40)[n % 3], **sampling)
            _check_quoted(result)


def test_quote_streams_and_is_checked(tiny_store):
    """A quote streams as one piece once the answer is complete; free generation stays the default."""
    model, store = tiny_store
    service = QAService(store, model)
    stream = service.stream("Who built the harbour?", k=2, answer_style="quote", max_new_tokens=8)
    pieces = list(stream)
    assert pieces == [stream.result.text]
    _check_quoted(stream.result)
    with pytest.raises(InvalidArgumentError, match="answer_style"):
        service.answer("Who built the harbour?", answer_style="verbatim")
    free = service.answer("Who built the harbour?", max_new_tokens=4)
    # free generation stays the default: its citations are attention evidence (whole sentences), not an exact quote
    assert free.quote is None and all(c.text != free.text for c in free.citations)


@pytest.mark.parametrize("k,compose", [(1, None), (3, "best-of-k"), (3, "parallel")])
def test_quote_is_the_free_answer_snapped(tiny_store, k, compose):
    """Quote mode generates exactly the free answer (same prompt, same tokens) and shows it snapped to the stored
    text; the grounding benchmark's quote (``quote_result`` of the free answer) is the service's."""
    model, store = tiny_store
    service = QAService(store, model, ratio=0.3)
    for question in QUESTIONS:
        free = service.answer(question, k=k, compose=compose, max_new_tokens=12, abstain_threshold=None)
        quoted = service.answer(question, k=k, compose=compose, max_new_tokens=12, abstain_threshold=None,
                                answer_style="quote")
        assert quoted.best.answer.token_ids == free.best.answer.token_ids
        assert quoted.best.answer.prompt_tokens == free.best.answer.prompt_tokens
        assert quoted.best.text == free.text and quoted.candidate == quoted.text == quoted.quote.text
        snapped = service.quote(question, free.text, free.used, free.citations)
        assert quoted.quote == snapped == service.quote_result(free).quote
        _check_quoted(quoted)


def test_abstained_quote_abstains(tiny_store):
    """Abstention reads the generated answer's evidence as in free mode; an abstained quote shows the abstention,
    the quote kept as the candidate, the citations the evidence."""
    model, store = tiny_store
    service = QAService(store, model)
    result = service.answer("Who built the harbour?", answer_style="quote", abstain_threshold=1.0, max_new_tokens=6)
    assert result.abstained and result.text == DEFAULT_ABSTAIN_TEXT
    assert result.candidate == result.quote.text and result.metadata()["candidate_answer"] == result.quote.text
    assert result.quote not in result.citations
    free = service.answer("Who built the harbour?", abstain_threshold=1.0, max_new_tokens=6)
    assert free.evidence_score == result.evidence_score and free.citations == result.citations


def test_chat_turns_quote(tiny_store):
    """A conversation's turn in quote mode shows (and emits, once) the quote, cited exactly; the conversation keeps
    the generated answer."""
    from kvzip_rag.dialogue import ChatSession

    model, store = tiny_store
    session = ChatSession(QAService(store, model), sampling={"answer_style": "quote", "max_new_tokens": 6,
                                                             "abstain_threshold": None})
    for question in ("Who built the harbour?", "And when?"):
        pieces: list[str] = []
        turn = session.ask(question, emit=pieces.append)
        assert pieces == [turn.text] and turn.citations == [turn.quote]
        assert turn.text == DOCS[turn.quote.doc_id][turn.quote.start : turn.quote.end]
        assert session.conversation.turns[-1] == (question, turn.answer.text)


# ------------------------------------------------------------------------------------------ the snapping rule

CENTRAL_ASIA = ("The Black Death is thought to have started in the arid plains of Central Asia. From there it "
                "travelled along the Silk Road and reached Crimea by 1343.")


def test_snap_keeps_the_novel_words_of_the_answer():
    """The shared run is trimmed to its novel words: neither the question's words nor function words."""
    from kvzip_rag.quote import snap

    answer = "The Black Death originated in the arid plains of Central Asia"
    n, start, end = snap(answer, "Where did the Black Death originate?", [CENTRAL_ASIA])
    assert (n, CENTRAL_ASIA[start:end]) == (0, "arid plains of Central Asia")
    _, start, end = snap("Along the SILK ROAD.", "Which route did it travel along?", [CENTRAL_ASIA])
    assert CENTRAL_ASIA[start:end] == "Silk Road"  # the stored characters


def test_snap_never_quotes_a_clitic_alone():
    """A possessive's "s" is a word of the split, not an answer: "the Earth's" shares only "s" beyond the question's
    words, so the quote falls back to the sentence closest to the question instead of the letter "s"."""
    from kvzip_rag.quote import snap

    text = "Below the Earth's crust lies the mantle. The core is mostly iron."
    n, start, end = snap("The Earth's", "What lies below the crust of the Earth?", [text])
    assert text[start:end] == "Below the Earth's crust lies the mantle."


def test_snap_prefers_the_sentence_the_question_is_about():
    """Runs with as many novel words: the one in the sentence sharing more words with the question wins."""
    from kvzip_rag.quote import snap

    text = "The old mill burned in 1820. The new bridge opened in 1820, built of granite."
    _, start, end = snap("in 1820", "When did the new bridge open?", [text])
    assert (start, end) == (text.rindex("1820"), text.rindex("1820") + 4)
    _, start, end = snap("in 1820", "When did the old mill burn?", [text])
    assert (start, end) == (text.index("1820"), text.index("1820") + 4)


def test_snap_across_segments_and_line_breaks():
    """The best run of all the routed segments; a run never crosses a line break of the stored text."""
    from kvzip_rag.quote import snap

    texts = ["Ferries leave at seven.", "The harbour was built by Ansel Brask\nengineer of the port."]
    n, start, end = snap("Ansel Brask engineer", "Who built the harbour?", texts)
    assert (n, texts[n][start:end]) == (1, "Ansel Brask")


def test_snap_falls_back_on_the_evidence_then_the_question():
    """No shared novel word: the answer's best evidence citation; without evidence, the sentence sharing most
    question words; nothing at all without text."""
    from kvzip_rag.answers import Citation, Target
    from kvzip_rag.quote import quote_answer, snap

    targets = [Target("a", 0), Target("b", 2)]
    texts = ["Ferries leave at seven. The harbour has a lighthouse.", CENTRAL_ASIA]
    second = CENTRAL_ASIA.index("From")
    cited = Citation("b", 2, second, len(CENTRAL_ASIA), CENTRAL_ASIA[second:], 0.7)
    assert snap("the of", "Which harbour?", texts, cited, targets) == (1, second, len(CENTRAL_ASIA))
    n, start, end = snap("the of", "Which harbour?", texts)
    assert texts[n][start:end] == "The harbour has a lighthouse."
    quote = quote_answer("the of", "Which harbour?", targets, texts, [cited])
    assert quote == Citation("b", 2, second, len(CENTRAL_ASIA), CENTRAL_ASIA[second:], 1.0)
    assert quote_answer("the of", "Which harbour?", targets, [None, ""]) is None


def test_quote_citations_are_verified():
    from kvzip_rag.answers import Target
    from kvzip_rag.quote import quote_citation

    cited = quote_citation(Target("b", 2), "gamma delta", 6, 11)
    assert (cited.doc_id, cited.segment_index, cited.start, cited.end, cited.text) == ("b", 2, 6, 11, "delta")
    assert quote_citation(Target("b", 2), "gamma delta", 6, 6) is None


# ------------------------------------------------------------------------------------------ clean free answers


class _Tok:
    """Decodes ids as their characters (one id = one character), enough for the ending rules."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _ids(text: str) -> list[int]:
    return [ord(c) for c in text]


def _generate(text: str) -> str:
    """The answer a stream keeps when the model writes ``text`` one id at a time."""
    tok = _Tok()
    for n in range(1, len(text) + 1):
        end = answer_end(text[:n].lstrip(), _ids(text[:n]), tok)
        if end is not None:
            return end
    return text.strip()


def test_free_answer_ends_at_line_break_or_self_repeat():
    assert _generate("Ansel Brask.\nHe also built") == "Ansel Brask."
    assert _generate("Ansel Brask") == "Ansel Brask"
    assert _generate("the harbour of the harbour of the harbour of") == "the harbour of"
    assert _generate("1,000,000,000,000") == "1,000,000,000,000"  # a repeated run without a word is no loop


def test_clean_is_an_answer_option(tiny_store):
    """``clean=False`` is free generation as before (no early end); ``clean`` is checked
    with the other answer options."""
    model, store = tiny_store
    service = QAService(store, model)
    raw = service.answer("Who built the harbour?", clean=False, max_new_tokens=40)
    assert raw.best.answer.finish_reason == "length" and len(raw.best.answer.token_ids) == 40  # random weights
    assert service.answer("Who built the harbour?", clean=True, max_new_tokens=40).text
    with pytest.raises(InvalidArgumentError):
        service.answer("Who built the harbour?", cleanly=True)


def test_cli_ask_quote(tiny_store, tmp_path, smol_tokenizer):
    from kvzip_rag.cli import app
    from test_cli import WIDE

    model, store = tiny_store
    folder = tmp_path / "model"
    model.model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    result = CliRunner(env=WIDE).invoke(app, ["--store", str(store.path), "--model", str(folder), "ask",
                                              "Who built the harbour?", "--quote", "--max-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "quoted from" in result.output


# ------------------------------------------------------------------------------------------ the benchmark task


@pytest.mark.skipif(not (DATA_DIR / "squad").is_dir(), reason="shared data not found")
def test_bench_grounding_on_a_tiny_model(tmp_path, smol_tokenizer, monkeypatch):
    from dataclasses import replace

    from kvzip_rag import abstain
    from kvzip_rag.bench.cli import run_bench

    calibration = replace(abstain.default_calibration(), threshold=1.0)  # the abstaining methods always abstain
    monkeypatch.setattr(abstain, "default_calibration", lambda: calibration)

    model = build_tiny("llama", smol_tokenizer)
    out = run_bench(data_dir=DATA_DIR, out_dir=tmp_path, tasks=("grounding",), loaded_model=model,
                    embedding="hashing", limit=2, log=lambda _: None,
                    preset_overrides={"grounding_articles": 2, "grounding_hotpot": 2, "grounding_max_new_tokens": 4,
                                      "grounding_ratios": (0.3,)})
    saved = json.loads((tmp_path / "grounding.json").read_text())
    assert saved["summary"] == out["grounding"]["summary"]
    table = saved["summary"]["table"]
    assert set(table) == {"squad", "squad-unanswerable", "hotpotqa"}
    assert set(table["squad"]) == {"free@0.3", "free+abstain@0.3", "quote@0.3", "quote+abstain@0.3", "chunk-rag"}
    assert all(m["n"] == 2 for m in table["squad"].values())
    assert len({r["doc"] for r in saved["rows"] if r["set"] == "squad"}) == 2  # round-robin over the articles
    fitted = set(calibration.fitted_on["question_ids"])  # the abstention is measured on held-out questions
    assert len(fitted) == saved["meta"]["calibration_questions_excluded"] == 120
    assert not fitted & {r["qid"] for r in saved["rows"] if r["set"].startswith("squad")}
    base = {(r["set"], r["qid"], r["method"]): r for r in saved["rows"]}
    for row in saved["rows"]:
        if row["method"].startswith("quote") and not row["abstained"]:
            assert row["citation"]["text"] == row["answer"]
        if row["method"].startswith("free") and row["citation"] is not None:  # the cited sentence is weighed
            cited = row["citation"]
            assert [cited["doc_id"], cited["start"], cited["end"]] in [[s[0], s[2], s[3]]
                                                                       for s in row["evidence_sentences"]]
        if "+abstain" in row["method"]:  # the same answer as its method without abstention, or the abstention
            same = base[(row["set"], row["qid"], row["method"].replace("+abstain", ""))]
            assert not same["abstained"]
            assert row["answer"] == (DEFAULT_ABSTAIN_TEXT if row["abstained"] else same["answer"])
            assert row["total_s"] == same["total_s"]
            assert row["abstained"] and row["citation"] is None
    assert all(r["evidence_sentences"] for r in saved["rows"] if r["method"].startswith("free@"))
    for method, summary in table["squad"].items():  # served answers checked for numbers no document holds
        rows = [r for r in saved["rows"] if r["set"] == "squad" and r["method"] == method]
        if method == "chunk-rag":
            assert summary["numbers_flagged"] is None  # not a service answer: not checked
            continue
        served = [r for r in rows if not r["abstained"]]
        flagged = [r for r in served if r["unsupported_numbers"]]
        assert summary["numbers_flagged"] == ([len(flagged), len(served), sum(not r["contains"] for r in flagged)]
                                              if served else None)
    assert saved["summary"]["quote_minus_free_f1"]["squad"]["quote@0.3"]["n"] == 2
    assert "## hotpotqa" in (tmp_path / "grounding.md").read_text()


@pytest.mark.skipif(not (DATA_DIR / "squad").is_dir(), reason="shared data not found")
def test_bench_grounding_run_extends_an_earlier_one_and_merges(tmp_path, smol_tokenizer):
    """``grounding_first_round`` skips the rounds an earlier run answered; ``merge`` joins the runs' rows (the
    earlier run's row where both answered a question) into one summary."""
    from kvzip_rag.bench.cli import run_bench
    from kvzip_rag.bench.grounding import merge

    model = build_tiny("llama", smol_tokenizer)
    preset = {"grounding_articles": 2, "grounding_hotpot": 2, "grounding_max_new_tokens": 4,
              "grounding_ratios": (0.3,)}
    for name, first, limit in (("a", 0, 1), ("b", 0, 2), ("c", 1, 2)):  # a: round 0; b: rounds 0-1; c: round 1
        run_bench(data_dir=DATA_DIR, out_dir=tmp_path / name, tasks=("grounding",), loaded_model=model,
                  embedding="hashing", limit=limit, log=lambda _: None,
                  preset_overrides={**preset, "grounding_first_round": first})
    read = lambda name: json.loads((tmp_path / name / "grounding.json").read_text())
    key = lambda r: (r["set"], r["qid"], r["method"])
    assert {r["qid"] for r in read("c")["rows"]} & {r["qid"] for r in read("a")["rows"]} == set()
    merged = merge([tmp_path / "a" / "grounding.json", tmp_path / "c" / "grounding.json", tmp_path / "b" /
                    "grounding.json"], tmp_path / "merged")
    assert sorted(map(key, merged["rows"])) == sorted(map(key, read("b")["rows"]))
    assert all(m["n"] == 2 for m in merged["summary"]["table"]["squad"].values())
    assert json.loads((tmp_path / "merged" / "grounding.json").read_text())["summary"] == merged["summary"]


def test_bench_abstains_as_the_service_would(monkeypatch):
    """The abstaining methods apply the calibrated default threshold to the answer's evidence score."""
    from dataclasses import replace
    from types import SimpleNamespace

    from kvzip_rag import abstain
    from kvzip_rag.bench.grounding import abstained, methods

    threshold = 0.4
    calibration = replace(abstain.default_calibration(), threshold=threshold)
    monkeypatch.setattr(abstain, "default_calibration", lambda: calibration)
    assert abstained(SimpleNamespace(evidence_score=threshold / 2))
    assert not abstained(SimpleNamespace(evidence_score=threshold))
    assert not abstained(SimpleNamespace(evidence_score=None))
    assert all(m.options["abstain_threshold"] is None for m in methods((0.3, 1.0)))
    assert [m.label for m in methods((0.3,))] == ["free@0.3", "free+abstain@0.3", "quote@0.3", "quote+abstain@0.3"]


def test_bench_citation_accuracy_counts_uncited_correct_answers_as_misses():
    from kvzip_rag.bench.grounding import summarize

    def row(method, citations, has_gold):
        return {"set": "squad", "qid": method + str(has_gold), "method": method, "f1": 1.0, "contains": 1.0,
                "abstained": False, "answer_tokens": 2, "ttft_s": 0.1, "total_s": 0.2, "citations": citations,
                "citation": citations[0] if citations else None, "citation_has_gold": has_gold,
                "citation_in_gold": None}

    cited = {"doc_id": "d", "text": "Ansel Brask built it."}
    table = summarize([row("free@0.3", [cited], 1.0), row("free@0.3", [], None), row("chunk-rag", None, None)])
    assert table["table"]["squad"]["free@0.3"]["citation_accuracy"] == 0.5
    assert table["table"]["squad"]["free@0.3"]["cited_correct"] == 2
    assert table["table"]["squad"]["chunk-rag"]["citation_accuracy"] is None


# ------------------------------------------------------------------------------------------ the default model


def test_default_model_quotes_squad(default_model, squad, tmp_path):
    """A few SQuAD questions with the real model: every quote is a span of the article, cited exactly."""
    store = CacheStore(tmp_path / "store")
    paragraph = squad[0]["paragraphs"][0]
    store.add_document(default_model, paragraph["context"], doc_id="sb50", ratio=1.0)
    service = QAService(store, default_model, ratio=0.3)
    for qa in paragraph["qas"][:3]:
        result = service.answer(qa["question"], answer_style="quote", max_new_tokens=16)
        cited = result.citations[0]
        assert result.text in paragraph["context"]
        assert paragraph["context"][cited.start : cited.end] == result.text
