"""Quantized packed caches: KVzip eviction and KIVI-style int8/int4 together.

What is quantized, and why this way (KIVI, Liu et al. 2024: keys have outlier *channels*, values do not):

- keys per channel: one fp16 (scale, min) per channel for each group of ``key_group`` consecutive entries of a
  head (16; 64 for K4V2, see ``KEY_GROUPS``); values per entry: one fp16 (scale, min) per group of
  ``value_group`` channels of that entry. Asymmetric (min-max) rounding to ``bits`` = 8 or 4; two 4-bit codes
  share a byte (even channel in the low nibble).
- ``bits`` = 3 names KIVI's asymmetric codec: 4-bit keys with 2-bit values (3 bits per element on average; keys'
  outlier channels need the bits, per-entry values tolerate fewer). Four 2-bit codes share a byte (channel ``4i+j``
  in bits ``2j..2j+1``). ``bits`` = 2: 2-bit keys and values (K2V2).
- the first ``full_rows`` entries of every head stay in the cache dtype: in compressed layers the never-evicted
  prefix (chat template and attention sink: quantizing it raised the mean |NLL change| at 4 bits from 0.095 to
  0.135 nats, and a store keeps it once per model anyway), plus in every layer the ``full_precision`` most
  important entries (see ``DEFAULT_FULL_PRECISION``).

Entries in a head are best first (see cache.py), and key groups run along that order inside each head, so the
cache at a lower ratio (a prefix of each head) needs only a prefix of each head's full-precision rows, code rows
and key groups: ``QuantizedLayer.truncated(keep)`` takes those prefixes, and dequantizing it equals truncating the
dequantized layer exactly (a group's scale depends only on its own entries). Quantizing and truncating are
vectorised over heads and entries; dequantizing loops over heads (a few whole-tensor operations each, written in
place into the packed layer's buffers: cheaper than building row index tensors for a load's few dozen heads).

Rounding guarantees ``|x - dequantize(quantize(x))| <= scale / 2`` per element (up to float32 arithmetic): the
fp16 min is rounded down and the fp16 scale up, so every value lies inside the representable range.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from .cache import CacheInfo, PackedCache, PackedLayer, ratio_keep
from .errors import InvalidArgumentError

KV_BITS = (16, 8, 4, 3, 2)  # 16: not quantized (the cache dtype as computed, float32 or bfloat16/float16); 3: K4V2
_KEY_VALUE_BITS = {8: (8, 8), 4: (4, 4), 3: (4, 2), 2: (2, 2)}  # kv_bits -> (key code bits, value code bits)
DEFAULT_KEY_GROUP = 16  # entries per key scale group (measured: see BENCHMARKS.md, "Quantized caches")
# K4V2 (kv_bits 3) uses groups of 64: its key scales were 23% of its blob at ratio 0.125; 64 costs +0.016 nats
# [+0.000, +0.032] against 16 for 15% fewer bytes, the smallest blob within 0.1 nats of full (BENCHMARKS.md,
# "Compression frontier", n = 308)
KEY_GROUPS = {3: 64}
DEFAULT_VALUE_GROUP = 64  # channels per value scale group (the whole head for head_dim 64)
# important entries per head kept unquantized beyond the prefix: 16 lowered the mean |NLL change| at 4 bits from
# 0.095 to 0.082 nats for ~18% more bytes (SQuAD, n = 96), about what smaller key groups give for less: off
DEFAULT_FULL_PRECISION = 0
SCALE_DTYPE = torch.float16


def default_key_group(bits: int) -> int:
    """Entries per key scale group a ``bits`` cache is quantized with unless told otherwise."""
    return KEY_GROUPS.get(bits, DEFAULT_KEY_GROUP)


def check_bits(bits) -> int:
    """The bit width as an int, or a clear error for anything not in ``KV_BITS``."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in KV_BITS:
        raise InvalidArgumentError(
            f"kv_bits must be one of {', '.join(map(str, KV_BITS))} (16 = not quantized, 3 = 4-bit keys with 2-bit "
            f"values, 2 = 2-bit keys and values), got {bits!r}"
        )
    return bits


@dataclass(frozen=True)
class QuantSpec:
    """How a cache is quantized; all of it is stored in the blob header."""

    bits: int
    key_group: int | None = None  # None: default_key_group(bits)
    value_group: int = DEFAULT_VALUE_GROUP
    full_precision: int = DEFAULT_FULL_PRECISION

    def __post_init__(self) -> None:
        if check_bits(self.bits) == 16:
            raise InvalidArgumentError("a QuantSpec describes 8-, 4-, 3- (K4V2) or 2-bit caches; 16 bits is the "
                                       "plain PackedCache")
        if self.key_group is None:
            object.__setattr__(self, "key_group", default_key_group(self.bits))
        for name in ("key_group", "value_group"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name} must be a positive int, got {value!r}")
        if isinstance(self.full_precision, bool) or not isinstance(self.full_precision, int) or self.full_precision < 0:
            raise InvalidArgumentError(f"full_precision must be an int >= 0, got {self.full_precision!r}")

    @property
    def key_bits(self) -> int:
        return _KEY_VALUE_BITS[self.bits][0]

    @property
    def value_bits(self) -> int:
        return _KEY_VALUE_BITS[self.bits][1]

    def value_group_for(self, head_dim: int) -> int:
        """The value group actually used: ``value_group`` when it divides ``head_dim`` (and is a multiple of the
        codes per byte, so packed bytes never straddle groups), else the whole head_dim."""
        fits = head_dim % self.value_group == 0 and self.value_group % (8 // self.value_bits) == 0
        return self.value_group if fits else head_dim


def code_width(bits: int, head_dim: int) -> int:
    """Bytes per entry of a row of ``bits``-bit codes (8 // bits codes per byte)."""
    return -(-head_dim // (8 // bits))


def levels(bits: int) -> int:
    return (1 << bits) - 1


# --------------------------------------------------------------------------------------------- tensor kernels


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float16 <= x (float32 in, float16 out)."""
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, float("-inf"))), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def affine_params(low: torch.Tensor, high: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, min) covering [low, high] with ``levels`` steps: min rounded down, scale rounded up."""
    minimum = _fp16_down(low.float())
    scale = _fp16_up((high.float() - minimum.float()) / levels)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # constant group: every code is 0
    if not (torch.isfinite(minimum).all() and torch.isfinite(scale).all()):
        raise InvalidArgumentError(
            "the cache holds values beyond the float16 range of quantization scales; store it with kv_bits=16"
        )
    return scale, minimum


def _encode(x: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes of ``x`` (rows, channels) given per-element broadcastable scale/min; below 8 bits ``8 // bits``
    codes per byte, channel ``i`` of each run in bits ``i * bits`` and up."""
    codes = ((x.float() - minimum.float()) / scale.float()).round_().clamp_(0, levels(bits)).to(torch.uint8)
    per_byte = 8 // bits
    if per_byte > 1:
        if codes.shape[-1] % per_byte:
            codes = torch.nn.functional.pad(codes, (0, per_byte - codes.shape[-1] % per_byte))
        packed = codes[..., 0::per_byte] | (codes[..., 1::per_byte] << bits)  # a new tensor, contiguous
        for i in range(2, per_byte):
            packed |= codes[..., i::per_byte] << (bits * i)
        codes = packed
    return codes.contiguous()


def unpack_codes(codes: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """uint8 codes (rows, head_dim) from stored code rows (4 bits: two per byte, the even channel in the low
    nibble, without a per-element interleaving copy: see :func:`spread_nibbles`; 2 bits: four per byte)."""
    if bits == 8:
        return codes
    if bits == 4:
        return spread_nibbles(codes, sys.byteorder).view(torch.uint8)[:, :head_dim]
    return spread_crumbs(codes, sys.byteorder).view(torch.uint8)[:, :head_dim]


def spread_nibbles(codes: torch.Tensor, byteorder: str) -> torch.Tensor:
    """Every byte ``hl`` widened to an int16 word whose two bytes in memory are ``0l, 0h`` (``0x0h0l`` on a
    ``"little"``-endian machine, ``0x0l0h`` on a ``"big"`` one): one shift, or and mask over the whole tensor."""
    words = codes.to(torch.int16)
    if byteorder == "little":
        return words.bitwise_or_(words << 4).bitwise_and_(0x0F0F)
    return (words << 8).bitwise_or_(words >> 4).bitwise_and_(0x0F0F)


def spread_crumbs(codes: torch.Tensor, byteorder: str) -> torch.Tensor:
    """Every byte of four 2-bit codes widened to an int32 word whose four bytes in memory are the codes in channel
    order (as :func:`spread_nibbles`: a few shifts, ors and one mask over the whole tensor)."""
    words = codes.to(torch.int32)
    if byteorder == "little":
        spread = words | (words << 6) | (words << 12) | (words << 18)
    else:
        spread = (words << 24) | (words << 14) | (words << 4) | (words >> 6)
    return spread.bitwise_and_(0x03030303)


def _segments(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For per-head row counts: (head of each row, index of each row inside its head)."""
    heads = torch.repeat_interleave(torch.arange(len(counts)), counts)
    starts = torch.cumsum(counts, 0) - counts
    return heads, torch.arange(int(counts.sum())) - starts[heads]


def quantize_keys(x: torch.Tensor, counts: torch.Tensor, spec: QuantSpec):
    """Per-channel quantization of key rows (head after head, ``counts`` rows each) in groups of ``key_group``
    consecutive rows of a head. Returns (codes, scale, min), scale/min of shape (groups, head_dim)."""
    group_of_row = key_group_index(counts, spec.key_group)
    groups = int(group_counts(counts, spec.key_group).sum())
    index = group_of_row[:, None].expand(-1, x.shape[1])
    xf = x.float()
    low = xf.new_full((groups, x.shape[1]), float("inf")).scatter_reduce(0, index, xf, "amin")
    high = xf.new_full((groups, x.shape[1]), float("-inf")).scatter_reduce(0, index, xf, "amax")
    scale, minimum = affine_params(low, high, levels(spec.key_bits))
    return _encode(xf, scale[group_of_row], minimum[group_of_row], spec.key_bits), scale, minimum


def dequantize_keys(
    codes, scale, minimum, counts, spec: QuantSpec, head_dim: int, out: torch.Tensor | None = None,
    starts: list[int] | None = None,
) -> torch.Tensor:
    """Key rows from codes and per-(group, channel) scales: ``min + code * scale`` (float32 arithmetic). Head ``h``'s
    ``counts[h]`` rows go to ``out[starts[h]:]`` (default: a new float32 tensor, heads one after another): the codes
    are converted in place there, then each head's whole key groups are one broadcast ``addcmul`` written in place,
    its partial last group another."""
    counts = [int(c) for c in counts]
    out, starts = _output(out, starts, counts, head_dim, codes.device)
    size = spec.key_group
    groups = [-(-count // size) for count in counts]
    heads = zip(starts, counts, unpack_codes(codes, spec.key_bits, head_dim).split(counts),
                scale.float().split(groups), minimum.float().split(groups))
    for start, count, head_codes, head_scale, head_min in heads:
        if not count:
            continue
        dest = out.narrow(0, start, count)
        dest.copy_(head_codes)  # codes are small ints: exact in every float dtype
        whole = count // size
        if whole:
            blocks = dest.narrow(0, 0, whole * size).view(whole, size, head_dim)
            torch.addcmul(head_min[:whole, None], blocks, head_scale[:whole, None], out=blocks)
        if count > whole * size:
            rest = dest.narrow(0, whole * size, count - whole * size)
            torch.addcmul(head_min[whole], rest, head_scale[whole], out=rest)
    return out


def _output(out, starts, counts: list[int], head_dim: int, device) -> tuple[torch.Tensor, list[int]]:
    """The destination and each head's first row in it: by default a new float32 tensor, heads one after another."""
    if out is None:
        out = torch.empty(sum(counts), head_dim, device=device)
    if starts is None:
        starts = [0]
        for count in counts[:-1]:
            starts.append(starts[-1] + count)
    return out, starts


def quantize_values(x: torch.Tensor, spec: QuantSpec):
    """Per-entry quantization of value rows in groups of channels. Returns (codes, scale, min), scale/min of shape
    (rows, head_dim / value_group)."""
    rows, dim = x.shape
    group = spec.value_group_for(dim)
    xf = x.float().reshape(rows, dim // group, group)
    scale, minimum = affine_params(xf.amin(-1), xf.amax(-1), levels(spec.value_bits)) if rows else (
        xf.new_zeros(0, dim // group, dtype=SCALE_DTYPE), xf.new_zeros(0, dim // group, dtype=SCALE_DTYPE))
    codes = _encode(xf, scale[..., None], minimum[..., None], spec.value_bits)
    codes = codes.reshape(rows, codes.shape[1] * codes.shape[2])
    return codes, scale, minimum


def dequantize_values(
    codes, scale, minimum, spec: QuantSpec, head_dim: int, out: torch.Tensor | None = None,
    counts: list[int] | None = None, starts: list[int] | None = None,
) -> torch.Tensor:
    """Value rows from codes and per-(row, channel group) scales: ``min + code * scale`` (float32 arithmetic),
    converted in place, then one broadcast ``addcmul`` per head written in place. Rows as in
    :func:`dequantize_keys` (default: all rows, in order, into a new float32 tensor)."""
    counts = [codes.shape[0]] if counts is None else [int(c) for c in counts]
    out, starts = _output(out, starts, counts, head_dim, codes.device)
    group = spec.value_group_for(head_dim)
    heads = zip(starts, counts, unpack_codes(codes, spec.value_bits, head_dim).split(counts),
                scale.float()[..., None].split(counts), minimum.float()[..., None].split(counts))
    for start, count, head_codes, head_scale, head_min in heads:
        if not count:
            continue
        dest = out.narrow(0, start, count)
        dest.copy_(head_codes)
        blocks = dest.view(count, head_dim // group, group)
        torch.addcmul(head_min, blocks, head_scale, out=blocks)
    return out


def group_counts(counts: torch.Tensor, key_group: int) -> torch.Tensor:
    """Key groups per head for ``counts`` quantized rows per head (the last one may be partial)."""
    return (counts + key_group - 1) // key_group


def key_group_index(counts: torch.Tensor, key_group: int) -> torch.Tensor:
    """The key group of every quantized row (global group index, head after head)."""
    heads, local = _segments(counts)
    groups = group_counts(counts, key_group)
    return (torch.cumsum(groups, 0) - groups)[heads] + local // key_group


def split_counts(counts: torch.Tensor, full_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-precision rows, quantized rows) per head: the first ``full_rows`` entries of a head stay unquantized."""
    full = counts.clamp(max=full_rows)
    return full, counts - full


def _row_index(offsets: torch.Tensor, skip: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[h] + skip[h] + j`` for j < take[h], head after head."""
    heads, local = _segments(take)
    return offsets[:-1][heads] + skip[heads] + local


# float16 bits: exponent all ones = inf or nan. Checked as int16, one reduction each (float16 arithmetic is slow on
# CPUs, and these run for every layer of every load)
_FP16_EXPONENT = 0x7C00


def _finite_positive(scale: torch.Tensor) -> bool:
    """Every float16 in ``scale`` is finite and > 0: as int16, in (0, 0x7C00) (the sign bit makes negatives < 0)."""
    if not scale.numel():
        return True
    low, high = torch.aminmax(scale.view(torch.int16))
    return int(low) > 0 and int(high) < _FP16_EXPONENT


def _finite(values: torch.Tensor) -> bool:
    """Every float16 in ``values`` is finite: its bits without the sign are below the all-ones exponent."""
    return not values.numel() or int((values.view(torch.int16) & 0x7FFF).max()) < _FP16_EXPONENT


# --------------------------------------------------------------------------------------------- layers and caches


@dataclass
class QuantizedLayer:
    """One layer of a quantized packed cache: unquantized leading rows + codes and scales of the rest.

    Row order (per tensor, head after head) follows the packed layer's: ``full_keys``/``full_values`` hold each head's
    first ``min(count, full_rows)`` entries, ``key_codes``/``value_codes`` the remaining entries,
    ``key_scale``/``key_min`` one row per key group, ``value_scale``/``value_min`` one row per quantized entry.
    """

    spec: QuantSpec
    full_rows: int
    dtype: torch.dtype
    head_dim: int
    offsets: torch.Tensor  # int64 (heads + 1), as in PackedLayer: all entries of a head
    positions: torch.Tensor
    scores: torch.Tensor
    full_keys: torch.Tensor
    full_values: torch.Tensor
    key_codes: torch.Tensor
    key_scale: torch.Tensor
    key_min: torch.Tensor
    value_codes: torch.Tensor
    value_scale: torch.Tensor
    value_min: torch.Tensor
    base_length: int
    compressed: bool
    sliding_window: int | None = None

    @property
    def counts(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def split(self) -> tuple[torch.Tensor, torch.Tensor]:
        return split_counts(self.counts, self.full_rows)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values as stored: unquantized rows, codes and scales."""
        return sum(t.nbytes for t in (self.full_keys, self.full_values, self.key_codes, self.key_scale, self.key_min,
                                      self.value_codes, self.value_scale, self.value_min))

    def check(self) -> None:
        """ValueError unless every tensor has the shape the offsets, ``full_rows`` and spec imply (a blob reader
        turns it into CorruptBlobError)."""
        counts = self.counts.tolist()
        full = [min(count, self.full_rows) for count in counts]
        rows_full = sum(full)
        rows_q = sum(counts) - rows_full
        groups = sum(-(-(count - f) // self.spec.key_group) for count, f in zip(counts, full))
        value_groups = self.head_dim // self.spec.value_group_for(self.head_dim)
        expected = {
            "full_keys": (rows_full, self.head_dim), "full_values": (rows_full, self.head_dim),
            "key_codes": (rows_q, code_width(self.spec.key_bits, self.head_dim)),
            "value_codes": (rows_q, code_width(self.spec.value_bits, self.head_dim)),
            "key_scale": (groups, self.head_dim), "key_min": (groups, self.head_dim),
            "value_scale": (rows_q, value_groups), "value_min": (rows_q, value_groups),
        }
        for name, shape in expected.items():
            tensor = getattr(self, name)
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape}")
        for name in ("key_codes", "value_codes"):
            if getattr(self, name).dtype != torch.uint8:
                raise ValueError(f"{name} must be uint8")
        for name in ("key_scale", "key_min", "value_scale", "value_min"):
            if getattr(self, name).dtype != SCALE_DTYPE:
                raise ValueError(f"{name} must be float16")
        if not (_finite_positive(self.key_scale) and _finite_positive(self.value_scale)):
            raise ValueError("quantization scales must be finite and positive")
        if not (_finite(self.key_min) and _finite(self.value_min)):
            raise ValueError("quantization minimums must be finite")

    def dequantize(self, device: torch.device | str | None = None) -> PackedLayer:
        """The packed layer, every row in the cache dtype: codes are dequantized straight into the layer's buffers
        (a loop over heads, each a few whole-tensor operations; no index tensors, no intermediate copies)."""
        device = torch.device(device) if device is not None else self.full_keys.device
        counts = self.counts.tolist()
        full = [min(count, self.full_rows) for count in counts]
        quantized = [count - f for count, f in zip(counts, full)]
        starts = self.offsets[:-1].tolist()
        keys = torch.empty(sum(counts), self.head_dim, dtype=self.dtype, device=device)
        values = torch.empty_like(keys)
        for start, count, head_keys, head_values in zip(starts, full, self.full_keys.split(full),
                                                         self.full_values.split(full)):
            if count:  # the head's unquantized leading rows
                keys.narrow(0, start, count).copy_(head_keys)
                values.narrow(0, start, count).copy_(head_values)
        code_starts = [start + f for start, f in zip(starts, full)]
        dequantize_keys(self.key_codes.to(device), self.key_scale.to(device), self.key_min.to(device), quantized,
                        self.spec, self.head_dim, out=keys, starts=code_starts)
        dequantize_values(self.value_codes.to(device), self.value_scale.to(device), self.value_min.to(device),
                          self.spec, self.head_dim, out=values, counts=quantized, starts=code_starts)
        return PackedLayer(keys, values, self.offsets, self.positions, self.scores, self.base_length, self.compressed,
                           self.sliding_window)

    def truncated(self, keep: torch.Tensor) -> "QuantizedLayer":
        """The first ``keep[h]`` entries of every head: prefixes of the full rows, code rows and key groups."""
        keep = keep.to(torch.int64)
        full, quantized = self.split()
        keep_full, keep_q = split_counts(keep, self.full_rows)
        zero = torch.zeros_like(full)
        offsets = torch.zeros_like(self.offsets)
        offsets[1:] = keep.cumsum(0)
        full_offsets, code_offsets, group_offsets = (_offsets(c) for c in (
            full, quantized, group_counts(quantized, self.spec.key_group)))
        full_index = _row_index(full_offsets, zero, keep_full)
        code_index = _row_index(code_offsets, zero, keep_q)
        group_index = _row_index(group_offsets, zero, group_counts(keep_q, self.spec.key_group))
        entry_index = _row_index(self.offsets, zero, keep)
        take = lambda t, i: t[i.to(t.device)]  # noqa: E731
        return replace(
            self, offsets=offsets, positions=self.positions[entry_index], scores=self.scores[entry_index],
            full_keys=take(self.full_keys, full_index), full_values=take(self.full_values, full_index),
            key_codes=take(self.key_codes, code_index), value_codes=take(self.value_codes, code_index),
            value_scale=take(self.value_scale, code_index), value_min=take(self.value_min, code_index),
            key_scale=take(self.key_scale, group_index), key_min=take(self.key_min, group_index),
        )


    def drop_prefix(self, prefix: int) -> "QuantizedLayer":
        """Without the first ``prefix`` entries of each head (unquantized rows: the store keeps the template prefix
        once per model, apart from the documents' own entries)."""
        full, quantized = self.split()
        if bool((full < prefix).any()):
            raise ValueError("the prefix to drop is not entirely unquantized")
        keep_full = full - prefix
        rows = _row_index(_offsets(full), torch.full_like(full, prefix), keep_full)
        entries = _row_index(self.offsets, torch.full_like(full, prefix), self.counts - prefix)
        return replace(
            self, full_rows=self.full_rows - prefix, offsets=_offsets(self.counts - prefix),
            positions=self.positions[entries], scores=self.scores[entries],
            full_keys=self.full_keys[rows.to(self.full_keys.device)],
            full_values=self.full_values[rows.to(self.full_values.device)],
        )


    def add_prefix(self, keys: torch.Tensor, values: torch.Tensor, prefix: int) -> "QuantizedLayer":
        """The inverse of :meth:`drop_prefix`: ``keys``/``values`` (``heads * prefix`` rows, head after head) become
        the first, unquantized, entries of every head (positions ``0..prefix-1``, infinite scores)."""
        full, _ = self.split()
        device = self.full_keys.device
        keys, values = keys.to(device), values.to(device)
        prefix_positions = torch.arange(prefix, dtype=self.positions.dtype)
        prefix_scores = torch.full((prefix,), float("inf"), dtype=self.scores.dtype)
        parts: dict[str, list[torch.Tensor]] = {"k": [], "v": [], "pos": [], "score": []}
        row = 0
        for head, (f, start, stop) in enumerate(zip(full.tolist(), self.offsets[:-1].tolist(),
                                                     self.offsets[1:].tolist())):
            parts["k"] += [keys[head * prefix : (head + 1) * prefix], self.full_keys[row : row + f]]
            parts["v"] += [values[head * prefix : (head + 1) * prefix], self.full_values[row : row + f]]
            parts["pos"] += [prefix_positions, self.positions[start:stop]]
            parts["score"] += [prefix_scores, self.scores[start:stop]]
            row += f
        joined = {name: torch.cat(tensors) for name, tensors in parts.items()}
        return replace(self, full_rows=self.full_rows + prefix, offsets=_offsets(self.counts + prefix),
                       positions=joined["pos"], scores=joined["score"], full_keys=joined["k"],
                       full_values=joined["v"])


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = counts.cumsum(0)
    return offsets


def quantize_layer(layer: PackedLayer, spec: QuantSpec, full_rows: int) -> QuantizedLayer:
    counts = layer.counts
    full, quantized = split_counts(counts, full_rows)
    full_index = _row_index(layer.offsets, torch.zeros_like(full), full).to(layer.keys.device)
    code_index = _row_index(layer.offsets, full, quantized).to(layer.keys.device)
    key_codes, key_scale, key_min = quantize_keys(layer.keys[code_index], quantized, spec)
    value_codes, value_scale, value_min = quantize_values(layer.values[code_index], spec)
    return QuantizedLayer(
        spec=spec, full_rows=full_rows, dtype=layer.keys.dtype, head_dim=layer.keys.shape[1], offsets=layer.offsets,
        positions=layer.positions, scores=layer.scores,
        full_keys=layer.keys[full_index], full_values=layer.values[full_index],
        key_codes=key_codes, key_scale=key_scale, key_min=key_min,
        value_codes=value_codes, value_scale=value_scale, value_min=value_min,
        base_length=layer.base_length, compressed=layer.compressed, sliding_window=layer.sliding_window,
    )


@dataclass
class QuantizedCache:
    """A packed cache with its context entries quantized: what is stored, and what the memory cache may hold."""

    layers: list[QuantizedLayer]
    info: CacheInfo

    @property
    def spec(self) -> QuantSpec:
        return self.layers[0].spec

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def dequantize(self, device: torch.device | str | None = None) -> PackedCache:
        cache = PackedCache([layer.dequantize(device) for layer in self.layers], self.info)
        cache.quantized = self
        return cache

    def at_ratio(self, ratio: float, level: str | None = None) -> "QuantizedCache":
        """The quantized cache at a lower ``ratio``: the same budgets as ``PackedCache.at_ratio``."""
        level = level or self.info.level
        keep = ratio_keep(self.layers, self.info, ratio, level)
        layers = [layer.truncated(keep[i]) if i in keep else layer for i, layer in enumerate(self.layers)]
        return QuantizedCache(layers, replace(self.info, ratio=ratio, level=level))


def quantize(
    cache: PackedCache,
    bits: int,
    key_group: int | None = None,
    value_group: int = DEFAULT_VALUE_GROUP,
    full_precision: int = DEFAULT_FULL_PRECISION,
    full_rows: int | None = None,
) -> QuantizedCache:
    """Quantize a packed cache's entries to ``bits`` (8, 4, 3: 4-bit keys with 2-bit values, or 2); the cache's
    tail is not included.

    Unquantized: the never-evicted prefix of the compressed layers plus the first ``full_precision`` (most
    important) entries of every head; ``full_rows`` instead sets the unquantized rows per head of every layer (for
    experiments: ``full_rows=0`` quantizes the prefix too); ``key_group`` None: :func:`default_key_group`."""
    spec = QuantSpec(check_bits(bits), key_group, value_group, full_precision)
    prefix = cache.info.prefix_length
    layers = []
    for layer in cache.layers:
        rows = full_rows if full_rows is not None else full_precision + (prefix if layer.compressed else 0)
        layers.append(quantize_layer(layer, spec, int(rows)))
    return QuantizedCache(layers, replace(cache.info, kv_bits=spec.bits))
