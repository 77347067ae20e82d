"""Choosing ratio and kv_bits from a model's measured compression curve (kvzip_rag.frontier): the picker, the curve
written from fidelity results, and the round trip bench --write-curve -> index --target-bytes on a tiny model."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest

from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.frontier import Curve, CurvePoint, choose, curve_from_fidelity, find_curve, pick_budget, plot_curve
from test_bench import tiny_data  # noqa: F401  (fixture)

FP16 = 10_000


def point(ratio: float, bits: int, size: float, loss: float, high: float, scorer: str = "kvzip") -> CurvePoint:
    return CurvePoint(scorer, "pair", ratio, bits, size, size / FP16, loss, high, 300)


CURVE = Curve("tiny", "abc", FP16, (
    point(0.3, 4, 2500, -0.05, 0.02), point(0.125, 4, 1100, -0.07, 0.06), point(0.125, 3, 940, 0.06, 0.19),
    point(0.0625, 4, 580, 0.14, 0.26), point(0.0625, 3, 490, 0.21, 0.33), point(0.125, 3, 900, -0.2, -0.1,
                                                                              scorer="kvzip-structure"),
), {})


def test_max_nll_loss_picks_the_fewest_bytes_whose_interval_meets_it():
    assert choose(CURVE, max_nll_loss=0.1) == CURVE.points[1]  # 0.125 int4: upper end 0.06; K4V2 ends at 0.19
    assert choose(CURVE, max_nll_loss=0.2) == CURVE.points[2]
    assert choose(CURVE, max_nll_loss=0.2, target_bytes=1000) == CURVE.points[2]
    assert choose(CURVE, max_nll_loss=0.1, scorer="kvzip-structure") == CURVE.points[5]  # its own points only
    assert choose(CURVE, max_nll_loss=0.1, scorer=None) == CURVE.points[5]  # any scorer: the fewest bytes
    assert choose(CURVE, target_bytes=1000, scorer=None) == CURVE.points[5]  # any scorer: the best fidelity


def test_target_bytes_picks_the_best_fidelity_within_the_budget_in_bytes_or_as_a_share():
    assert choose(CURVE, target_bytes=1200) == CURVE.points[1]
    assert choose(CURVE, target_bytes="1000") == CURVE.points[2]
    assert choose(CURVE, target_bytes="0.06x") == choose(CURVE, target_bytes=600) == CURVE.points[3]


@pytest.mark.parametrize("bounds, message", [
    ({"target_bytes": 400},
     "no measured point of kvzip on tiny has <= 400 B/token: the smallest is kvzip, ratio 0.0625"),
    ({"max_nll_loss": 0.01}, "NLL loss <= 0.01 nats"),
    ({"target_bytes": "1000", "max_nll_loss": 0.1}, "<= 1,000 B/token and NLL loss <= 0.1 nats"),
    ({"target_bytes": "a lot"}, "bytes per document token (900) or a fraction"),
    ({"target_bytes": "-0.02x"}, "must be a positive, finite number"),
    ({"target_bytes": "inf"}, "must be a positive, finite number, got 'inf'"),
    ({"max_nll_loss": -1.0}, ">= 0"),
    ({}, "give target bytes or a maximum NLL loss"),
    ({"target_bytes": 900, "scorer": "kvzip-fast"}, "measured no kvzip-fast"),
])
def test_no_point_or_a_bad_bound_is_a_clear_error(bounds, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        choose(CURVE, **bounds)


def test_bounds_exclude_ratio_and_kv_bits_and_a_model_without_curve_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path))
    model = SimpleNamespace(name="tiny", fingerprint="nofingerprint")
    assert pick_budget(model, target_bytes=None, max_nll_loss=None, scorer="kvzip", ratio=0.2, kv_bits=4) == \
        (0.2, 4, "kvzip", None)
    with pytest.raises(InvalidArgumentError, match="drop ratio"):
        pick_budget(model, target_bytes="0.02x", max_nll_loss=None, scorer="kvzip", ratio=0.2, kv_bits=None)
    with pytest.raises(InvalidArgumentError, match="no compression curve for model tiny .*kvzip-rag bench --full "
                                                   "--task fidelity --write-curve"):
        find_curve(model)


def test_curve_from_fidelity_keeps_kvzip_methods_with_bytes_and_intervals(tmp_path):
    def entry(size, loss, high, n=30):
        return {"blob_bytes_per_token": size, "nll_minus_full": loss, "nll_minus_full_ci": [loss - 0.1, high], "n": n}

    table = {"full": {"nll": 3.0, "n": 30, "blob_bytes_per_token": 40000}, "kvzip-pair-int4@0.125": entry(1100, 0.0, 0.1),
             "kvzip-structure-k4v2@0.0625": entry(490, 0.2, 0.3), "kvzip-fast@0.3": entry(14000, -0.1, 0.0),
             "snapkv@0.125": entry(5000, 1.0, 1.2), "kvzip-head@0.3": entry(14000, 0.5, 0.6)}
    curve = curve_from_fidelity(table, "tiny", "abc", 20000, {"questions": 30})
    got = {(p.scorer, p.level, p.ratio, p.kv_bits): (p.bytes_per_token, p.fp16_share, p.nll_loss_high)
           for p in curve.points}
    assert got == {("kvzip", "pair", 0.125, 4): (1100, 0.055, 0.1), ("kvzip-structure", "pair", 0.0625, 3): (490, 0.0245, 0.3),
                   ("kvzip-fast", "pair", 0.3, 16): (14000, 0.7, 0.0)}
    assert Curve.load(curve.save(tmp_path / "c.json")) == curve
    assert plot_curve(curve, tmp_path / "curve.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InvalidArgumentError, match="unreadable"):
        Curve.load(tmp_path / "bad.json")


def test_a_written_curve_joins_the_earlier_one_and_a_point_measured_again_replaces_its_old_value(tmp_path):
    from kvzip_rag.frontier import write_curve, written

    def results(fingerprint, methods):
        table = {m: {"blob_bytes_per_token": size, "nll_minus_full": loss, "n": 30,
                     "nll_minus_full_ci": [loss - 0.1, loss + 0.1]} for m, (size, loss) in methods.items()}
        return {"summary": {"quality": {"fidelity": table}}, "fidelity": {"fp16_bytes_per_token": 20000, "rows": []},
                "meta": {"model": "tiny", "model_fingerprint": fingerprint, "command": f"run {len(methods)}"}}

    path = tmp_path / "curve.json"
    first, _ = write_curve(results("abc", {"kvzip-pair-int4@0.125": (1100, 0.0), "kvzip-pair-k4v2@0.1": (600, 0.05)}),
                           path)
    assert len(first.points) == 2 and "kept" not in first.source and "kept" not in written(first, path)
    second, _ = write_curve(results("abc", {"kvzip-pair-k4v2@0.1": (610, 0.02), "kvzip-pair-k4v2@0.09": (550, 0.08)}),
                            path)
    got = {(p.ratio, p.kv_bits): (p.bytes_per_token, p.nll_loss) for p in Curve.load(path).points}
    assert got == {(0.125, 4): (1100, 0.0), (0.1, 3): (610, 0.02), (0.09, 3): (550, 0.08)}
    assert second.source["command"] == "run 2" and second.source["kept"] == {"points": 1, "source": first.source}
    assert "3 points, 1 of them kept from the earlier curve" in written(second, path)
    other, _ = write_curve(results("xyz", {"kvzip-pair-k4v2@0.08": (500, 0.1)}), path)  # another model: replaced
    assert [(p.ratio, p.kv_bits) for p in Curve.load(path).points] == [(0.08, 3)] and "kept" not in other.source


def test_the_bytes_stored_are_compared_with_the_point_and_a_target_they_exceed_is_explained():
    from kvzip_rag.frontier import stored_against_point

    chosen = point(0.125, 3, 900, 0.0, 0.05)  # 900 B/token, 0.09x of FP16

    def cache(nbytes, ratio=0.125, kv_bits=3, scorer="kvzip"):
        return SimpleNamespace(nbytes=nbytes, context_length=100, ratio=ratio, kv_bits=kv_bits, scorer=scorer)

    documents = [SimpleNamespace(caches=[cache(95_000), cache(10**6, ratio=0.3)]), None,  # None: not stored
                 SimpleNamespace(caches=[cache(100_000), cache(10**6, kv_bits=4), cache(10**6, scorer="kvzip-fast")])]
    line, above = stored_against_point(documents, chosen)
    assert line.startswith("stored 975 B/token (0.098x the fp16 cache) over 2 segment(s)") and "900 B/token" in line
    assert not above and "above the target" not in line
    assert not stored_against_point(documents, chosen, "1000")[1]
    line, above = stored_against_point(documents, chosen, "0.095x")
    assert above and "above the target of 950 B/token: every blob has a fixed cost" in line
    assert stored_against_point([None], chosen) == ("no cache was stored at the chosen ratio and kv_bits", False)


def test_cli_round_trip_bench_writes_the_curve_index_reads_it(tiny_llama, tiny_data, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from kvzip_rag.cli.app import app
    from kvzip_rag.store import CacheStore

    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(model_dir)
    tiny_llama.tokenizer.save_pretrained(model_dir)
    (tmp_path / "doc.txt").write_text("The harbour of Velmora was built in 1731 by the engineer Ansel Brask. " * 3)
    store = ["--store", str(tmp_path / "store"), "--model", str(model_dir)]
    missing = CliRunner().invoke(app, [*store, "index", str(tmp_path / "doc.txt"), "--target-bytes", "0.1x"])
    assert missing.exit_code == 1 and "no compression curve" in missing.output

    sets = ["fidelity_questions=4", "fidelity_f1_questions=0", "fidelity_min_tokens=100", "fidelity_max_tokens=400",
            "fidelity_ratios=(0.3, 0.125)", 'levels=("pair",)', 'fidelity_baselines=()',
            "fidelity_calibration_tokens=120", "fidelity_calibration_segments=4", "fidelity_bits=(16, 4)"]
    bench = CliRunner().invoke(app, ["bench", "--task", "fidelity", "--write-curve", "--model", str(model_dir),
                                     "--data", str(tiny_data), "--out", str(tmp_path / "out"),
                                     *[x for s in sets for x in ("--set", s)]])
    assert bench.exit_code == 0, bench.output
    assert "compression curve of" in bench.output
    assert (tmp_path / "out" / "fidelity_curve.png").stat().st_size > 0
    curve = find_curve(tiny_llama)
    assert {(p.ratio, p.kv_bits) for p in curve.points if p.scorer == "kvzip"} == {(0.3, 16), (0.3, 4), (0.125, 16),
                                                                                  (0.125, 4)}

    budget = sorted(p.bytes_per_token for p in curve.points if p.scorer == "kvzip")[1]  # the second smallest
    expected = choose(curve, target_bytes=budget, scorer=None)  # no --scorer: the curve chooses it too
    result = CliRunner().invoke(app, [*store, "index", str(tmp_path / "doc.txt"), "--target-bytes", str(budget)])
    assert result.exit_code == 0, result.output
    assert f"{expected.scorer}, ratio {expected.ratio:g}, kv_bits {expected.kv_bits}" in result.output
    [cache] = CacheStore(tmp_path / "store").get_document("doc.txt").caches
    assert (cache.ratio, cache.kv_bits, cache.scorer) == (expected.ratio, expected.kv_bits, expected.scorer)
    given = CliRunner().invoke(app, [*store, "index", str(tmp_path / "doc.txt"), "--force", "--target-bytes",
                                     str(budget), "--scorer", "kvzip"])
    assert given.exit_code == 0, given.output
    caches = CacheStore(tmp_path / "store").get_document("doc.txt").caches
    mine = choose(curve, target_bytes=budget, scorer="kvzip")
    assert (mine.ratio, mine.kv_bits, "kvzip") in {(c.ratio, c.kv_bits, c.scorer) for c in caches}
    said = " ".join(result.output.split())  # rich wraps long notes
    assert f"stored {cache.nbytes / cache.context_length:,.0f} B/token" in said and "over 1 segment(s)" in said

    shown = CliRunner().invoke(app, [*store, "inspect", "doc.txt", "--out", str(tmp_path / "inspect")])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "inspect" / "doc.txt.curve.png").stat().st_size > 0 and expected.describe()[:30] in shown.output
    none = CliRunner().invoke(app, [*store, "index", str(tmp_path / "doc.txt"), "--target-bytes", "1"])
    assert none.exit_code == 1 and "no measured point of any scorer" in " ".join(none.output.split())
    both = CliRunner().invoke(app, [*store, "index", str(tmp_path / "doc.txt"), "--max-nll-loss", "5", "--kv-bits", "4"])
    assert both.exit_code == 1 and "drop kv_bits" in both.output
    stored = json.loads(next((tmp_path / "cache" / "curves").glob("*.json")).read_text())
    assert stored["fingerprint"] == tiny_llama.fingerprint and stored["source"]["questions"] == 4


# ------------------------------------------------------------------ the options in every interface that builds a store

TEXTS = {"harbour": "The harbour of Velmora was built in 1731 by the engineer Ansel Brask, who drowned there.",
         "museum": "The museum of Velmora displays whale bones, old ship models and the engineer's drawings."}


def tiny_curve(model, tmp_path, monkeypatch) -> Curve:
    """A curve for ``model`` where the user's curves live (as bench --write-curve writes it)."""
    from kvzip_rag.frontier import curve_path

    monkeypatch.setenv("KVZIP_RAG_CACHE", str(tmp_path / "cache"))
    curve = Curve(model.name, model.fingerprint, FP16, CURVE.points, {})
    curve.save(curve_path(model.fingerprint))
    return curve


def caches_of(store, doc_ids) -> set[tuple]:
    return {(c.ratio, c.kv_bits, c.scorer) for d in doc_ids for c in store.get_document(d).caches}


def test_llamaindex_takes_scorer_and_bits_and_chooses_from_the_curve(tiny_llama, tmp_path, monkeypatch, caplog):
    from llama_index.core import Document

    from kvzip_rag import KVzipIndex

    docs = [Document(text=text, doc_id=name) for name, text in TEXTS.items()]
    index = KVzipIndex.from_documents(docs, model=tiny_llama, store=tmp_path / "a", scorer="kvzip-structure",
                                      kv_bits=3)
    assert index.scorer == "kvzip-structure" and caches_of(index.store, TEXTS) == {(0.3, 3, "kvzip-structure")}
    index.persist(tmp_path / "persisted")
    again = KVzipIndex.load(tmp_path / "persisted", model=tiny_llama)
    again.insert(Document(text="The lighthouse was lit in 1802.", doc_id="lighthouse"))
    assert caches_of(again.store, ["lighthouse"]) == {(0.3, 3, "kvzip-structure")}
    with pytest.raises(InvalidArgumentError, match="unknown scorer 'nope'"):
        KVzipIndex.from_documents(docs, model=tiny_llama, store=tmp_path / "b", scorer="nope")

    curve = tiny_curve(tiny_llama, tmp_path, monkeypatch)
    chosen = choose(curve, max_nll_loss=0.1, scorer="kvzip-structure")
    with caplog.at_level(logging.INFO, logger="kvzip_rag"):
        index = KVzipIndex.from_documents(docs, model=tiny_llama, store=tmp_path / "c", scorer="kvzip-structure",
                                          max_nll_loss=0.1)
    assert (index.ratio, index.kv_bits) == (chosen.ratio, chosen.kv_bits) == (0.125, 3)
    assert caches_of(index.store, TEXTS) == {(0.125, 3, "kvzip-structure")}
    chosen = choose(curve, max_nll_loss=0.1, scorer="kvzip")  # the scorer given: its own points only
    index = KVzipIndex.from_documents(docs, model=tiny_llama, store=tmp_path / "e", scorer="kvzip", max_nll_loss=0.1)
    assert caches_of(index.store, TEXTS) == {(chosen.ratio, chosen.kv_bits, "kvzip")} == {(0.125, 4, "kvzip")}
    index = KVzipIndex.from_documents(docs, model=tiny_llama, store=tmp_path / "f", max_nll_loss=0.1)  # no scorer
    assert index.scorer == "kvzip-structure" and caches_of(index.store, TEXTS) == {(0.125, 3, "kvzip-structure")}
    [said] = [r for r in caplog.records if r.getMessage().startswith("stored ")]
    assert said.levelno == logging.INFO and "over 2 segment(s); the curve's point: 900 B/token" in said.getMessage()
    with pytest.raises(InvalidArgumentError, match="drop ratio"):
        KVzipIndex.from_documents(docs, model=tiny_llama, store=tmp_path / "d", target_bytes="0.1x", ratio=0.2)


def test_langchain_from_texts_takes_scorer_and_bits_and_chooses_from_the_curve(tiny_llama, tmp_path, monkeypatch,
                                                                               caplog):
    from kvzip_rag.errors import EmptyDocumentError
    from kvzip_rag.integrations.langchain import KVzipRetriever

    retriever = KVzipRetriever.from_texts(list(TEXTS.values()), [{"topic": n} for n in TEXTS], ids=list(TEXTS),
                                          store=tmp_path / "a", model=tiny_llama, scorer="kvzip-structure",
                                          kv_bits=4, k=1)
    assert caches_of(retriever.qa.store, TEXTS) == {(0.3, 4, "kvzip-structure")}
    [doc] = retriever.invoke("Who built the harbour?")
    assert doc.metadata["doc_id"] == "harbour" and doc.metadata["topic"] == "harbour" and doc.metadata["kv_bits"] == 4

    tiny_curve(tiny_llama, tmp_path, monkeypatch)
    with caplog.at_level(logging.INFO, logger="kvzip_rag"):
        retriever = KVzipRetriever.from_texts(list(TEXTS.values()), ids=list(TEXTS), store=tmp_path / "b",
                                              model=tiny_llama, target_bytes=1000)  # no scorer: the curve's
    assert caches_of(retriever.qa.store, TEXTS) == {(0.125, 3, "kvzip-structure")}
    [said] = [r for r in caplog.records if r.getMessage().startswith("stored ")]
    assert said.levelno == logging.INFO and "over 2 segment(s); the curve's point: 900 B/token" in said.getMessage()
    mine = KVzipRetriever.from_texts(list(TEXTS.values()), ids=list(TEXTS), store=tmp_path / "f", model=tiny_llama,
                                     target_bytes=1000, scorer="kvzip")
    assert caches_of(mine.qa.store, TEXTS) == {(0.125, 3, "kvzip")}
    from kvzip_rag.frontier import curve_path  # a point smaller than the tiny model's blobs: stored above the target

    Curve(tiny_llama.name, tiny_llama.fingerprint, FP16, (point(0.125, 3, 50, 0.0, 0.05),), {}).save(
        curve_path(tiny_llama.fingerprint))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kvzip_rag"):
        KVzipRetriever.from_texts(list(TEXTS.values()), ids=list(TEXTS), store=tmp_path / "e", model=tiny_llama,
                                  target_bytes=60)
    [said] = [r for r in caplog.records if r.getMessage().startswith("stored ")]
    assert said.levelno == logging.WARNING and "above the target of 60 B/token" in said.getMessage()
    assert retriever.invoke("Who built the harbour?")[0].metadata["ratio"] == 0.125
    with pytest.raises(InvalidArgumentError, match="unknown scorer"):
        KVzipRetriever.from_texts(["text"], store=tmp_path / "c", model=tiny_llama, scorer="nope")
    with pytest.raises(InvalidArgumentError, match="2 texts, 1 metadatas"):
        KVzipRetriever.from_texts(["a", "b"], [{}], store=tmp_path / "c", model=tiny_llama)
    with pytest.raises(EmptyDocumentError):
        KVzipRetriever.from_texts(["a", " "], store=tmp_path / "c", model=tiny_llama)
    with pytest.raises(InvalidArgumentError, match="no measured point"):
        KVzipRetriever.from_texts(["a"], store=tmp_path / "c", model=tiny_llama, target_bytes=10)
    assert not has_documents(tmp_path / "c")


def has_documents(folder) -> bool:
    from kvzip_rag.store import CacheStore

    return bool(folder.exists() and CacheStore(folder).list_documents())


def test_shipped_curve_bytes_are_what_the_writer_stores_now(default_model):
    """The default model's shipped curve states the bytes a blob written today takes (a format or codec change must
    come with a new curve): a SQuAD document of the curve's data compressed and stored at each of its KVzip pair
    points at ratio 0.125 and below, within 3% per token (the documents' lengths differ, the header is per blob)."""
    from pathlib import Path

    import kvzip_rag
    from conftest import DATA_DIR
    from kvzip_rag.bench.data import load_squad
    from kvzip_rag.bench.fidelity import stored
    from kvzip_rag.frontier import PACKAGED

    if not (DATA_DIR / "squad").is_dir():
        pytest.skip(f"SQuAD data not found at {DATA_DIR}")
    curve = Curve.load(PACKAGED / f"{default_model.fingerprint}.json")
    points = [p for p in curve.points if p.scorer == "kvzip" and p.level == "pair" and p.ratio <= 0.125]
    assert {p.kv_bits for p in points} >= {4, 3}
    count = lambda text: len(default_model.tokenizer(text)["input_ids"])  # noqa: E731
    doc = load_squad(Path(DATA_DIR), count, 1, 500, 900, 1)[0]
    cache = kvzip_rag.compress(default_model, doc.text, ratio=max(p.ratio for p in points))
    for p in points:
        _, blob_bytes, _ = stored(cache.at_ratio(p.ratio), p.kv_bits)
        assert blob_bytes / cache.info.context_length == pytest.approx(p.bytes_per_token, rel=0.03), p
