"""Blob bytes: tensors + string metadata in one safetensors file, with checksums, read back by byte ranges.

This module knows nothing about caches, models or ratios: it writes a dict of tensors with a metadata dict and
reads tensors (whole, or the first rows of each row group) back, checking every byte it returns.

Layout: the safetensors format (8-byte header length, JSON header, raw tensor data). The ``__metadata__`` holds the
caller's strings plus ``format``, ``block_rows``, ``checksums`` (one digest per block of ``BLOCK_ROWS`` rows inside
each row group of a grouped tensor, one per other tensor), ``payload_sha256`` (all tensor data) and
``header_sha256`` (everything else in the header). A partial read verifies only the blocks it touched, so the
digests stay per block; each is 64 bits of sha256 (16 hex digits; format 3 and older: 128 bits), which detects
corruption as surely in practice (a damaged block passes with probability 2^-64) for half the header bytes: at
ratio 0.125 the digests were 3.5% of a 4-bit blob.

Bytes move through a :class:`~.backends.BlobBackend` (:mod:`.backends`: byte ranges, atomic writes); the header is
parsed here (safetensors' JSON, no pickle anywhere) so that a read needs only byte ranges.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from kvzip_rag.errors import CorruptBlobError, InvalidArgumentError

from .backends import BlobBackend, LocalBlobs

FORMAT = "kvzip-rag/4"  # 4: 64-bit block digests, unsigned 16-bit tensors (store/cachefile.py: small tensors of all
# layers joined, 16-bit positions); 3: quantized document caches (kv_bits); 2: 3 with 16 bits only
READABLE_FORMATS = ("kvzip-rag/2", "kvzip-rag/3", FORMAT)
BLOCK_ROWS = 32  # rows per checksum block inside a row group; a lower-ratio load reads whole blocks, so this is
# how much each head's ranged read is rounded up (128 made a 0.1 load of a 0.3 2K-token blob read ~44% of it)
_DIGEST_HEX = 16  # 64-bit truncated sha256 per block: detection of corruption, not a signature
_OLD_DIGEST_HEX = 32  # formats 2 and 3
_HEAD_GUESS = 1 << 16  # first read: enough for most headers in one range request
MAX_HEADER = 100 << 20

if TYPE_CHECKING:  # torch only where tensors are read or written: the backends serve ls/rm/gc, which must start fast
    import torch


@cache
def _st_dtypes() -> dict[str, torch.dtype]:
    import torch

    return {
        "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "I32": torch.int32,
        "I64": torch.int64, "U8": torch.uint8, "I8": torch.int8, "U16": torch.uint16,
    }


@dataclass
class ReadStats:
    """What a read cost: bytes materialised from the blob (header included) and tensors touched."""

    nbytes: int = 0
    header_nbytes: int = 0
    tensors: int = 0


# ------------------------------------------------------------------------------------------------------- writing


def _digest(data: bytes | memoryview, length: int = _DIGEST_HEX) -> str:
    return hashlib.sha256(data).hexdigest()[:length]


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _blocks(groups: list[int], block_rows: int) -> list[list[tuple[int, int]]]:
    """Row ranges of every checksum block, per row group (``groups`` are the group offsets)."""
    return [[(s, min(s + block_rows, z)) for s in range(a, z, block_rows)] for a, z in zip(groups[:-1], groups[1:])]


def _header_digest(metadata: dict[str, str], table: dict) -> str:
    body = {k: v for k, v in metadata.items() if k != "header_sha256"}
    text = json.dumps({"metadata": body, "tensors": table}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _table(header: dict) -> dict:
    return {k: [v["dtype"], list(v["shape"])] for k, v in header.items() if k != "__metadata__"}


@dataclass(frozen=True)
class EncodedBlob:
    data: bytes
    sha256: str  # of the whole object
    payload_sha256: str  # of the tensor data: what a row records to bind its blob (cheap to check on load)


def encode_blob(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], groups: dict[str, list[int]] | None = None
) -> EncodedBlob:
    """The bytes of a blob. ``groups[name]`` are row-group offsets of a 2-D tensor (e.g. heads): its rows are
    check-summed in blocks inside each group, so the first rows of every group can be read and checked alone."""
    from safetensors.torch import save as st_save

    groups = groups or {}
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    checksums: dict[str, list] = {}
    for name, tensor in tensors.items():
        raw = _tensor_bytes(tensor)
        if name in groups:
            row = math.prod(tensor.shape[1:]) * tensor.element_size()
            checksums[name] = [[_digest(raw[a * row : b * row]) for a, b in g] for g in _blocks(groups[name], BLOCK_ROWS)]
        else:
            checksums[name] = [[_digest(raw)]]
    bare = st_save(tensors)  # the payload does not depend on the header: hash it exactly as it lies in the file
    (bare_len,) = struct.unpack("<Q", bare[:8])
    payload_sha256 = hashlib.sha256(memoryview(bare)[8 + bare_len :]).hexdigest()
    del bare
    metadata = {
        **{k: str(v) for k, v in metadata.items()},
        "format": FORMAT,
        "block_rows": str(BLOCK_ROWS),
        "groups": json.dumps(groups, sort_keys=True, separators=(",", ":")),
        "checksums": json.dumps(checksums, sort_keys=True, separators=(",", ":")),
        "payload_sha256": payload_sha256,
    }
    table = {name: [_st_name(t.dtype), list(t.shape)] for name, t in tensors.items()}
    metadata["header_sha256"] = _header_digest(metadata, table)
    data = st_save(tensors, metadata=metadata)
    return EncodedBlob(data, hashlib.sha256(data).hexdigest(), payload_sha256)


def _st_name(dtype: torch.dtype) -> str:
    for name, value in _st_dtypes().items():
        if value == dtype:
            return name
    raise InvalidArgumentError(f"tensors of dtype {dtype} cannot be stored")


# ------------------------------------------------------------------------------------------------------- reading


class BlobReader:
    """One blob opened for checked reads. Every failure is a ``CorruptBlobError`` naming ``label``."""

    def __init__(self, backend: BlobBackend, name: str, label: str | None = None, stats: ReadStats | None = None):
        self.backend, self.name = backend, name
        self.stats = stats if stats is not None else ReadStats()
        self.where = f"{label} (blob {Path(name).name})" if label else f"blob {backend.describe(name)}"
        try:
            self.handle = backend.open(name)
            self.size = self.handle.size
            head = self.handle.read(0, min(self.size, _HEAD_GUESS))
        except (FileNotFoundError, NotADirectoryError):
            raise CorruptBlobError(f"{self.where} is missing; run verify() / gc() or re-add the document") from None
        except OSError as error:
            raise CorruptBlobError(f"{self.where} cannot be read: {error}") from error
        if len(head) < 8:
            raise CorruptBlobError(f"{self.where} is truncated ({len(head)} bytes): not a kvzip-rag blob")
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > min(MAX_HEADER, self.size - 8):
            raise CorruptBlobError(f"{self.where} is not a readable blob (truncated or altered: header too long)")
        raw = head[8 : 8 + header_len]
        if len(raw) < header_len:
            raw += self._range(8 + len(raw), header_len - len(raw))
        self.data_start = 8 + header_len
        self.stats.header_nbytes = self.data_start
        self.stats.nbytes += self.data_start
        try:
            header = json.loads(raw)
            if not isinstance(header, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            raise CorruptBlobError(f"{self.where} is not a readable blob (truncated or altered?)") from None
        metadata = header.get("__metadata__") or {}
        fmt = metadata.get("format") if isinstance(metadata, dict) else None
        if fmt not in READABLE_FORMATS:
            if isinstance(fmt, str) and fmt.startswith("kvzip-rag/"):
                raise CorruptBlobError(
                    f"{self.where} has format {fmt!r}; this kvzip-rag reads {' and '.join(READABLE_FORMATS)}: an "
                    "older blob: rebuild the store (index the documents again into a new folder); a newer one: "
                    "upgrade kvzip-rag"
                )
            raise CorruptBlobError(f"{self.where} is not a kvzip-rag blob (no {FORMAT!r} format tag in its header)")
        self.digest_hex = _DIGEST_HEX if fmt == FORMAT else _OLD_DIGEST_HEX
        self.format = fmt
        try:
            table = _table(header)
            if metadata.get("header_sha256") != _header_digest(metadata, table):
                raise self.fail("header checksum mismatch")
            self.metadata: dict[str, str] = dict(metadata)
            self.checksums = json.loads(metadata["checksums"])
            self.groups = {k: [int(x) for x in v] for k, v in json.loads(metadata["groups"]).items()}
            self.block_rows = int(metadata["block_rows"])
            self.payload_sha256 = metadata["payload_sha256"]
            self.tensors: dict[str, tuple[torch.dtype, list[int], int, int]] = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape = _st_dtypes()[entry["dtype"]], [int(x) for x in entry["shape"]]
                a, z = (int(x) for x in entry["data_offsets"])
                if z - a != math.prod(shape) * dtype.itemsize or a < 0 or self.data_start + z > self.size:
                    raise self.fail(f"tensor {name!r} does not fit the file (truncated?)")
                self.tensors[name] = (dtype, shape, a, z)
        except CorruptBlobError:
            raise
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise self.fail(f"incomplete header ({type(error).__name__}: {error})") from None
        if self.block_rows < 1:
            raise self.fail("bad block size")

    def fail(self, what: str) -> CorruptBlobError:
        return CorruptBlobError(f"{self.where} is corrupted: {what}; delete and re-add the document")

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "BlobReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _range(self, start: int, length: int) -> bytes:
        try:
            data = self.handle.read(start, length)
        except OSError as error:
            raise CorruptBlobError(f"{self.where} cannot be read: {error}") from error
        if len(data) != length:
            raise self.fail("shorter than its header says (truncated?)")
        return data

    def _ranges(self, ranges: list[tuple[int, int]]) -> list[bytes]:
        """Several ``(start, length)`` ranges in one call where the backend can (object stores then fetch them
        concurrently and merge neighbours into one request), else one by one."""
        many = getattr(self.handle, "read_ranges", None)
        if many is None:
            return [self._range(start, length) for start, length in ranges]
        try:
            datas = many(ranges)
        except OSError as error:
            raise CorruptBlobError(f"{self.where} cannot be read: {error}") from error
        if [len(d) for d in datas] != [length for _, length in ranges]:
            raise self.fail("shorter than its header says (truncated?)")
        return datas

    def _entry(self, name: str):
        if name not in self.tensors:
            raise self.fail(f"tensor {name!r} is missing")
        return self.tensors[name]

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)[1])

    def _decode(self, data: bytes | bytearray, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """A tensor over ``data`` (a ``bytearray`` is used as it is: the tensor owns it from here)."""
        import torch

        self.stats.nbytes += len(data)
        self.stats.tensors += 1
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data if isinstance(data, bytearray) else bytearray(data), dtype=dtype).reshape(shape)

    def tensor(self, name: str) -> torch.Tensor:
        """A whole tensor, checked (grouped tensors block by block)."""
        dtype, shape, a, z = self._entry(name)
        if name in self.groups:
            groups = self.groups[name]
            return self.rows(name, [g for g in (b - a for a, b in zip(groups[:-1], groups[1:]))])
        data = self._range(self.data_start + a, z - a)
        if self.checksums.get(name) != [[_digest(data, self.digest_hex)]]:
            raise self.fail(f"checksum mismatch in tensor {name!r}")
        return self._decode(data, dtype, shape)

    def rows(self, name: str, keep: list[int]) -> torch.Tensor:
        """The first ``keep[g]`` rows of every row group of a grouped tensor, concatenated, each block checked."""
        return self.rows_many([(name, keep)])[0]

    def rows_many(self, requests: list[tuple[str, list[int]]]) -> list[torch.Tensor]:
        """:meth:`rows` of several tensors, all ranges fetched in one call (one round of concurrent requests on
        an object store instead of one per tensor)."""
        import torch

        plans, ranges = [], []
        for name, keep in requests:
            dtype, shape, a, z = self._entry(name)
            groups = self.groups.get(name)
            digests = self.checksums.get(name)
            blocks = _blocks(groups or [], self.block_rows)
            if groups is None or groups[0] != 0 or groups[-1] != shape[0] \
                    or any(x > y for x, y in zip(groups, groups[1:])):
                raise self.fail(f"row groups of {name!r} do not match its shape")
            if not isinstance(digests, list) or [len(d) for d in digests] != [len(b) for b in blocks]:
                raise self.fail(f"checksum table of {name!r} does not match its row groups")
            if len(keep) != len(blocks) or any(k < 0 or k > g[1] - g[0] for k, g in zip(keep, zip(groups, groups[1:]))):
                raise InvalidArgumentError(f"cannot read {keep} rows of the row groups of {name!r}")
            row = math.prod(shape[1:]) * dtype.itemsize
            wanted = [(group, count, -(-count // self.block_rows)) for group, count in enumerate(keep) if count]
            spans = [(groups[group], blocks[group][needed - 1][1]) for group, _, needed in wanted]
            ranges += [(self.data_start + a + first * row, (stop - first) * row) for first, stop in spans]
            plans.append((name, dtype, shape, row, blocks, digests, wanted, spans))
        datas = iter(self._ranges(ranges))
        out = []
        for name, dtype, shape, row, blocks, digests, wanted, spans in plans:
            total = sum(count for _, count, _ in wanted)
            joined = bytearray(total * row)  # each kept row is copied once
            at = 0
            for (group, count, needed), (first, _) in zip(wanted, spans):
                data = memoryview(next(datas))
                for b, (x, y) in enumerate(blocks[group][:needed]):
                    if _digest(data[(x - first) * row : (y - first) * row], self.digest_hex) != digests[group][b]:
                        raise self.fail(f"checksum mismatch in tensor {name!r} (group {group}, rows {x}-{y})")
                joined[at : at + count * row] = data[: count * row]
                at += count * row
            out.append(self._decode(joined, dtype, [total, *shape[1:]]))
        return out

    def read_tensors(self, names: list[str]) -> list[torch.Tensor]:
        """Several whole ungrouped tensors, checked, fetched in one call."""
        entries = [self._entry(name) for name in names]
        if any(name in self.groups for name in names):
            raise InvalidArgumentError("read_tensors() reads ungrouped tensors; use rows_many() for grouped ones")
        datas = self._ranges([(self.data_start + a, z - a) for _, _, a, z in entries])
        out = []
        for name, (dtype, shape, _, _), data in zip(names, entries, datas):
            if self.checksums.get(name) != [[_digest(data, self.digest_hex)]]:
                raise self.fail(f"checksum mismatch in tensor {name!r}")
            out.append(self._decode(data, dtype, shape))
        return out

    def verify_payload(self) -> None:
        """The sha256 of all tensor data against the header's (reads the whole blob)."""
        digest, position = hashlib.sha256(), self.data_start
        while position < self.size:
            chunk = self._range(position, min(1 << 20, self.size - position))
            digest.update(chunk)
            position += len(chunk)
        if digest.hexdigest() != self.payload_sha256:
            raise self.fail("payload checksum mismatch")
        for name in self.tensors:
            self.tensor(name)


def local_reader(path: str | os.PathLike, label: str | None = None, stats: ReadStats | None = None) -> BlobReader:
    """A reader for a blob file anywhere on disk."""
    path = Path(path).expanduser().resolve()
    return BlobReader(LocalBlobs(path.parent, create=False), path.name, label, stats)


__all__ = ["BLOCK_ROWS", "FORMAT", "BlobReader", "EncodedBlob", "ReadStats", "encode_blob", "local_reader"]
