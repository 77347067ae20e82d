"""Quantized caches on disk: exact round trip, lower-ratio reads of only the needed groups, integrity, versions."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import kvzip_rag
from kvzip_rag.errors import CorruptBlobError
from kvzip_rag.quant import quantize
from kvzip_rag.store import blob as blob_module
from kvzip_rag.store.backends import LocalBlobs
from kvzip_rag.store.blob import BlobReader, ReadStats, encode_blob, local_reader
from kvzip_rag.store.cachefile import _compact, encode_document, read_cache, read_cache_header, verify_cache, write_cache

from conftest import build_tiny
from test_cli import cli, docs, tiny_model_dir  # noqa: F401 (fixtures)
from test_store_blob import TEXT, assert_same_cache


@pytest.fixture(scope="module")
def caches(smol_tokenizer):
    model = build_tiny("llama", smol_tokenizer)
    return {bits: kvzip_rag.compress(model, TEXT, ratio=0.7, kv_bits=bits) for bits in (16, 8, 4, 3, 2)}


@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_round_trip_equals_the_compressed_cache(bits, caches, tmp_path):
    cache = caches[bits]
    write_cache(cache, tmp_path / "c.safetensors")
    loaded = read_cache(tmp_path / "c.safetensors")
    assert_same_cache(cache, loaded)
    assert loaded.info.kv_bits == bits and loaded.quantized is not None
    assert read_cache_header(tmp_path / "c.safetensors").kv_bits == bits
    verify_cache(tmp_path / "c.safetensors")
    # written again from the loaded cache: the same quantized payload, not a re-quantization
    again = encode_document(loaded, shared_prefix=False)
    assert again.blob.payload_sha256 == encode_document(cache, shared_prefix=False).blob.payload_sha256


def test_bits_shrink_the_blob(caches, tmp_path):
    sizes = {bits: write_cache(cache, tmp_path / f"{bits}.safetensors").kv_nbytes for bits, cache in caches.items()}
    assert sizes[2] < sizes[3] < sizes[4] < sizes[8] < sizes[16] / 2


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("level", ["pair", "uniform"])
def test_lower_ratio_reads_only_the_groups_it_needs(level, bits, smol_tokenizer, tmp_path):
    """A 4-bit blob at ratio 0.7 loaded at r' equals quantizing then cutting in memory (``QuantizedCache.at_ratio``,
    itself equal to cutting the dequantized cache), and reads fewer bytes."""
    model = build_tiny("llama", smol_tokenizer)
    cache = kvzip_rag.compress(model, TEXT, ratio=0.7, level=level, kv_bits=bits)
    write_cache(cache, tmp_path / "c.safetensors")
    whole = ReadStats()
    read_cache(tmp_path / "c.safetensors", stats=whole)
    for ratio in (0.5, 0.2, 0.05):
        stats = ReadStats()
        loaded = read_cache(tmp_path / "c.safetensors", ratio=ratio, stats=stats)
        assert_same_cache(cache.at_ratio(ratio), loaded)
        assert_same_cache(cache.quantized.at_ratio(ratio).dequantize(), loaded)
        assert loaded.quantized is not None and loaded.quantized.info.ratio == ratio
        assert stats.nbytes < whole.nbytes
    assert stats.nbytes < 0.6 * whole.nbytes  # the rest: inline prefix, scores, positions, header


def _offset_of(path, name: str) -> tuple[int, int]:
    reader = local_reader(path)
    _, _, start, stop = reader.tensors[name]
    return reader.data_start + start, reader.data_start + stop


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("name", ["g.0", "g.1", "q.0", "q.1", "score", "pos"])  # g: key scales, q: codes + value scales
def test_corrupted_scales_or_codes_are_caught(name, bits, caches, tmp_path):
    path = tmp_path / "c.safetensors"
    write_cache(caches[bits], path)
    start, stop = _offset_of(path, name)
    data = bytearray(path.read_bytes())
    data[(start + stop) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlobError, match="checksum mismatch"):
        read_cache(path)
    with pytest.raises(CorruptBlobError):
        verify_cache(path)


def _reencode(path, out, **metadata_changes) -> None:
    """A blob with valid checksums whose header says something else (what a buggy or newer writer would make)."""
    reader = local_reader(path)
    tensors = {name: reader.tensor(name) for name in reader.tensors}
    own = ("format", "block_rows", "groups", "checksums", "payload_sha256", "header_sha256")
    metadata = {k: v for k, v in reader.metadata.items() if k not in own}
    metadata.update(metadata_changes)
    out.write_bytes(encode_blob(tensors, metadata, reader.groups).data)


def test_unknown_bit_width_is_refused_clearly(caches, tmp_path):
    write_cache(caches[4], tmp_path / "c.safetensors")
    _reencode(tmp_path / "c.safetensors", tmp_path / "one.safetensors", kv_bits="1")
    with pytest.raises(CorruptBlobError, match="1-bit keys and values.*upgrade kvzip-rag or rebuild"):
        read_cache(tmp_path / "one.safetensors")


def test_k4v2_header_says_the_codec(caches, tmp_path):
    """kv_bits 3 blobs state 4-bit keys and 2-bit values; a header that says otherwise is refused; they are the
    smallest quantized blobs."""
    path = tmp_path / "c.safetensors"
    write_cache(caches[3], path)
    meta = local_reader(path).metadata
    assert (meta["kv_bits"], meta["key_bits"], meta["value_bits"]) == ("3", "4", "2")
    _reencode(path, tmp_path / "lie.safetensors", value_bits="4")
    with pytest.raises(CorruptBlobError, match="4-bit keys and 4-bit values"):
        read_cache(tmp_path / "lie.safetensors")


def test_scales_that_lie_consistently_are_caught(caches, tmp_path):
    """Checksums match, but a scale is negative: refused before anything is dequantized."""
    path = tmp_path / "c.safetensors"
    write_cache(caches[4], path)
    reader = local_reader(path)
    tensors = {name: reader.tensor(name) for name in reader.tensors}
    tensors["g.0"][:, 0] = -tensors["g.0"][:, 0]  # key scales
    own = ("format", "block_rows", "groups", "checksums", "payload_sha256", "header_sha256")
    metadata = {k: v for k, v in reader.metadata.items() if k not in own}
    (tmp_path / "bad.safetensors").write_bytes(encode_blob(tensors, metadata, reader.groups).data)
    with pytest.raises(CorruptBlobError, match="scales must be finite and positive"):
        read_cache(tmp_path / "bad.safetensors")
    _reencode(path, tmp_path / "groups.safetensors", key_group="7")
    with pytest.raises(CorruptBlobError, match="do not match"):
        read_cache(tmp_path / "groups.safetensors")


FIXTURES = Path(__file__).with_name("fixtures")
OLD_BLOBS = sorted(FIXTURES.glob("format3-*.safetensors"))  # written by the format-3 writer (tiny llama, 157 tokens)


def _retag(src: Path, dst: Path, fmt: str) -> None:
    """``src`` with another format tag (its header digest made again): a format-2 blob is a 16-bit format-3 one."""
    data = src.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"]["format"] = fmt
    header["__metadata__"]["header_sha256"] = blob_module._header_digest(header["__metadata__"],
                                                                         blob_module._table(header))
    text = json.dumps(header).encode()
    dst.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


@pytest.mark.parametrize("path", OLD_BLOBS, ids=lambda p: p.stem)
def test_format_3_blobs_load_and_format_4_stores_the_same_cache_in_fewer_bytes(path, tmp_path):
    """A format-3 blob loads (at its ratio and lower); written again now it decodes bit-identically (keys, values,
    positions, scores) and its tensor data is smaller by exactly 2 bytes per position and per input id and 4 per
    head offset (16-bit positions and ids, int32 offsets), its header smaller too (64-bit digests, no per-layer
    small tensors)."""
    old = read_cache(path)
    encoded = write_cache(old, tmp_path / "new.safetensors")
    new = read_cache(tmp_path / "new.safetensors")
    assert_same_cache(old, new)
    assert all(torch.equal(a.positions, b.positions) and a.positions.dtype == b.positions.dtype == torch.int32
               for a, b in zip(old.layers, new.layers))
    for ratio in (0.15, 0.05):
        assert_same_cache(read_cache(path, ratio=ratio), read_cache(tmp_path / "new.safetensors", ratio=ratio))
    before, after = local_reader(path), local_reader(tmp_path / "new.safetensors")
    assert before.metadata["format"] == "kvzip-rag/3" and after.metadata["format"] == blob_module.FORMAT
    entries = sum(before.shape(name)[0] for name in before.tensors if name.startswith("pos."))
    offsets = sum(before.shape(name)[0] for name in before.tensors if name.startswith("off."))
    ids = before.shape("input_ids")[0]
    saved = (before.size - before.data_start) - (after.size - after.data_start)
    assert saved == 2 * entries + 2 * ids + 4 * offsets
    assert after.data_start < before.data_start and encoded.nbytes == after.size


def test_format_2_blobs_still_load_and_format_1_is_refused(caches, tmp_path, monkeypatch):
    sixteen = next(p for p in OLD_BLOBS if p.stem.endswith("-b16"))
    _retag(sixteen, tmp_path / "v2.safetensors", "kvzip-rag/2")
    assert local_reader(tmp_path / "v2.safetensors").metadata["format"] == "kvzip-rag/2"
    assert_same_cache(read_cache(sixteen), read_cache(tmp_path / "v2.safetensors"))
    monkeypatch.setattr(blob_module, "FORMAT", "kvzip-rag/1")
    (tmp_path / "v1.safetensors").write_bytes(encode_document(caches[16], shared_prefix=False).blob.data)
    monkeypatch.undo()
    with pytest.raises(CorruptBlobError, match="rebuild the store"):
        read_cache(tmp_path / "v1.safetensors")


def test_positions_and_ids_are_16_bit_only_when_they_fit():
    assert _compact(torch.tensor([0, 65535])).dtype == torch.uint16
    assert _compact(torch.tensor([0, 65536])).dtype == torch.int32  # a document of 65,537 tokens or more
    assert _compact(torch.tensor([-1, 3])).dtype == torch.int32
    assert torch.equal(_compact(torch.tensor([7, 65536])), torch.tensor([7, 65536], dtype=torch.int32))


def test_quantizing_after_compress_is_what_gets_stored(caches, tmp_path):
    """``quantize(cache).dequantize()`` stores and loads like ``compress(kv_bits=)``."""
    restored = quantize(caches[16], 8).dequantize()
    write_cache(restored, tmp_path / "q.safetensors")
    assert_same_cache(restored, read_cache(tmp_path / "q.safetensors"))
    backend = LocalBlobs(tmp_path)
    assert BlobReader(backend, "q.safetensors").metadata["kv_bits"] == "8"


def test_store_keeps_quantized_caches_and_reports_bits(smol_tokenizer, tmp_path):
    from kvzip_rag.store import CacheStore

    model = build_tiny("llama", smol_tokenizer)
    expected = kvzip_rag.compress(model, TEXT, ratio=0.5, kv_bits=4)
    with CacheStore(tmp_path / "store") as store:
        record = store.add_document(model, TEXT, doc_id="doc", ratio=0.5, kv_bits=4)
        (cache_record,) = record.caches
        assert cache_record.kv_bits == 4
        assert cache_record.kv_nbytes < 0.5 * store.add_document(model, TEXT + " More.", doc_id="plain",
                                                                  ratio=0.5).caches[0].kv_nbytes
        assert cache_record.kept_fraction < 0.2  # 4 bits at ratio 0.5, prefix shared (tiny model, head_dim 16)
        loaded = store.load_cache("doc", model)
        assert loaded.info.kv_bits == 4
        for a, b in zip(expected.layers, loaded.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        low = store.load_cache("doc", model, ratio=0.2)
        for a, b in zip(expected.at_ratio(0.2).layers, low.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        assert store.verify().ok
        # the same ratio/level/scorer with other bits replaces the cache (one per kind and segment)
        again = store.add_document(model, TEXT, doc_id="doc", ratio=0.5, kv_bits=8)
        assert [c.kv_bits for c in again.caches] == [8]
        assert store.load_cache("doc", model).info.kv_bits == 8
        assert store.add_document(model, TEXT, doc_id="doc", ratio=0.5, kv_bits=8).caches == again.caches  # no-op


def test_a_store_from_before_kv_bits_gets_the_column(smol_tokenizer, tmp_path):
    import sqlite3

    from kvzip_rag.store import CacheStore

    model = build_tiny("llama", smol_tokenizer)
    with CacheStore(tmp_path / "store") as store:
        store.add_document(model, TEXT, doc_id="doc", ratio=0.5)
    connection = sqlite3.connect(tmp_path / "store" / "index.sqlite")
    connection.execute("ALTER TABLE caches DROP COLUMN kv_bits")
    connection.commit()
    connection.close()
    with CacheStore(tmp_path / "store") as store:
        assert [c.kv_bits for c in store.get_document("doc").caches] == [16]
        assert store.load_cache("doc", model).info.kv_bits == 16


def test_unknown_kv_bits_are_refused_by_the_store(smol_tokenizer, tmp_path):
    from kvzip_rag.errors import InvalidArgumentError
    from kvzip_rag.store import CacheStore

    model = build_tiny("llama", smol_tokenizer)
    with CacheStore(tmp_path / "store") as store:
        with pytest.raises(InvalidArgumentError, match="kv_bits must be one of 16, 8, 4, 3, 2"):
            store.add_document(model, TEXT, doc_id="doc", kv_bits=1)
        assert len(store) == 0


def test_cli_index_kv_bits_and_ls(cli, docs):
    result = cli("index", str(docs / "harbour.txt"), "--kv-bits", "4")
    assert result.exit_code == 0, result.output
    listing = cli("ls")
    assert listing.exit_code == 0 and "bits" in listing.stdout
    row = next(line for line in listing.stdout.splitlines() if "harbour.txt" in line)
    assert "0.3 pair" in row and " 4 " in row
    answer = cli("ask", "Who built the harbour of Velmora?", "--max-tokens", "4", "--ratio", "0.2")
    assert answer.exit_code == 0, answer.output
    refused = cli("index", str(docs / "harbour.txt"), "--kv-bits", "1")
    assert refused.exit_code != 0 and "--kv-bits takes 16, 8, 4, 3 or 2" in refused.output
