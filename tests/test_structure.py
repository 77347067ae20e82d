"""kvzip-structure: structure tokens demoted before the top-k (issue #25, item 2)."""

from __future__ import annotations

import pytest
import torch

import kvzip_rag
from kvzip_rag.errors import InvalidArgumentError
from kvzip_rag.scorers import SCORERS, StructureAwareScorer
from kvzip_rag.scorers.structure import is_structure, structure_mask

TEXT = ("The bridge, built in 1821 by Ada Lovelace's cousin, spans the river; it was rebuilt (twice) after floods. "
        "Locals call it \"the old crossing\" - and, in winter, they skate beneath it!\n\n" * 3)


def kept_structure_share(model, cache) -> float:
    """Share of kept context entries (compressed layers, all heads) whose token is structure."""
    mask = structure_mask(model.tokenizer, list(cache.info.input_ids[cache.info.prefix_length:]))
    prefix = cache.info.prefix_length
    kept = torch.cat([layer.positions[layer.positions >= prefix] - prefix for layer in cache.layers if layer.compressed])
    return float(mask[kept].float().mean())


def test_is_structure():
    assert is_structure(",") and is_structure(" ") and is_structure("\n\n") and is_structure(" (") and is_structure("")
    assert not is_structure(" bridge") and not is_structure("1821") and not is_structure("'s")


def test_registered_as_a_scorer():
    assert SCORERS["kvzip-structure"] is StructureAwareScorer


def test_factor_one_is_plain_kvzip(tiny_llama):
    plain = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, scorer="kvzip")
    same = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, scorer=StructureAwareScorer(factor=1.0))
    for a, b in zip(plain.layers, same.layers):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.offsets, b.offsets)
        assert torch.equal(a.keys, b.keys)


def test_demotion_keeps_fewer_structure_tokens(tiny_llama):
    plain = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, scorer="kvzip")
    demoted = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, scorer=StructureAwareScorer(factor=0.1))
    assert demoted.info.scorer == "kvzip-structure"
    assert kept_structure_share(tiny_llama, demoted) < kept_structure_share(tiny_llama, plain)


@pytest.mark.parametrize("factor", [-0.1, 1.5, "0.5", True])
def test_bad_factor_is_refused(factor):
    with pytest.raises(InvalidArgumentError):
        StructureAwareScorer(factor=factor)


def test_head_level_is_refused(tiny_llama):
    with pytest.raises(InvalidArgumentError, match="kvzip-structure"):
        kvzip_rag.compress(tiny_llama, TEXT, ratio=0.2, level="head", scorer="kvzip-structure")


def test_cli_index_takes_the_scorer(tmp_path, tiny_llama):
    from typer.testing import CliRunner

    from kvzip_rag.cli.app import app
    from kvzip_rag.store import CacheStore

    tiny_model_dir = tmp_path / "model"
    tiny_llama.model.save_pretrained(tiny_model_dir)
    tiny_llama.tokenizer.save_pretrained(tiny_model_dir)
    (tmp_path / "bridge.txt").write_text(TEXT)
    store = tmp_path / "store"
    options = ["--store", str(store), "--model", str(tiny_model_dir)]
    result = CliRunner().invoke(app, [*options, "index", str(tmp_path / "bridge.txt"), "--scorer", "kvzip-structure"])
    assert result.exit_code == 0, result.output
    record = CacheStore(store).get_document("bridge.txt")
    assert {c.scorer for c in record.caches} == {"kvzip-structure"}
    bad = CliRunner().invoke(app, [*options, "index", str(tmp_path / "bridge.txt"), "--scorer", "nope"])
    assert bad.exit_code != 0 and "--scorer takes one of" in bad.output
