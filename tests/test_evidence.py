"""Evidence from the cache and abstention: the recorded attention mass equals an eager reference over the full
cache, composed caches map every pair back to its own document, citations are sentences of the stored text, and
the service returns them (or abstains) in every composition strategy; one end-to-end check with the real model."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
import torch

import kvzip_rag
from kvzip_rag import abstain
from kvzip_rag.answers import Target
from kvzip_rag.compose import compose
from kvzip_rag.evidence import Evidence, EvidenceRecorder, citations, document_places
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.generate import answer

from conftest import DATA_DIR, build_tiny
from test_cli import WIDE, tiny_model_dir  # noqa: F401  (fixture)
from test_engine import TEXT

OTHER = "The bakery on Mill Street opens at six. It sells rye bread and cinnamon buns to the ferry crews."
QUESTION = "Who built the harbour?"


def eager_mass(model: kvzip_rag.KVzipModel, ids: list[int], queries: range, context: range,
               layers: list[int]) -> torch.Tensor:
    """Reference: plain transformers with eager attention over the whole sequence (no cache at all); the attention
    probabilities of ``queries`` on the ``context`` positions, summed over queries, ``layers`` and heads,
    normalised."""
    hf = model.model
    previous = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = hf(torch.tensor([ids]), output_attentions=True, use_cache=False)
    finally:
        hf.set_attn_implementation(previous)
    attentions = torch.stack(out.attentions)[layers, 0]  # (layers, heads, L, L)
    picked = attentions[:, :, list(queries)][..., list(context)]
    return picked.sum(dim=(0, 1, 2)).double() / (attentions.shape[0] * attentions.shape[1] * len(queries))


@pytest.fixture(scope="module")
def tiny(smol_tokenizer) -> kvzip_rag.KVzipModel:
    return build_tiny("llama", smol_tokenizer, seed=5)  # 2 layers: evidence comes from the second (upper half)


def test_recorded_mass_equals_eager_attention_over_the_full_cache(tiny):
    cache = kvzip_rag.compress(tiny, TEXT, ratio=1.0)
    recorder = EvidenceRecorder(cache)
    result = answer(tiny, cache, QUESTION, max_new_tokens=6)
    evidence = recorder.finish()
    assert evidence.steps == 1 + len(result.token_ids) - 1  # the prompt's last token, then each generated but last
    prompt = tiny.encode(tiny.template.question_text(QUESTION))
    ids = list(cache.info.input_ids) + prompt + result.token_ids
    first_query = cache.info.base_length + len(prompt) - 1
    expected = eager_mass(tiny, ids, range(first_query, first_query + evidence.steps),
                          range(cache.info.prefix_length, cache.info.base_length), recorder.layers)
    assert recorder.layers == [1]  # the upper half of 2 layers
    assert torch.allclose(evidence.token_mass[0], expected, atol=1e-5)
    assert evidence.token_ids == [cache.info.input_ids[cache.info.prefix_length :]]
    assert evidence.document_share == pytest.approx(float(expected.sum()), abs=1e-5)
    assert all(layer.evidence is None for layer in cache.layers)  # detached: later answers record nothing


@pytest.mark.parametrize("layout", ["parallel", "sequential"])
def test_composed_pairs_map_back_to_their_own_document(tiny, layout):
    caches = [kvzip_rag.compress(tiny, text, ratio=1.0) for text in (TEXT, OTHER)]
    composed = compose(tiny, caches, layout=layout)
    recorder = EvidenceRecorder(composed)
    for index in recorder.layers:  # mass 1 on document 0's pairs, 2 on document 1's, 5 on the prefix
        recorder.mass[index] = (composed.sources[index] + 1).float().where(composed.sources[index] >= 0,
                                                                           torch.tensor(5.0))
    recorder.steps, recorder.heads = 1, 1
    evidence = recorder.finish()
    kv_heads = composed.layers[0].num_heads
    for place in document_places(composed):  # ratio 1.0: each token has one pair per kv head in every layer,
        assert place.length == caches[place.source].info.context_length  # and all mass is over 1 step x 1 head
        assert torch.allclose(evidence.token_mass[composed.composition.used.index(place.source)],
                              torch.full((place.length,), (place.source + 1.0) * kv_heads).double())


def test_citations_are_the_attended_sentences_of_the_stored_text(tiny):
    cache = kvzip_rag.compress(tiny, OTHER, ratio=1.0)
    offsets = tiny.tokenizer(OTHER, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    second = OTHER.index("It sells")
    in_second = [b - 1 >= second for _, b in offsets]  # a token belongs to the sentence of its last character
    mass = torch.tensor([0.3 if inside else 0.01 for inside in in_second], dtype=torch.float64)
    target = Target("bakery", 0, 1.0, OTHER)
    ids = tuple(cache.info.input_ids[cache.info.prefix_length :])
    cited = citations(Evidence([mass], [ids], float(mass.sum()), 1), [(target, OTHER)], tiny.tokenizer)
    assert cited[0].text == OTHER[second:] == OTHER[cited[0].start : cited[0].end]
    assert cited[0].weight == pytest.approx(float(mass[in_second].sum() / mass.sum()))
    assert len(cited) == 1  # the first sentence holds under a quarter of the best one's mass
    edited = OTHER.replace("rye", "oat")  # stored text no longer matches the cache's tokens: nothing is cited
    assert citations(Evidence([mass], [ids], 1.0, 1), [(target, edited)], tiny.tokenizer) == []


def test_the_sentence_holding_the_answers_words_is_cited_first(tiny):
    """Among the attended sentences, the one an answer takes its words from comes first, whatever their masses;
    an answer sharing no words keeps the mass order (and the weights stay each sentence's own mass)."""
    cache = kvzip_rag.compress(tiny, OTHER, ratio=1.0)
    offsets = tiny.tokenizer(OTHER, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    second = OTHER.index("It sells")
    mass = torch.tensor([0.2 if b - 1 >= second else 0.3 for _, b in offsets], dtype=torch.float64)
    evidence = Evidence([mass], [tuple(cache.info.input_ids[cache.info.prefix_length :])], 1.0, 1)
    documents = [(Target("bakery", 0, 1.0, OTHER), OTHER)]
    by_mass = citations(evidence, documents, tiny.tokenizer)
    assert [c.text for c in by_mass] == [OTHER[:second - 1], OTHER[second:]]
    cited = citations(evidence, documents, tiny.tokenizer, "They sell rye bread.")
    assert [c.text for c in cited] == [OTHER[second:], OTHER[:second - 1]]
    assert [c.weight for c in cited] == [by_mass[1].weight, by_mass[0].weight]
    assert citations(evidence, documents, tiny.tokenizer, "Nobody knows.") == by_mass


def test_a_cited_sentence_is_not_cut_at_an_abbreviation_or_an_initial(tiny):
    """SQuAD's "the banks of the St. Johns River" was cited as "Johns River, ..." without the "St." its answer
    began with; a period after an abbreviation, an initial or before a lower-case word ends no sentence."""
    from kvzip_rag.evidence import sentence_spans

    text = ("The city lies on the banks of the St. Johns River. J. K. Rowling lived in the U.S. Army base in 1997. "
            "Prices rose approx. ten percent. It ended.")
    assert [text[a:b] for a, b in sentence_spans(text)] == [
        "The city lies on the banks of the St. Johns River.", "J. K. Rowling lived in the U.S. Army base in 1997.",
        "Prices rose approx. ten percent.", "It ended."]
    cache = kvzip_rag.compress(tiny, text, ratio=1.0)
    offsets = tiny.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    river = text.index("Johns River")
    mass = torch.tensor([1.0 if river <= a < river + 11 else 0.01 for a, _ in offsets], dtype=torch.float64)
    evidence = Evidence([mass], [tuple(cache.info.input_ids[cache.info.prefix_length :])], 1.0, 1)
    cited = citations(evidence, [(Target("city", 0, 1.0, text), text)], tiny.tokenizer, "The St. Johns River.")
    assert cited[0].text == "The city lies on the banks of the St. Johns River."


# ---------------------------------------------------------------- the service and the CLI (tiny model)

DOCS = {"harbour": TEXT, "bakery": OTHER,
        "regatta": "Every August the town holds a regatta. Fishing boats race around the harbour; the winner "
                   "receives a silver anchor."}


@pytest.fixture(scope="module")
def service(tmp_path_factory, tiny_model_dir):  # noqa: F811
    from kvzip_rag.qa import QAService
    from kvzip_rag.store import CacheStore

    model = kvzip_rag.load_model(str(tiny_model_dir), threads=1)
    store = CacheStore(tmp_path_factory.mktemp("evidence-store"))
    for doc_id, text in DOCS.items():
        store.add_document(model, text, doc_id=doc_id, ratio=0.5)
    return QAService(store, model)


def stored(service, citation) -> str:
    return next(s.text for s in service.store.get_document(citation.doc_id).segments
                if s.index == citation.segment_index)


@pytest.mark.parametrize("compose", ["parallel", "sequential", "best-of-k"])
def test_answers_carry_citations_verified_against_the_store(service, compose):
    result = service.answer("Who built the harbour of the town?", k=3, compose=compose, max_new_tokens=4,
                            abstain_threshold=None)
    assert result.citations and not result.abstained
    composed = {t.node_id for t in (result.best.target, *result.best.also)}
    for citation in result.citations:
        assert citation.node_id in composed
        assert stored(service, citation)[citation.start : citation.end] == citation.text
    assert sum(c.weight for c in result.citations) <= 1.0 + 1e-9
    meta = result.metadata()
    assert meta["citations"] == [c.as_dict() for c in result.citations] and meta["abstained"] is False
    assert 0.0 <= meta["evidence_score"] <= 1.0 and set(meta["evidence_features"]) == set(abstain.FEATURES)


def test_an_answer_reads_each_stored_text_once(service, monkeypatch):
    """Evidence, its citations and the quote share one read of the segment per answer."""
    reads = []
    get_document = service.store.get_document
    monkeypatch.setattr(service.store, "get_document", lambda doc_id: reads.append(doc_id) or get_document(doc_id))
    result = service.answer("Who built the harbour?", max_new_tokens=4, answer_style="quote", abstain_threshold=None)
    assert reads == [result.best.target.doc_id] and result.citations
    "".join(service.stream("Who built the harbour?", max_new_tokens=4, answer_style="quote"))
    assert reads == [result.best.target.doc_id] * 2  # the next answer reads the store again


def test_evidence_off_records_nothing(service):
    result = service.answer("Who built the harbour?", k=2, max_new_tokens=3, evidence=False)
    assert result.citations == [] and result.best.answer.evidence is None
    assert result.evidence_score is None and not result.abstained


def test_abstention_replaces_the_text_and_keeps_the_candidate(service):
    kept = service.answer("Who built the harbour?", max_new_tokens=3, abstain_threshold=0.0)
    assert not kept.abstained and kept.text == kept.candidate
    result = service.answer("Who built the harbour?", max_new_tokens=3, abstain_threshold=1.0,
                            abstain_text="Not in these files.")
    assert result.abstained and result.text == "Not in these files."
    assert result.metadata()["candidate_answer"] == result.candidate == kept.candidate
    assert "candidate_answer" not in kept.metadata()
    stream = service.stream("Who built the harbour?", max_new_tokens=3, abstain_threshold=1.0)
    assert "".join(stream).strip() == kept.candidate  # the stream yields the candidate as generated
    assert stream.result.abstained and stream.result.text == abstain.DEFAULT_ABSTAIN_TEXT


def test_default_threshold_is_the_calibrated_one():
    calibration = abstain.default_calibration()
    assert abstain.Grounding().threshold == calibration.threshold
    assert calibration.fitted_on["ratio"] == 0.3 and calibration.fitted_on["questions"] > 0


def test_question_coverage_counts_the_search_terms_the_answering_text_holds():
    assert abstain.question_coverage("Who built the harbour?", [TEXT]) == 1.0  # "who", "the": stop words
    assert abstain.question_coverage("Who built the bakery?", [TEXT]) == 0.5
    assert abstain.question_coverage("Who built the bakery?", [TEXT, OTHER]) == 1.0
    assert abstain.question_coverage("Who built the harbour?", [OTHER]) == 0.0


def test_the_same_answer_gets_the_same_score_in_a_store_of_3_and_of_30(tiny_model_dir, tmp_path):  # noqa: F811
    """The evidence score (and so the decision) depends on the question and the answering document, not on how
    many other documents the store holds (BM25's term weights do)."""
    from conftest import service_over

    model = kvzip_rag.load_model(str(tiny_model_dir), threads=1)
    filler = {f"market-{i}": f"The market of village {i} sells apples and pears on Tuesdays." for i in range(27)}
    results = []
    for name, docs in (("three", DOCS), ("thirty", {**DOCS, **filler})):
        service = service_over(model, tmp_path / name, docs, ratio=0.5)
        assert len(service.store) == len(docs)
        result = service.answer("Who built the harbour of Velmora?", max_new_tokens=4)
        assert result.best.target.doc_id == "harbour" and result.targets[0].routing == "search"
        results.append(result)
    small, large = results
    assert small.targets[0].score != pytest.approx(large.targets[0].score)  # the routing score differs
    assert small.evidence_features == large.evidence_features
    assert small.evidence_score == pytest.approx(large.evidence_score)
    assert small.abstained == large.abstained


def test_the_calibration_fit_separates_and_keeps_answerable_abstention_low():
    from kvzip_rag.bench.abstention import calibrate, cross_validated

    generator = torch.Generator().manual_seed(0)
    rows = []
    for article in range(10):
        for answerable in (True, False) * 10:
            noise = torch.rand(5, generator=generator).tolist()
            coverage = (0.6 if answerable else 0.1) + 0.3 * noise[3]  # the only feature that tells them apart
            rows.append({"article": f"a{article}", "answerable": answerable,
                         "features": [noise[0], noise[1], -noise[2], coverage, 0.0]})
    model = calibrate(rows, answerable_abstention=0.05)
    assert model.weights[3] > 0 and model.probability([0.5, 0.5, -0.5, 0.85, 0.0]) > model.threshold
    held = cross_validated(rows, folds=2, answerable_abstention=0.05)
    assert held["unanswerable_abstained"] == 1.0 and held["answerable_abstained"] <= 0.1
    assert held["n_answerable"] == held["n_unanswerable"] == 100


@pytest.mark.parametrize("options", [{"abstain_threshold": 1.5}, {"abstain_threshold": "high"},
                                     {"evidence": "yes"}, {"abstain_text": " "}])
def test_bad_grounding_options_are_refused(service, options):
    with pytest.raises(InvalidArgumentError):
        service.answer("Who built the harbour?", **options)
    with pytest.raises(InvalidArgumentError):
        service.stream("Who built the harbour?", **options)


def test_composed_documents_without_evidence_leave_the_sources(service, monkeypatch):
    monkeypatch.setattr(abstain, "NO_EVIDENCE_SHARE", 0.99)  # every document but the best-attended one
    result = service.answer("Who built the harbour of the town?", targets=[(d, 0) for d in DOCS], max_new_tokens=3,
                            abstain_threshold=None)
    shares = result.best.answer.evidence.shares()
    composed = [result.best.target, *result.best.also]
    assert len(composed) == 3
    assert result.used == [composed[shares.index(max(shares))]]
    assert result.metadata()["no_evidence_node_ids"] == [t.node_id for t in composed if t not in result.used]
    assert result.source_metadata()[result.metadata()["no_evidence_node_ids"][0]] == {"composed": True,
                                                                                      "evidence": False}


def test_cli_ask_prints_the_evidence_and_the_abstention(service, tiny_model_dir):  # noqa: F811
    from typer.testing import CliRunner

    from kvzip_rag.cli import app

    base = ["--store", str(service.store.path), "--model", str(tiny_model_dir), "ask", "Who built the harbour?",
            "--max-tokens", "3"]
    shown = CliRunner(env=WIDE).invoke(app, base + ["--no-abstain"])
    assert shown.exit_code == 0, shown.output
    assert "“" in shown.output and "of the evidence" in shown.output and "harbour" in shown.output
    abstained = CliRunner(env=WIDE).invoke(app, base + ["--abstain-threshold", "1"])
    assert abstained.exit_code == 0 and abstain.DEFAULT_ABSTAIN_TEXT in abstained.output
    quiet = CliRunner(env=WIDE).invoke(app, base + ["--no-evidence"])
    assert quiet.exit_code == 0 and "of the evidence" not in quiet.output
    assert abstain.DEFAULT_ABSTAIN_TEXT not in quiet.output


# ---------------------------------------------------------------- end to end (the default model, SQuAD)


RECIPE = ("Lemon Barley Soup. Rinse 150 grams of pearl barley, add 1,500 ml of stock, then simmer for forty minutes. "
          "The buns rise for another 30 minutes and bake at 200 degrees for 8 to 10 minutes. It serves four.")


@pytest.mark.parametrize("answer, cut, expected", [
    ("It simmers for 20 minutes to 30 minutes.", False, ("20",)),  # 30 is there (the buns), 20 nowhere
    ("It simmers for 40 minutes.", False, ()),  # "forty" in words
    ("Use 1500 ml, 150.0 grams and 1,500 ml; serves 4, bakes at 200 for 8-10 minutes.", False, ()),
    ("Simmer for 45 minutes, or 3 hours, at 180.5 degrees.", False, ("45", "3", "180.5")),
    ("It was made from 1969 to 1", True, ("1969",)),  # cut at the token limit: the last number may be a part
    ("It was made from 1969 to 1", False, ("1969", "1")),
    ("In Lemon Barley Soup 2 the barley", True, ("2",)),  # only a number at the very end is spared
    ("It takes 7 minutes.", False, ()),  # the question's own number
])
def test_the_answers_numbers_that_no_document_holds_are_flagged(answer, cut, expected):
    assert abstain.unsupported_numbers(answer, cut, "Is it 7 minutes?", ["A note.", RECIPE]) == expected


def test_numbers_are_read_in_digits_and_in_words():
    from kvzip_rag.language import digit_numbers, worded_numbers

    assert digit_numbers("v2 costs 1,500 or 1.5, in 1969. See 3.") == ["1500", "1.5", "1969", "3"]
    assert digit_numbers("1" * 5000) == [] and digit_numbers("1" * 15) == ["1" * 15]  # a long run is no figure
    assert worded_numbers("three hundred years, forty-two days, twenty one, two million people; one two. "
                          "Three hundred and five.") == {"300", "42", "21", "2000000", "1", "2", "305"}
    assert worded_numbers("No figures here, nothing at all.") == set()


def test_default_model_flags_a_number_the_documents_do_not_hold(default_model, tmp_path):
    """The sample recipes say the soup simmers for 40 minutes; the default model answers "20 minutes to 30
    minutes". 30 is in the document (the buns), 20 is not: it is flagged in the result, in every interface's
    metadata and in ``ask``'s output."""
    from llama_index.core import Document

    from kvzip_rag.integrations.langchain import create_kvzip_qa_chain
    from kvzip_rag.integrations.llamaindex import KVzipIndex

    recipes = (Path(__file__).parents[1] / "examples" / "docs" / "recipes.txt").read_text()
    index = KVzipIndex.from_documents([Document(text=recipes, id_="recipes.txt")], model=default_model,
                                      store=tmp_path / "store", ratio=0.3)
    question = "How long does the lemon barley soup simmer?"
    result = index.qa.answer(question)
    assert "20 minutes" in result.text and not result.abstained
    assert result.unsupported_numbers == ("20",) and result.metadata()["unsupported_numbers"] == ["20"]
    assert index.as_query_engine().query(question).metadata["unsupported_numbers"] == ["20"]
    assert create_kvzip_qa_chain(index).invoke(question)["unsupported_numbers"] == ["20"]
    from kvzip_rag.dialogue import ChatSession

    turn = ChatSession(index.qa).ask(question)  # a conversation's turn alike
    assert turn.unsupported_numbers == ("20",) and turn.info["unsupported_numbers"] == ["20"]
    from typer.testing import CliRunner

    from kvzip_rag.cli import app

    shown = CliRunner(env=WIDE).invoke(app, ["--store", str(index.qa.store.path), "ask", question])
    assert shown.exit_code == 0, shown.output
    assert "Not in the documents: 20 " in shown.output and "20 minutes" in shown.output
    quoted = index.qa.answer(question, answer_style="quote")  # a quote is the document's own text
    assert quoted.unsupported_numbers == () and quoted.metadata()["unsupported_numbers"] == []


def test_default_model_cites_the_gold_sentence_and_abstains_without_the_article(default_model, tmp_path):
    from kvzip_rag.bench.data import load_squad
    from kvzip_rag.bench.metrics import contains_gold
    from kvzip_rag.qa import QAService
    from kvzip_rag.store import CacheStore

    if not (DATA_DIR / "squad").is_dir():
        pytest.skip(f"SQuAD data not found under {DATA_DIR}")
    documents = load_squad(DATA_DIR, lambda t: len(default_model.encode(t)), 5, 300, 700, 6)  # as calibrated
    store = CacheStore(tmp_path / "store")
    for document in documents:
        store.add_document(default_model, document.text, doc_id=document.id, ratio=0.3)
    service = QAService(store, default_model, ratio=0.3)
    question = next(q for q in documents[0].questions
                    if q.question == "Which NFL team represented the NFC at Super Bowl 50?")
    scope = [d.id for d in documents[:3]]
    answered = service.answer(question.question, doc_ids=scope, max_new_tokens=64)
    assert not answered.abstained and answered.citations[0].doc_id == documents[0].id
    assert any(contains_gold(answered.citations[0].text, gold) for gold in question.answers)
    without = service.answer(question.question, doc_ids=scope[1:], max_new_tokens=64)
    assert without.abstained and without.text == abstain.DEFAULT_ABSTAIN_TEXT
    assert without.metadata()["candidate_answer"] == without.candidate != ""


def test_cli_chat_prints_each_turns_evidence(service, tiny_model_dir):  # noqa: F811
    from typer.testing import CliRunner

    from kvzip_rag.cli import app

    chat = CliRunner(env=WIDE).invoke(app, ["--store", str(service.store.path), "--model", str(tiny_model_dir),
                                            "chat", "--max-tokens", "3"], input="Who built the harbour?\nexit\n")
    assert chat.exit_code == 0, chat.output
    assert chat.output.count("of the evidence") >= 1 and "harbour" in chat.output


def test_cli_inspect_marks_the_evidence_of_a_question(service, tiny_model_dir, tmp_path):  # noqa: F811
    from typer.testing import CliRunner

    from kvzip_rag.cli import app

    shown = CliRunner(env=WIDE).invoke(app, ["--store", str(service.store.path), "--model", str(tiny_model_dir),
                                             "inspect", "harbour", "--out", str(tmp_path), "--question",
                                             "Who built the harbour?"])
    assert shown.exit_code == 0, shown.output
    page = (tmp_path / "harbour.tokens.html").read_text()
    assert "Evidence for: Who built the harbour?" in page
    marked = page.split("<mark", 1)[1].split(">", 1)[1].split("</mark>", 1)[0]
    assert marked and html.unescape(marked) in TEXT


async def test_aanswer_takes_the_same_grounding_options(service):
    result = await service.aanswer("Who built the harbour?", max_new_tokens=3, abstain_threshold=1.0)
    assert result.abstained and result.citations and result.text == abstain.DEFAULT_ABSTAIN_TEXT
