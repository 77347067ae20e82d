"""One compressed cache = one self-describing safetensors file.

Layout (all header values are strings, as safetensors requires)::

    __metadata__  format "kvzip-rag/1", model name + fingerprint, template digest, prefix/context lengths, ratio,
                  level, scorer, dtype, full_nbytes, library versions, per-layer compressed / sliding_window flags,
                  block checksums of every tensor, the sha256 of the whole tensor payload and a sha256 of the header
    k.{l}, v.{l}  (N, head_dim) keys / values of layer l, head after head, each head best entry first
    pos.{l}       int32 original positions      score.{l}  float32 scores      off.{l}  int64 head offsets
    input_ids     int32 prefix + context token ids

Because every head's entries are in descending-importance order, the cache at any lower ratio is a prefix of each
head's rows: :func:`read_blob` with ``ratio=r'`` reads the (small) score tensors fully, allocates the same budgets
``PackedCache.at_ratio`` would, and reads only those row prefixes of ``k``/``v`` through ``get_slice``.

Integrity is checked on what is read: ``k``/``v`` carry one digest per block of ``BLOCK_ROWS`` rows inside each head
(so a partial read verifies only the blocks it touched, at most one partial block per head more than it needs),
the small tensors one digest each, and the header its own digest. :func:`verify_blob` checks everything, including
the sha256 of the full payload. No pickle is involved anywhere: safetensors holds raw tensors and JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from kvzip_rag.budget import allocate_budgets, check_ratio_level
from kvzip_rag.cache import CacheInfo, PackedCache, PackedLayer
from kvzip_rag.errors import CorruptBlobError, InvalidArgumentError

FORMAT = "kvzip-rag/1"
BLOCK_ROWS = 128  # rows of k/v per checksum block inside a head
_DIGEST_HEX = 32  # 128-bit truncated sha256 per block: detection of corruption, not a signature

_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}


@dataclass
class ReadStats:
    """What a read cost: bytes materialised from the file (header included) and tensors touched."""

    nbytes: int = 0
    header_nbytes: int = 0
    tensors: int = 0


@dataclass(frozen=True)
class BlobHeader:
    """The parsed ``__metadata__`` of a blob, with the tensor table."""

    info: CacheInfo  # input_ids left empty: they are a tensor
    dtype: str
    num_layers: int
    compressed: tuple[bool, ...]
    sliding_window: tuple[int | None, ...]
    versions: dict[str, str]
    created: str
    payload_sha256: str
    checksums: dict[str, list] = field(repr=False)
    block_rows: int = BLOCK_ROWS
    header_nbytes: int = 0
    metadata: dict[str, str] = field(repr=False, default_factory=dict)


@dataclass(frozen=True)
class BlobWriteResult:
    path: Path
    nbytes: int  # size of the file
    sha256: str  # of the whole file
    kv_nbytes: int  # bytes of the keys and values inside


def _describe(label: str | None, path: Path) -> str:
    return f"{label} (blob {path.name})" if label else f"blob {path}"


def _digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()[:_DIGEST_HEX]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _head_blocks(offsets: list[int], block_rows: int) -> list[list[tuple[int, int]]]:
    """Row ranges of every checksum block, per head."""
    blocks = []
    for start, stop in zip(offsets[:-1], offsets[1:]):
        blocks.append([(s, min(s + block_rows, stop)) for s in range(start, stop, block_rows)])
    return blocks


def _header_digest(metadata: dict[str, str], table: dict[str, tuple[str, list[int]]]) -> str:
    body = {k: v for k, v in metadata.items() if k != "header_sha256"}
    text = json.dumps({"metadata": body, "tensors": table}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _versions() -> dict[str, str]:
    import transformers

    import kvzip_rag

    return {"torch": torch.__version__, "transformers": transformers.__version__, "kvzip_rag": kvzip_rag.__version__}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def serialize(cache: PackedCache) -> tuple[bytes, int]:
    """The blob's bytes and the bytes of keys and values inside (the cache's tail, if any, is not stored)."""
    info = cache.info
    tensors: dict[str, torch.Tensor] = {}
    checksums: dict[str, list] = {}
    dtypes = {layer.keys.dtype for layer in cache.layers}
    if len(dtypes) != 1:
        raise InvalidArgumentError(
            f"all layers of a cache must share one dtype to be stored, got {sorted(map(str, dtypes))}"
        )
    kv_nbytes = 0
    for index, layer in enumerate(cache.layers):
        offsets = layer.offsets.to(torch.int64).cpu()
        blocks = _head_blocks(offsets.tolist(), BLOCK_ROWS)
        for name, tensor in (("k", layer.keys), ("v", layer.values)):
            tensor = tensor.detach().cpu().contiguous()
            kv_nbytes += tensor.nbytes
            tensors[f"{name}.{index}"] = tensor
            raw = _tensor_bytes(tensor)
            row = tensor.shape[1] * tensor.element_size()
            checksums[f"{name}.{index}"] = [[_digest(raw[a * row : b * row]) for a, b in head] for head in blocks]
        tensors[f"pos.{index}"] = layer.positions.detach().cpu().to(torch.int32).contiguous()
        tensors[f"score.{index}"] = layer.scores.detach().cpu().to(torch.float32).contiguous()
        tensors[f"off.{index}"] = offsets.contiguous()
    tensors["input_ids"] = torch.tensor(list(info.input_ids), dtype=torch.int32)
    for name, tensor in tensors.items():
        if not name.startswith(("k.", "v.")):
            checksums[name] = [[_digest(_tensor_bytes(tensor))]]
    # The payload does not depend on the header: serialise once bare to hash it exactly as it lies in the file.
    bare = st_save(tensors)
    (bare_header,) = struct.unpack("<Q", bare[:8])
    payload_sha256 = hashlib.sha256(memoryview(bare)[8 + bare_header :]).hexdigest()
    del bare
    metadata = {
        "format": FORMAT,
        "model_name": info.model_name,
        "model_fingerprint": info.model_fingerprint,
        "template_digest": info.template_digest,
        "prefix_length": str(info.prefix_length),
        "context_length": str(info.context_length),
        "ratio": repr(float(info.ratio)),
        "level": info.level,
        "scorer": info.scorer,
        "dtype": _dtype_name(dtypes.pop()),
        "full_nbytes": str(info.full_nbytes),
        "num_layers": str(len(cache.layers)),
        "compressed": json.dumps([bool(layer.compressed) for layer in cache.layers]),
        "sliding_window": json.dumps([layer.sliding_window for layer in cache.layers]),
        "versions": json.dumps(_versions(), sort_keys=True),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "block_rows": str(BLOCK_ROWS),
        "checksums": json.dumps(checksums, sort_keys=True, separators=(",", ":")),
        "payload_sha256": payload_sha256,
    }
    table = {name: (_st_dtype(t.dtype), list(t.shape)) for name, t in tensors.items()}
    metadata["header_sha256"] = _header_digest(metadata, table)
    return st_save(tensors, metadata=metadata), kv_nbytes


_ST_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int32: "I32",
    torch.int64: "I64",
}


def _st_dtype(dtype: torch.dtype) -> str:
    return _ST_DTYPES[dtype]


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over ``path``, fsync the directory."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def new_blob_name() -> str:
    """A generated file name: never derived from document ids or metadata."""
    return f"{uuid.uuid4().hex}.safetensors"


def write_blob(cache: PackedCache, path: str | os.PathLike) -> BlobWriteResult:
    """Write ``cache`` to ``path`` atomically; returns its size and sha256."""
    path = Path(path)
    data, kv_nbytes = serialize(cache)
    atomic_write(path, data)
    return BlobWriteResult(path=path, nbytes=len(data), sha256=hashlib.sha256(data).hexdigest(), kv_nbytes=kv_nbytes)


class _Reader:
    """safe_open with every failure turned into a CorruptBlobError that names the document."""

    def __init__(self, path: Path, label: str | None, stats: ReadStats):
        self.path, self.label, self.stats = path, label, stats
        self.where = _describe(label, path)
        if not path.is_file():
            raise CorruptBlobError(f"{self.where} is missing; run CacheStore.verify() / gc() or re-add the document")
        try:
            with path.open("rb") as handle:
                head = handle.read(8)
            if len(head) < 8:
                raise CorruptBlobError(f"{self.where} is truncated ({len(head)} bytes): not a kvzip-rag blob")
            (header_len,) = struct.unpack("<Q", head)
            self.handle = safe_open(str(path), framework="pt")
            self.handle.__enter__()
        except SafetensorError as error:
            raise CorruptBlobError(
                f"{self.where} is not a readable safetensors file (truncated or altered?): {error}"
            ) from None
        except OSError as error:
            raise CorruptBlobError(f"{self.where} cannot be read: {error}") from error
        stats.header_nbytes = 8 + header_len
        stats.nbytes += 8 + header_len

    def close(self) -> None:
        try:
            self.handle.__exit__(None, None, None)
        except Exception:
            pass

    def fail(self, what: str) -> CorruptBlobError:
        return CorruptBlobError(f"{self.where} is corrupted: {what}; delete and re-add the document")

    def slice(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        try:
            handle = self.handle.get_slice(name)
            tensor = handle[start:stop] if start is not None else handle[:]
        except SafetensorError as error:
            raise self.fail(f"tensor {name!r} unreadable ({error})") from None
        except Exception as error:  # a header that lies about shapes can fail deep inside; never leak that
            raise self.fail(f"tensor {name!r} unreadable ({type(error).__name__}: {error})") from None
        self.stats.nbytes += tensor.nbytes
        self.stats.tensors += 1
        return tensor


def _parse_header(reader: _Reader) -> BlobHeader:
    try:
        metadata = reader.handle.metadata() or {}
        names = list(reader.handle.keys())
        table = {}
        for name in names:
            sl = reader.handle.get_slice(name)
            table[name] = (sl.get_dtype(), list(sl.get_shape()))
    except SafetensorError as error:
        raise reader.fail(f"unreadable header ({error})") from None
    fmt = metadata.get("format")
    if fmt != FORMAT:
        if fmt and fmt.startswith("kvzip-rag/"):
            raise CorruptBlobError(
                f"{reader.where} has format {fmt!r}; this kvzip-rag reads {FORMAT!r} (upgrade kvzip-rag or recompress)"
            )
        raise CorruptBlobError(f"{reader.where} is not a kvzip-rag blob (no {FORMAT!r} format tag in its header)")
    if metadata.get("header_sha256") != _header_digest(metadata, table):
        raise reader.fail("header checksum mismatch")
    try:
        num_layers = int(metadata["num_layers"])
        compressed = tuple(bool(x) for x in json.loads(metadata["compressed"]))
        sliding = tuple(None if x is None else int(x) for x in json.loads(metadata["sliding_window"]))
        info = CacheInfo(
            model_name=metadata["model_name"],
            model_fingerprint=metadata["model_fingerprint"],
            template_digest=metadata["template_digest"],
            prefix_length=int(metadata["prefix_length"]),
            context_length=int(metadata["context_length"]),
            ratio=float(metadata["ratio"]),
            level=metadata["level"],
            scorer=metadata["scorer"],
            full_nbytes=int(metadata["full_nbytes"]),
        )
        header = BlobHeader(
            info=info,
            dtype=metadata["dtype"],
            num_layers=num_layers,
            compressed=compressed,
            sliding_window=sliding,
            versions=json.loads(metadata["versions"]),
            created=metadata.get("created", ""),
            payload_sha256=metadata["payload_sha256"],
            checksums=json.loads(metadata["checksums"]),
            block_rows=int(metadata["block_rows"]),
            header_nbytes=reader.stats.header_nbytes,
            metadata=dict(metadata),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise reader.fail(f"incomplete header ({type(error).__name__}: {error})") from None
    expected = {"input_ids"} | {f"{p}.{i}" for i in range(num_layers) for p in ("k", "v", "pos", "score", "off")}
    if set(names) != expected or len(compressed) != num_layers or len(sliding) != num_layers:
        raise reader.fail("its tensors do not match its header")
    if header.dtype not in _DTYPES or header.block_rows < 1:
        raise reader.fail(f"unknown dtype {header.dtype!r}")
    return header


def check_model(header: BlobHeader | CacheInfo, model, where: str) -> None:
    """ModelMismatchError unless ``model`` (a KVzipModel) built this blob with its current prompt template."""
    (header.info if isinstance(header, BlobHeader) else header).check_model(model, where)


def read_blob_header(path: str | os.PathLike, label: str | None = None) -> BlobHeader:
    """Parse and check a blob's header only (reads the first few KiB)."""
    reader = _Reader(Path(path), label, ReadStats())
    try:
        return _parse_header(reader)
    finally:
        reader.close()


def _checked(reader: _Reader, header: BlobHeader, name: str) -> torch.Tensor:
    """A small tensor, read whole and checked against its digest."""
    tensor = reader.slice(name)
    expected = header.checksums.get(name)
    if expected != [[_digest(_tensor_bytes(tensor))]]:
        raise reader.fail(f"checksum mismatch in tensor {name!r}")
    return tensor


def _read_rows(reader: _Reader, header: BlobHeader, name: str, offsets: list[int], keep: list[int]) -> torch.Tensor:
    """The first ``keep[h]`` rows of every head of a k/v tensor, reading whole checksum blocks and checking them."""
    digests = header.checksums.get(name)
    blocks = _head_blocks(offsets, header.block_rows)
    if not isinstance(digests, list) or [len(d) for d in digests] != [len(b) for b in blocks]:
        raise reader.fail(f"checksum table of {name!r} does not match its head offsets")
    pieces = []
    for head, (start, count) in enumerate(zip(offsets[:-1], keep)):
        if count == 0:
            continue
        needed = -(-count // header.block_rows)
        stop = blocks[head][needed - 1][1]
        rows = reader.slice(name, start, stop)
        if rows.shape[0] != stop - start:
            raise reader.fail(f"tensor {name!r} is shorter than its offsets say")
        raw = _tensor_bytes(rows)
        row_bytes = rows.shape[1] * rows.element_size() if rows.dim() == 2 else 0
        for b, (a, z) in enumerate(blocks[head][:needed]):
            if _digest(raw[(a - start) * row_bytes : (z - start) * row_bytes]) != digests[head][b]:
                raise reader.fail(f"checksum mismatch in tensor {name!r} (head {head}, rows {a}-{z})")
        pieces.append(rows[:count])
    if not pieces:
        return reader.slice(name, 0, 0)
    return torch.cat(pieces)


def read_blob(
    path: str | os.PathLike,
    ratio: float | None = None,
    level: str | None = None,
    model=None,
    device: torch.device | str | None = None,
    label: str | None = None,
    stats: ReadStats | None = None,
) -> PackedCache:
    """Load a blob as a ``PackedCache`` (empty tail), at its stored ratio or any lower ``ratio``.

    At ``ratio`` < stored ratio the result equals ``stored.at_ratio(ratio, level)`` exactly, and only the kept row
    prefixes of keys and values are read (see ``stats.nbytes``). A ``level`` other than the stored one is allowed
    only from a blob stored at ratio 1.0 (where every entry is present), and never to or from ``"head"``.
    ``model`` (a KVzipModel), when given, must be the model and template that built the blob
    (``ModelMismatchError`` otherwise). ``label`` names the document in error messages.
    """
    path = Path(path)
    stats = stats if stats is not None else ReadStats()
    reader = _Reader(path, label, stats)
    try:
        header = _parse_header(reader)
        if model is not None:
            check_model(header, model, reader.where)
        stored = header.info
        ratio = stored.ratio if ratio is None else ratio
        level = level or stored.level
        check_ratio_level(ratio, level)
        if ratio > stored.ratio + 1e-12:
            raise InvalidArgumentError(
                f"{reader.where} is stored at ratio {stored.ratio}; it can load at any ratio up to that, not {ratio} "
                "(recompress the document at a higher ratio)"
            )
        if level != stored.level and (stored.ratio < 1.0 or "head" in (level, stored.level)):
            raise InvalidArgumentError(
                f"{reader.where} is stored at level {stored.level!r}, ratio {stored.ratio}; another level can only be "
                "derived from a blob stored at ratio 1.0 (and never to or from 'head'): recompress instead"
            )
        input_ids = _checked(reader, header, "input_ids")
        prefix = stored.prefix_length
        base = stored.prefix_length + stored.context_length
        if input_ids.numel() != base:
            raise reader.fail("input_ids do not match the prefix and context lengths")
        offsets, positions, scores = {}, {}, {}
        for index in range(header.num_layers):
            off = _checked(reader, header, f"off.{index}")
            offsets[index] = off.to(torch.int64)
            positions[index] = _checked(reader, header, f"pos.{index}")
            scores[index] = _checked(reader, header, f"score.{index}")
            counts = off[1:] - off[:-1]
            total = int(off[-1]) if off.numel() else -1
            if off.numel() < 2 or int(off[0]) != 0 or bool((counts < 0).any()) or positions[index].numel() != total \
                    or scores[index].numel() != total:
                raise reader.fail(f"inconsistent head offsets in layer {index}")
            if header.compressed[index] and bool((counts < prefix).any()):
                raise reader.fail(f"layer {index} keeps fewer entries than the never-evicted prefix")
        compressed = [i for i in range(header.num_layers) if header.compressed[i]]
        keep: dict[int, list[int]] = {i: (offsets[i][1:] - offsets[i][:-1]).tolist() for i in range(header.num_layers)}
        if compressed and (ratio < stored.ratio or level != stored.level):
            context_scores = []
            for i in compressed:
                off = offsets[i].tolist()
                context_scores.append([scores[i][a + prefix : z] for a, z in zip(off[:-1], off[1:])])
            budgets = allocate_budgets(context_scores, stored.context_length, ratio, level)
            for row, i in enumerate(compressed):
                keep[i] = (budgets[row] + prefix).tolist()
        layers = []
        for index in range(header.num_layers):
            off = offsets[index].tolist()
            keys = _read_rows(reader, header, f"k.{index}", off, keep[index])
            values = _read_rows(reader, header, f"v.{index}", off, keep[index])
            counts = torch.tensor(keep[index], dtype=torch.int64)
            new_offsets = torch.zeros(len(off), dtype=torch.int64)
            new_offsets[1:] = counts.cumsum(0)
            if keep[index] != [z - a for a, z in zip(off[:-1], off[1:])]:
                index_rows = torch.cat([torch.arange(a, a + k) for a, k in zip(off[:-1], keep[index])])
                pos, sc = positions[index][index_rows], scores[index][index_rows]
            else:
                pos, sc = positions[index], scores[index]
            if keys.dtype != _DTYPES[header.dtype] or keys.shape != values.shape or keys.shape[0] != int(counts.sum()):
                raise reader.fail(f"keys/values of layer {index} do not match the header")
            if device is not None:
                keys, values = keys.to(device), values.to(device)
            layers.append(
                PackedLayer(keys, values, new_offsets, pos, sc, base, header.compressed[index],
                            header.sliding_window[index])
            )
    finally:
        reader.close()
    info = CacheInfo(
        model_name=stored.model_name,
        model_fingerprint=stored.model_fingerprint,
        template_digest=stored.template_digest,
        prefix_length=stored.prefix_length,
        context_length=stored.context_length,
        ratio=float(ratio),
        level=level,
        scorer=stored.scorer,
        full_nbytes=stored.full_nbytes,
        input_ids=tuple(input_ids.tolist()),
    )
    return PackedCache(layers, info)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_blob(path: str | os.PathLike, expected_sha256: str | None = None, label: str | None = None) -> BlobHeader:
    """Check everything: the file's sha256 (when known), the header, the full payload and every block."""
    path = Path(path)
    where = _describe(label, path)
    if not path.is_file():
        raise CorruptBlobError(f"{where} is missing")
    if expected_sha256 is not None and file_sha256(path) != expected_sha256:
        raise CorruptBlobError(f"{where} is corrupted: its sha256 differs from the one recorded when it was written")
    header = read_blob_header(path, label)
    with path.open("rb") as handle:
        handle.seek(header.header_nbytes)
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != header.payload_sha256:
        raise CorruptBlobError(f"{where} is corrupted: payload checksum mismatch")
    read_blob(path, label=label)  # every block digest and the structure
    return header
