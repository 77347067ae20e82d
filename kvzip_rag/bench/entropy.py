"""What a lossless zstd stage would save on stored caches (issue #25, item 3), measured before building one.

A blob is read by ranges: a lower-ratio load reads the first checksum blocks (``BLOCK_ROWS`` rows) of every head,
so an entropy stage that keeps partial loads must code each block on its own. This measures, per tensor kind of
real quantized blobs (SQuAD documents, the default model), the bytes raw, zstd-coded whole, and zstd-coded block by
block, with the time to decode a whole blob's blocks::

    python -m kvzip_rag.bench.entropy --docs 6 --out entropy.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

from kvzip_rag.extras import require

KINDS = {"q": "codes + value scales", "g": "key-group scales", "f": "fp keys/values", "pos": "positions",
         "score": "scores", "off": "head offsets", "input_ids": "input ids"}


def blob_sizes(data: bytes, level: int) -> tuple[dict[str, list[int]], float]:
    """Per tensor kind: [raw bytes, zstd whole, zstd per checksum block], and the seconds to decode every block."""
    require("zstandard", "bench", "the zstd measurement")
    import torch
    import zstandard

    from kvzip_rag.store.blob import BLOCK_ROWS, _blocks
    from safetensors.torch import load

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    groups = json.loads(header["groups"])
    coder, decoder = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    frames = []
    for name, tensor in load(data).items():
        raw = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes()
        kind = sizes[name.split(".")[0]]
        kind[0] += len(raw)
        kind[1] += len(coder.compress(raw))
        row = len(raw) // max(tensor.shape[0], 1) if tensor.dim() else len(raw)
        spans = [b for g in _blocks(groups[name], BLOCK_ROWS) for b in g] if name in groups else [(0, 1)]
        for a, z in spans:
            chunk = raw[a * row:z * row] if name in groups else raw
            frame = coder.compress(chunk)
            kind[2] += len(frame)
            frames.append(frame)
    start = time.perf_counter()
    for frame in frames:
        decoder.decompress(frame)
    sizes["header"] = [len(data) - sum(v[0] for v in sizes.values())] * 3
    return dict(sizes), time.perf_counter() - start


def measure(docs: int, ratios: tuple[float, ...], bits: tuple[int, ...], level: int, data_dir: Path | None) -> dict:
    import kvzip_rag
    from kvzip_rag.quant import quantize
    from kvzip_rag.store.cachefile import encode_document

    from .data import default_data_dir, load_squad

    model = kvzip_rag.load_model()
    texts = load_squad(data_dir or default_data_dir(), lambda text: len(model.encode(text)), docs, 500, 900, 1)
    totals: dict[str, dict] = {}
    tokens = 0
    for doc in texts[:docs]:
        top = kvzip_rag.compress(model, doc.text, ratio=max(ratios))
        tokens += top.info.context_length
        for ratio in ratios:
            for b in bits:
                cache = quantize(top.at_ratio(ratio), b).dequantize()
                data = encode_document(cache, shared_prefix=True).blob.data
                sizes, seconds = blob_sizes(data, level)
                entry = totals.setdefault(f"{ratio:g}/kv_bits {b}", {"kinds": defaultdict(lambda: [0, 0, 0]),
                                                                     "decode_s": 0.0, "blobs": 0})
                for kind, v in sizes.items():
                    entry["kinds"][kind] = [x + y for x, y in zip(entry["kinds"][kind], v)]
                entry["decode_s"] += seconds
                entry["blobs"] += 1
    out = {"docs": len(texts[:docs]), "tokens": tokens, "zstd_level": level, "rows": {}}
    for key, entry in totals.items():
        kinds = entry["kinds"]
        raw, whole, blocks = (sum(v[i] for v in kinds.values()) for i in range(3))
        out["rows"][key] = {"bytes_per_token": raw / tokens, "zstd_whole_per_token": whole / tokens,
                            "zstd_blocks_per_token": blocks / tokens, "zstd_whole_saving": 1 - whole / raw,
                            "zstd_blocks_saving": 1 - blocks / raw,
                            "decode_ms_per_blob": 1000 * entry["decode_s"] / entry["blobs"],
                            "kinds": {k: [x / tokens for x in v] for k, v in kinds.items()}}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvzip_rag.bench.entropy", description=__doc__.split("\n")[0])
    parser.add_argument("--docs", type=int, default=6)
    parser.add_argument("--level", type=int, default=3, help="zstd level")
    parser.add_argument("--data", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    result = measure(args.docs, (0.125, 0.0625), (4, 3), args.level, args.data)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    for key, row in result["rows"].items():
        print(f"{key}: {row['bytes_per_token']:.0f} B/token; zstd whole {row['zstd_whole_saving']:+.1%}, per block "
              f"{row['zstd_blocks_saving']:+.1%}; decoding every block {row['decode_ms_per_blob']:.1f} ms/blob")


if __name__ == "__main__":
    main()
