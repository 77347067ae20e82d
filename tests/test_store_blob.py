"""The blob format: exact round trip, partial loads at lower ratios, and corruption caught before torch sees it."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import save_file

import kvzip_rag
from kvzip_rag.errors import CorruptBlobError, InvalidArgumentError, ModelMismatchError
from kvzip_rag.store.blob import FORMAT, ReadStats
from kvzip_rag.store.cachefile import read_cache, read_cache_header, verify_cache, write_cache

from conftest import build_tiny
from test_store_guarantees import logits, same_layers

TEXT = " ".join(
    [
        "The harbour of Velmora was built in 1731 by the engineer Ansel Brask.",
        "It has two breakwaters, the northern one made of granite and the southern one of basalt.",
        "Ferries leave for the island of Tessin every morning at seven.",
        "The lighthouse at the end of the northern breakwater is painted red and white.",
        "Every August the town holds a regatta in which fishing boats race around the harbour.",
    ]
    * 8
)


def assert_same_cache(a: kvzip_rag.PackedCache, b: kvzip_rag.PackedCache) -> None:
    assert a.info == b.info
    same_layers(a, b)
    assert all(y.tail_length == 0 for y in b.layers)


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: sliding-window layers stored uncompressed
def test_round_trip_reproduces_the_in_memory_cache(family, smol_tokenizer, tmp_path):
    model = build_tiny(family, smol_tokenizer)
    cache = kvzip_rag.compress(model, TEXT, ratio=0.4)
    result = write_cache(cache, tmp_path / "c.safetensors")
    assert result.nbytes == (tmp_path / "c.safetensors").stat().st_size
    loaded = read_cache(tmp_path / "c.safetensors")
    loaded.info.check_model(model)
    assert_same_cache(cache, loaded)
    assert torch.equal(logits(model, cache, "Who built the harbour?"), logits(model, loaded, "Who built the harbour?"))
    assert kvzip_rag.answer(model, loaded, "Who built it?", max_new_tokens=6).token_ids == \
        kvzip_rag.answer(model, cache, "Who built it?", max_new_tokens=6).token_ids
    header = read_cache_header(tmp_path / "c.safetensors")
    assert header.metadata["format"] == FORMAT
    assert set(header.versions) == {"torch", "transformers", "kvzip_rag"}
    assert header.compressed == tuple(layer.compressed for layer in cache.layers)
    assert header.dtype == "float32"


def test_bfloat16_round_trip(tiny_llama, tmp_path):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.to(torch.bfloat16), layer.values.to(torch.bfloat16)
    write_cache(cache, tmp_path / "c.safetensors")
    loaded = read_cache(tmp_path / "c.safetensors")
    assert_same_cache(cache, loaded)
    assert read_cache_header(tmp_path / "c.safetensors").dtype == "bfloat16"


@pytest.mark.parametrize("level", ["pair", "uniform", "head"])
def test_lower_ratio_reads_only_the_kept_prefix(level, tiny_llama, tmp_path):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.8, level=level)
    path = tmp_path / "c.safetensors"
    write_cache(cache, path)
    full = ReadStats()
    assert_same_cache(cache, read_cache(path, stats=full))
    previous = full.nbytes
    for ratio in (0.5, 0.2, 0.05):
        stats = ReadStats()
        loaded = read_cache(path, ratio=ratio, stats=stats)
        assert_same_cache(cache.at_ratio(ratio), loaded)
        # Compressing at that ratio directly keeps exactly the same entries (same scores, no re-scoring).
        direct = kvzip_rag.compress(tiny_llama, TEXT, ratio=ratio, level=level)
        for a, b in zip(loaded.layers, direct.layers):
            assert torch.equal(a.offsets, b.offsets) and torch.equal(a.positions, b.positions)
            assert torch.equal(a.keys, b.keys)
        if level != "head":  # head level keeps whole heads: fewer bytes only at the head granularity
            assert stats.nbytes < previous, (ratio, stats.nbytes, previous)
        else:
            assert stats.nbytes <= previous
        previous = stats.nbytes
    print(f"\n{level}: bytes read at 0.8 {full.nbytes}, at 0.05 {previous} (file {path.stat().st_size})")


def test_level_change_only_from_ratio_one(tiny_llama, tmp_path):
    full = kvzip_rag.compress(tiny_llama, TEXT, ratio=1.0)
    write_cache(full, tmp_path / "full.safetensors")
    derived = read_cache(tmp_path / "full.safetensors", ratio=0.3, level="uniform")
    assert_same_cache(full.at_ratio(0.3, "uniform"), derived)
    with pytest.raises(InvalidArgumentError, match="head"):
        read_cache(tmp_path / "full.safetensors", ratio=0.3, level="head")
    part = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    write_cache(part, tmp_path / "part.safetensors")
    with pytest.raises(InvalidArgumentError, match="ratio 0.5"):
        read_cache(tmp_path / "part.safetensors", ratio=0.3, level="uniform")
    with pytest.raises(InvalidArgumentError, match="up to"):
        read_cache(tmp_path / "part.safetensors", ratio=0.7)


def test_blob_of_another_model_or_template_is_refused(tiny_llama, smol_tokenizer, tmp_path):
    other = build_tiny("llama", smol_tokenizer, seed=1)
    write_cache(kvzip_rag.compress(other, TEXT, ratio=0.3), tmp_path / "c.safetensors")
    with pytest.raises(ModelMismatchError, match="fingerprint"):
        read_cache(tmp_path / "c.safetensors").info.check_model(tiny_llama, "document 'x' segment 0")
    from dataclasses import replace

    retemplated = replace(other, template=replace(other.template, question_lead="\nQ: "))
    with pytest.raises(ModelMismatchError, match="template"):
        read_cache(tmp_path / "c.safetensors").info.check_model(retemplated)


def _flip(path, position: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_every_sampled_bit_flip_is_caught(tiny_llama, tmp_path):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    path = tmp_path / "c.safetensors"
    original = write_cache(cache, path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    rng = random.Random(0)
    positions = list(range(8)) + rng.sample(range(8, header_end), 60) + rng.sample(range(header_end, len(data)), 60)
    for position in positions:
        path.write_bytes(data)
        _flip(path, position, rng.randrange(8))
        with pytest.raises(CorruptBlobError, match="document 'doc-7'") as caught:
            read_cache(path, label="document 'doc-7' segment 0")
        assert "blob c.safetensors" in str(caught.value)
        with pytest.raises(CorruptBlobError):
            verify_cache(path, label="document 'doc-7' segment 0")
    path.write_bytes(data)
    assert verify_cache(path).info.ratio == 0.5 and original.blob.payload_sha256 in data.decode("latin-1")


def test_truncated_blobs_are_caught(tiny_llama, tmp_path):
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    path = tmp_path / "c.safetensors"
    write_cache(cache, path)
    data = path.read_bytes()
    for length in (0, 3, 8, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:length])
        with pytest.raises(CorruptBlobError, match="document 'manual'"):
            read_cache(path, label="document 'manual' segment 2")
    path.unlink()
    with pytest.raises(CorruptBlobError, match="missing"):
        read_cache(path, label="document 'manual' segment 2")


def test_foreign_files_are_refused(tmp_path):
    save_file({"weight": torch.zeros(3, 3)}, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptBlobError, match="not a kvzip-rag blob"):
        read_cache(tmp_path / "model.safetensors")
    save_file({"weight": torch.zeros(3)}, tmp_path / "future.safetensors", metadata={"format": "kvzip-rag/9"})
    with pytest.raises(CorruptBlobError, match="kvzip-rag/9"):
        read_cache(tmp_path / "future.safetensors")
    (tmp_path / "random.bin").write_bytes(random.Random(1).randbytes(5000))
    with pytest.raises(CorruptBlobError):
        read_cache(tmp_path / "random.bin")
    (tmp_path / "json.bin").write_bytes(json.dumps({"a": 1}).encode())
    with pytest.raises(CorruptBlobError):
        read_cache(tmp_path / "json.bin")


def test_header_that_lies_consistently_is_caught(tiny_llama, tmp_path):
    """An edited header (valid JSON, digest not updated) is refused: the header carries its own checksum."""
    cache = kvzip_rag.compress(tiny_llama, TEXT, ratio=0.5)
    path = tmp_path / "c.safetensors"
    write_cache(cache, path)
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"]["ratio"] = "0.9"
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(CorruptBlobError, match="header checksum"):
        read_cache(path)


def test_no_pickle_in_the_store_package():
    from pathlib import Path

    import kvzip_rag.store

    for source in Path(kvzip_rag.store.__file__).parent.glob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "torch.load" not in text, source
