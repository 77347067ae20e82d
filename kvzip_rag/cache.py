"""The packed, physically smaller KV cache: a real transformers ``Cache`` the model decodes from.

Per layer, the kept entries of all kv heads live in one flat ``(N, head_dim)`` array for keys and one for values,
head after head; ``offsets`` (``num_heads + 1``) delimit the heads. Inside a head, entries are ordered by
descending importance (the never-evicted prefix first), with their original positions and scores beside them, so
a prefix of each head's slice is exactly the cache at a lower ratio. Tokens appended later (questions, answers)
go to a per-head *tail* written in reserved rows right after that head's entries (see ``PackedLayer``), which
``rewind()`` forgets, bringing the cache back to the compressed document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .budget import allocate_budgets
from .errors import ModelMismatchError, PackedAttentionRequiredError


@dataclass(frozen=True)
class CacheInfo:
    """What a packed cache is: which model and template built it, over which tokens, kept how."""

    model_name: str
    model_fingerprint: str
    template_digest: str
    prefix_length: int
    context_length: int
    ratio: float
    level: str
    scorer: str
    full_nbytes: int
    input_ids: tuple[int, ...] = field(repr=False, default=())
    kv_bits: int = 16  # 8 or 4: the entries went through quantization (kvzip_rag.quant), 16: as computed

    @property
    def base_length(self) -> int:
        return self.prefix_length + self.context_length

    def check_model(self, model, where: str = "this cache") -> None:
        """Refuse a model other than the one (and the prompt template) that built the cache: its keys would be
        meaningless there. ``model`` is a KVzipModel."""
        if self.model_fingerprint != model.fingerprint:
            raise ModelMismatchError(
                f"{where} was built by model {self.model_name!r} (fingerprint {self.model_fingerprint}) but the "
                f"given model is {model.name!r} (fingerprint {model.fingerprint}); load that model or recompress "
                "the document"
            )
        if self.template_digest != model.template.digest:
            raise ModelMismatchError(
                f"{where} was built with another prompt template (digest {self.template_digest}, current "
                f"{model.template.digest}); recompress the document"
            )


class PackedLayer(CacheLayerMixin):
    """One layer of a packed cache (see the module docstring for the layout).

    Storage grows in place: one flat buffer per layer holds, for every kv head, its packed entries followed by
    ``room`` reserved rows where that head's tail is written. Head ``h``'s live rows are therefore one contiguous
    range ``[start_h, start_h + count_h + tail)``, which both attention paths read as they are (no per-token copy).
    When the tail outgrows the room the buffer is rebuilt with geometrically more room (amortised O(1) appends);
    ``rewind()`` only forgets the tail.
    """

    is_sliding = False
    is_croppable = True
    MIN_ROOM = 32  # tail rows reserved per head at the first append: a question fits without a regrowth
    # Off by default: a recorder (kvzip_rag.evidence) set here receives, in every forward pass, the attention
    # probabilities of the pass's last query over this layer's buffer rows, ``(query heads, rows)``.
    evidence: Callable[["PackedLayer", torch.Tensor], None] | None = None

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        offsets: torch.Tensor,
        positions: torch.Tensor,
        scores: torch.Tensor,
        base_length: int,
        compressed: bool,
        sliding_window: int | None = None,
    ):
        # CacheLayerMixin.__init__ would assign keys/values = None; this layer is built complete instead.
        self.is_initialized = True
        self.offsets = offsets.to(torch.int64).cpu()
        self.positions, self.scores = positions, scores
        self.base_length = base_length
        self.compressed = compressed
        self.sliding_window = sliding_window
        self.num_heads = len(self.offsets) - 1
        self._set_document(keys, values)

    def _set_document(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Adopt the packed document entries as the buffer itself (no copy, no room, empty tail)."""
        self.buffer_keys, self.buffer_values = keys, values
        self.room = 0
        self._tail = 0
        self._forget_derived()

    def _forget_derived(self) -> None:
        """Drop what is derived from the buffer's shape or device (rebuilt on first use); a batch arena's slot is
        given back (the buffer is no longer a view of it)."""
        self._row_meta: RowMeta | None = None
        self._device_layout: tuple[torch.Tensor, torch.Tensor] | None = None
        slot = getattr(self, "arena_slot", None)
        if slot is not None:
            slot[0].release(slot[1])
        self.arena_slot: tuple[LayerArena, int] | None = None  # its buffer is a view of this batch arena's slot

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: a packed layer is built complete."""

    # -- layout ------------------------------------------------------------------------------------------------
    @property
    def counts(self) -> torch.Tensor:
        """Entries per kv head (prefix included)."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def starts(self) -> torch.Tensor:
        """First buffer row of each head's region (cpu int64); regions are ``count_h + room`` rows long."""
        return self.offsets[:-1] + torch.arange(self.num_heads) * self.room

    @property
    def tail_length(self) -> int:
        return self._tail

    @property
    def live_lengths(self) -> torch.Tensor:
        """Rows each head attends to now: its packed entries plus the tail (cpu int64)."""
        return self.counts + self._tail

    def _rows(self, starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Buffer rows ``[starts[h], starts[h] + lengths[h])`` of every head, concatenated (cpu int64)."""
        return torch.repeat_interleave(starts - torch.cat([lengths.new_zeros(1), lengths.cumsum(0)[:-1]]), lengths) \
            + torch.arange(int(lengths.sum()))

    def _document_rows(self) -> torch.Tensor:
        return self._rows(self.starts, self.counts)

    def device_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``starts`` and ``counts`` on the buffer's device (int64), so no step copies them from the host."""
        if self._device_layout is None:
            device = self.buffer_keys.device
            self._device_layout = (self.starts.to(device), self.counts.to(device))
        return self._device_layout

    # -- document entries (what is stored; no tail) ----------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor:
        """The packed document keys ``(N, head_dim)``, head after head (a view when no tail room is reserved)."""
        if self.room == 0:
            return self.buffer_keys
        return self.buffer_keys[self._document_rows().to(self.buffer_keys.device)]

    @keys.setter
    def keys(self, keys: torch.Tensor) -> None:
        """Replace the document keys (same rows: a dtype or device change); drops the tail."""
        self._set_document(keys, self.values)

    @property
    def values(self) -> torch.Tensor:
        if self.room == 0:
            return self.buffer_values
        return self.buffer_values[self._document_rows().to(self.buffer_values.device)]

    @values.setter
    def values(self, values: torch.Tensor) -> None:
        self._set_document(self.keys, values)

    @property
    def nbytes(self) -> int:
        """Bytes of the document's keys and values (the tail and its reserved room not counted)."""
        rows = int(self.offsets[-1])
        return rows * (self.buffer_keys[0].nbytes + self.buffer_values[0].nbytes) if rows else 0

    # -- tail --------------------------------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the new tokens into every head's room, then hand attention a marker of this layer (see
        ``PackedStates``): only the packed attention can use it; any other attention gets a clear error."""
        if key_states.shape[0] != 1:
            raise ValueError("the packed cache answers one sequence at a time (batch size 1)")
        new = key_states.shape[2]
        self.reserve(new)
        heads, dim = self.num_heads, key_states.shape[-1]
        starts, counts = self.device_layout()
        rows = (starts + counts + self._tail)[:, None] + torch.arange(new, device=starts.device)  # (heads, new)
        device_rows = rows.flatten()
        with torch.inference_mode():  # buffers may be inference tensors (built under inference mode)
            self.buffer_keys.index_copy_(0, device_rows, key_states[0].reshape(heads * new, dim).to(self.buffer_keys.dtype))
            self.buffer_values.index_copy_(
                0, device_rows, value_states[0].reshape(heads * new, -1).to(self.buffer_values.dtype)
            )
            if self._row_meta is not None:
                self._row_meta.written(rows, self.base_length + self._tail)
        self._tail += new
        return PackedStates.mark(key_states, self), PackedStates.mark(value_states, self)

    def leave_arena(self) -> None:
        """Own its buffer again (a copy of its slot), so a cache that outlives its batch (a conversation's) does not
        keep a whole :class:`LayerArena` alive."""
        if self.arena_slot is not None:
            with torch.inference_mode():
                self.buffer_keys, self.buffer_values = self.buffer_keys.clone(), self.buffer_values.clone()
            self._forget_derived()

    def reserve(self, new: int) -> None:
        """Make room for ``new`` more tail rows per head (regrowing the buffer if needed)."""
        if self._tail + new > self.room:
            self._grow(self._tail + new)

    def _grow(self, needed: int) -> None:
        """Rebuild the buffer with room for at least ``needed`` tail rows per head (geometric growth)."""
        room = max(needed, 2 * self.room, self.MIN_ROOM)
        new_starts = self.offsets[:-1] + torch.arange(self.num_heads) * room
        total = int(self.offsets[-1]) + self.num_heads * room
        with torch.inference_mode():
            keys = self.buffer_keys.new_zeros(total, self.buffer_keys.shape[-1])
            values = self.buffer_values.new_zeros(total, self.buffer_values.shape[-1])
            # head by head: a few slice copies cost less than building row indices (an answer grows every layer)
            for old, new, live in zip(self.starts.tolist(), new_starts.tolist(), self.live_lengths.tolist()):
                keys[new:new + live] = self.buffer_keys[old:old + live]
                values[new:new + live] = self.buffer_values[old:old + live]
        self.buffer_keys, self.buffer_values, self.room = keys, values, room
        self._forget_derived()

    def row_meta(self, num_query_heads: int) -> "RowMeta":
        """What the CPU attention needs beside the buffer (see ``RowMeta``); built once per buffer, then kept
        current by ``update`` and ``crop``."""
        if self._row_meta is None or self._row_meta.decode_bias.shape[0] != num_query_heads:
            counts = self.counts
            heads = torch.repeat_interleave(torch.arange(self.num_heads), counts + self.room)
            positions = torch.full((len(heads),), NO_POSITION, dtype=torch.int64)
            bias = torch.full((num_query_heads, len(heads)), float("-inf"), dtype=self.buffer_keys.dtype)
            group = num_query_heads // self.num_heads
            document = self.positions.to(torch.int64).cpu()
            tail = torch.arange(self.base_length, self.base_length + self._tail)
            # head by head (slices, as in _grow): its entries, then its tail, open to its group of query heads
            for h, (start, first, count) in enumerate(zip(self.starts.tolist(), self.offsets[:-1].tolist(),
                                                          counts.tolist())):
                positions[start:start + count] = document[first:first + count]
                positions[start + count:start + count + self._tail] = tail
                bias[h * group:(h + 1) * group, start:start + count + self._tail] = 0
            device = self.buffer_keys.device
            self._row_meta = RowMeta(heads.to(device), positions.to(device), bias.to(device))
        return self._row_meta

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built by transformers but unused by the packed attention; keep them tail-sized and cheap.
        return self._tail + query_length, self.base_length

    def get_seq_length(self) -> int:
        return self.base_length + self._tail

    def get_max_length(self) -> int:
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        """Keep the first ``tokens_to_remove`` tail tokens, or drop the last ``-tokens_to_remove`` (transformers'
        convention); the packed document itself is never cropped."""
        keep = max(self._tail + tokens_to_remove, 0) if tokens_to_remove < 0 else min(tokens_to_remove, self._tail)
        if self._row_meta is not None and keep < self._tail:
            dropped = self._rows(self.starts + self.counts + keep, torch.full((self.num_heads,), self._tail - keep))
            self._row_meta.dropped(dropped.to(self._row_meta.positions.device))
        self._tail = keep

    def rewind(self) -> None:
        """Forget the tail: back to the packed entries."""
        self.crop(0)

    def reset(self) -> None:
        """transformers' name for emptying a layer; a packed layer empties back to its entries (:meth:`rewind`)."""
        self.rewind()

    def tail_states(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The appended tokens' keys and values, ``(1, heads, tail, head_dim)`` each (a copy; for inspection)."""
        rows = self._rows(self.starts + self.counts, torch.full((self.num_heads,), self._tail))
        rows = rows.to(self.buffer_keys.device)
        shape = (1, self.num_heads, self._tail, -1)
        return self.buffer_keys[rows].reshape(shape), self.buffer_values[rows].reshape(shape)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "PackedLayer":
        """Move (or cast) the buffers in place, tail included."""
        self.buffer_keys = self.buffer_keys.to(device=device, dtype=dtype)
        self.buffer_values = self.buffer_values.to(device=device, dtype=dtype)
        self._forget_derived()
        return self

    def head_slices(self, keep: torch.Tensor) -> list[slice]:
        """Slices of the first ``keep[h]`` document entries of every head, in ``keys``/``positions`` indexing."""
        starts = self.offsets[:-1].tolist()
        return [slice(s, s + int(k)) for s, k in zip(starts, keep.tolist())]

    def truncated(self, keep: torch.Tensor) -> "PackedLayer":
        """A new layer with only the first ``keep[h]`` entries of each head (and no tail)."""
        index = torch.cat([torch.arange(s.start, s.stop) for s in self.head_slices(keep)])
        offsets = torch.zeros(self.num_heads + 1, dtype=torch.int64)
        offsets[1:] = keep.cumsum(0)
        keys, values = self.keys, self.values
        return PackedLayer(
            keys[index.to(keys.device)], values[index.to(values.device)], offsets, self.positions[index],
            self.scores[index], self.base_length, self.compressed, self.sliding_window,
        )


NO_POSITION = torch.iinfo(torch.int64).max  # position of a reserved, unwritten row: after every query


@dataclass
class RowMeta:
    """Per buffer row: its kv head and position (``NO_POSITION`` if reserved and unwritten); and the additive mask
    of one decoding step, ``(query heads, rows)``: 0 where a query head's own kv head has a written row, -inf
    elsewhere. A new token sees every written row of its head, so decoding needs no other mask."""

    heads: torch.Tensor
    positions: torch.Tensor
    decode_bias: torch.Tensor

    def written(self, rows: torch.Tensor, first_position: int) -> None:
        """Rows ``rows`` (kv heads, new) now hold the tokens at ``first_position``, ``first_position + 1``, ..."""
        num_kv, new = rows.shape
        with torch.inference_mode():
            positions = torch.arange(first_position, first_position + new, device=rows.device)
            self.positions[rows.flatten()] = positions.repeat(num_kv)
            group = self.decode_bias.shape[0] // num_kv
            self.decode_bias.view(num_kv, group, -1)[torch.arange(num_kv, device=rows.device)[:, None], :, rows] = 0

    def dropped(self, rows: torch.Tensor) -> None:
        with torch.inference_mode():
            self.positions[rows] = NO_POSITION
            self.decode_bias[:, rows] = float("-inf")


class PackedStates(torch.Tensor):
    """What ``PackedLayer.update`` returns: the new tokens' states, tagged with their layer.

    The packed attention reads the layer from the tag. Any other attention (SDPA, eager, flash) would attend to the
    new tokens alone and answer nonsense, so every torch operation on this tensor raises a clear error instead.
    """

    layer: "PackedLayer"

    @staticmethod
    def mark(states: torch.Tensor, layer: "PackedLayer") -> "PackedStates":
        marked = states.as_subclass(PackedStates)
        marked.layer = layer
        return marked

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise PackedAttentionRequiredError(
            "a PackedCache was used without the packed attention: load the model with kvzip_rag.load_model() or "
            "wrap_model() (attention implementation 'kvzip'), and answer with kvzip_rag.answer() or pass "
            "kvzip_cache=<the cache> to the model call"
        )


class PackedCache(Cache):
    """A compressed document cache: the cache argument of a model loaded by ``load_model``/``wrap_model`` (whose
    attention, ``"kvzip"``, reads the packed layout), e.g. ``KVzipModel.forward`` or ``model.generate``. Any other
    attention raises ``PackedAttentionRequiredError`` rather than attend to the new tokens alone."""

    def __init__(self, layers: list[PackedLayer], info: CacheInfo):
        super().__init__(layers=layers)
        self.info = info
        self.quantized = None  # the QuantizedCache these layers were dequantized from (what a store writes)

    @property
    def compressed_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.compressed]

    @property
    def nbytes(self) -> int:
        """Bytes of the compressed document's keys and values (without question/answer tails)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def full_nbytes(self) -> int:
        """Bytes the same document took in the uncompressed cache."""
        return self.info.full_nbytes

    def head_budgets(self) -> torch.Tensor:
        """Kept context entries per (compressed layer, kv head): the non-uniform budgets of pair-level eviction."""
        prefix = self.info.prefix_length
        return torch.stack([self.layers[i].counts - prefix for i in self.compressed_layers])

    @property
    def kept_ratio(self) -> float:
        """Fraction of the context's (layer, head, token) entries kept in the compressed layers."""
        budgets = self.head_budgets()
        return budgets.sum().item() / max(budgets.numel() * self.info.context_length, 1)

    def rewind(self, tail_length: int = 0) -> None:
        """Forget appended tokens past the first ``tail_length`` (0: back to the compressed document; a turn that
        failed midway: back to the conversation before it)."""
        for layer in self.layers:
            layer.crop(tail_length)

    def reset(self) -> None:
        """transformers' name for emptying a cache (there it zeroes the values); a packed cache empties back to
        its document: :meth:`rewind`."""
        self.rewind()

    @property
    def tail_length(self) -> int:
        return self.layers[0].tail_length

    def leave_arena(self) -> None:
        """Every layer owns its buffer again (see :meth:`PackedLayer.leave_arena`)."""
        for layer in self.layers:
            layer.leave_arena()

    def reserve(self, new: int) -> None:
        """Room for ``new`` more tail rows per head in every layer now, so the appends that follow (an answer's
        tokens) do not regrow the buffers midway (a regrowth also takes a layer out of its batch arena)."""
        for layer in self.layers:
            layer.reserve(new)

    def at_ratio(self, ratio: float, level: str | None = None) -> "PackedCache":
        """The cache this one would have been at a lower ``ratio``: top entries only, no re-scoring."""
        level = level or self.info.level
        keep = ratio_keep(self.layers, self.info, ratio, level)
        layers = [layer.truncated(keep[i]) if i in keep else layer for i, layer in enumerate(self.layers)]
        cache = PackedCache(layers, replace(self.info, ratio=ratio, level=level))
        if self.quantized is not None:
            cache.quantized = self.quantized.at_ratio(ratio, level)
        return cache

    def to(self, device: torch.device | str) -> "PackedCache":
        for layer in self.layers:
            layer.to(device)
        return self


class LayerArena:
    """One layer of B packed caches side by side in one padded tensor: keys and values ``(slots, rows, d)`` and the
    parts' ``RowMeta`` (heads and positions ``(slots, rows)``, decode mask ``(slots, query heads, rows)``), each slot
    padded to the longest buffer (keys 0, mask -inf, so a padded row is never seen).

    Each part's buffer and ``RowMeta`` become views of its slot, so its own code (a batch-1 pass, ``crop``) reads
    and writes the same memory, while a batched step writes every sequence's new rows with one indexed copy and
    attends over all of them with one call (``kvzip_rag.attention``). A slot is given back when its part leaves it
    (``PackedLayer.leave_arena``, or a regrowth giving the part a buffer of its own) and taken by the next part
    that joins and fits, which copies only that part; the arena is rebuilt (every part copied) only when a joining
    part finds no free slot that fits, or when free slots would make it mostly padding (:func:`use_arena`'s
    bound). A batch's sequences need not sit in slot order (``BatchedLayer.slots``); a free slot is computed over
    and ignored."""

    def __init__(self, parts: list[PackedLayer], num_query_heads: int):
        sizes = [len(part.buffer_keys) for part in parts]
        self.rows = max(sizes)  # the parts are not kept: each points here (no reference cycle holds a dead arena)
        first = parts[0]
        batch, device = len(parts), first.buffer_keys.device
        with torch.inference_mode():  # as the buffers (written under inference mode)
            self.keys = first.buffer_keys.new_zeros(batch, self.rows, first.buffer_keys.shape[-1])
            self.values = first.buffer_values.new_zeros(batch, self.rows, first.buffer_values.shape[-1])
            self.heads = torch.full((batch, self.rows), -1, dtype=torch.int64, device=device)
            self.positions = torch.full((batch, self.rows), NO_POSITION, dtype=torch.int64, device=device)
            self.bias = torch.full((batch, num_query_heads, self.rows), float("-inf"), dtype=self.keys.dtype,
                                   device=device)
        # Each slot's heads' first tail row (within the slot).
        self.tail_start = torch.zeros(batch, first.num_heads, dtype=torch.int64, device=device)
        # Where the token at position p of a slot's head lands, flat: its key/value row ``origin + p``, its decode
        # mask cells ``bias_origin + p + group_rows`` (one per query head of the group); fixed while a part is placed.
        group = num_query_heads // first.num_heads
        self.origin = torch.zeros(batch, first.num_heads, dtype=torch.int64, device=device)
        self.bias_origin = torch.zeros_like(self.origin)
        self.group_rows = torch.arange(group, device=device) * self.rows
        self.taken = [False] * batch
        for b, part in enumerate(parts):
            self.place(part, b)

    def place(self, part: PackedLayer, slot: int) -> None:
        """Copy ``part`` into the free ``slot`` and make its buffer and row meta views of it (it gives back the
        slot it held elsewhere)."""
        meta = part.row_meta(self.bias.shape[1])
        size = len(part.buffer_keys)
        with torch.inference_mode():
            self.keys[slot, :size], self.values[slot, :size] = part.buffer_keys, part.buffer_values
            self.heads[slot, :size], self.positions[slot, :size] = meta.heads, meta.positions
            self.bias[slot, :, :size] = meta.decode_bias
            self.heads[slot, size:], self.positions[slot, size:] = -1, NO_POSITION  # a former member's padding
            self.bias[slot, :, size:] = float("-inf")
            starts, counts = part.device_layout()
            self.tail_start[slot] = starts + counts
            self.origin[slot] = slot * self.rows + self.tail_start[slot] - part.base_length
            heads = torch.arange(part.num_heads, device=starts.device)
            self.bias_origin[slot] = ((slot * part.num_heads + heads) * len(self.group_rows) - slot) * self.rows + \
                self.origin[slot]
        layout = part._device_layout
        part._forget_derived()
        part.buffer_keys, part.buffer_values = self.keys[slot, :size], self.values[slot, :size]
        part._row_meta = RowMeta(self.heads[slot, :size], self.positions[slot, :size], self.bias[slot, :, :size])
        part._device_layout = layout  # same buffer layout, same device
        part.arena_slot = (self, slot)
        self.taken[slot] = True

    def release(self, slot: int) -> None:
        """Its part left the slot: the next part that joins and fits may take it."""
        self.taken[slot] = False

    @classmethod
    def of(cls, parts: list[PackedLayer], num_query_heads: int) -> "LayerArena":
        """The arena some of these parts already share, the others placed in its free slots; or a new one (see the
        class)."""
        arena = next((part.arena_slot[0] for part in parts if part.arena_slot is not None), None)
        if arena is None or arena.bias.shape[1] != num_query_heads:
            return cls(parts, num_query_heads)
        joining = [part for part in parts if part.arena_slot is None or part.arena_slot[0] is not arena]
        free = [slot for slot, taken in enumerate(arena.taken) if not taken]
        sizes = [len(part.buffer_keys) for part in parts]
        if (len(joining) > len(free) or any(len(part.buffer_keys) > arena.rows for part in joining)
                or len(arena.keys) * arena.rows > MAX_ARENA_PADDING * sum(sizes)):
            return cls(parts, num_query_heads)
        for part, slot in zip(joining, free):
            arena.place(part, slot)
        return arena

    def write(self, parts: list[PackedLayer], slots: torch.Tensor, key_states: torch.Tensor,
              value_states: torch.Tensor, step: "BatchStep") -> None:
        """The pass's new keys and values ``(1, heads, tokens, d)`` into every sequence's tail rows (sequence ``b``
        in slot ``slots[b]``), their row meta with them (positions; the decode mask opened for the heads' query
        groups); then the tails advance. Each token's rows follow from its position (``origin``, ``bias_origin``)."""
        slot = slots[step.sequence]  # (tokens,): the slot of each token's sequence
        position = step.token_positions[:, None]
        rows = (self.origin[slot] + position).T.flatten()  # (heads * tokens,): head after head, as the states
        cells = ((self.bias_origin[slot] + position)[..., None] + self.group_rows).flatten()
        dim = key_states.shape[-1]
        with torch.inference_mode():
            self.keys.view(-1, dim).index_copy_(0, rows, key_states[0].reshape(-1, dim).to(self.keys.dtype))
            self.values.view(-1, self.values.shape[-1]).index_copy_(
                0, rows, value_states[0].reshape(len(rows), -1).to(self.values.dtype))
            self.positions.view(-1).index_copy_(0, rows, step.head_positions)
            self.bias.view(-1).index_fill_(0, cells, 0)
        for part, length in zip(parts, step.lengths):
            part._tail += length


@dataclass
class BatchStep:
    """Where each sequence's tokens sit in one batched pass (one row, sequence after sequence), on the device."""

    lengths: list[int]
    sequence: torch.Tensor  # (tokens,): the sequence of each token
    offset: torch.Tensor  # (tokens,): its index among its sequence's new tokens
    last: torch.Tensor  # (B,): each sequence's last token
    token_positions: torch.Tensor  # (tokens,): each token's position in its own cache
    last_positions: torch.Tensor  # (B,): each sequence's last token's position
    head_positions: torch.Tensor  # (kv heads * tokens,): token_positions once per kv head, as a layer's new rows
    prompts: "PromptGrid | None" = None  # the sequences taking several tokens (questions' prompts), if any

    @classmethod
    def build(cls, lengths: list[int], positions: list[int], num_kv_heads: int, device) -> "BatchStep":
        """``positions``: where each sequence's first new token sits (its cache's length); ``num_kv_heads``: the
        caches' kv heads per layer."""
        sizes = torch.tensor(lengths, device=device)
        sequence = torch.repeat_interleave(torch.arange(len(lengths), device=device), sizes)
        last = sizes.cumsum(0) - 1
        offset = torch.arange(len(sequence), device=device) - (last - sizes + 1)[sequence]
        token_positions = torch.tensor(positions, device=device)[sequence] + offset
        step = cls(lengths, sequence, offset, last, token_positions, token_positions[last],
                   token_positions.repeat(num_kv_heads))
        if not step.single:
            step.prompts = PromptGrid.build(step, device)
        return step

    @property
    def single(self) -> bool:
        """Every sequence takes one token (decoding only)."""
        return len(self.sequence) == len(self.lengths)

    def spans(self) -> list[slice]:
        """Each sequence's tokens in the pass."""
        ends = torch.tensor(self.lengths).cumsum(0).tolist()
        return [slice(end - n, end) for end, n in zip(ends, self.lengths)]


@dataclass
class PromptGrid:
    """The pass's prompts (sequences taking more than one token) as a padded grid ``(prompts, longest)``, built once
    per pass for every layer's attention: where each prompt token sits in the pass and in the grid, and the position
    of every grid cell (a padding cell repeats its prompt's last position, so it sees what that token sees)."""

    members: list[int]  # the prompting sequences (host)
    sequences: torch.Tensor  # (P,): the same, on the device
    token: torch.Tensor  # (prompt tokens,): each one's index in the pass
    row: torch.Tensor  # (prompt tokens,): its prompt's row in the grid
    column: torch.Tensor  # (prompt tokens,): its index in its prompt
    positions: torch.Tensor  # (P, longest): each cell's position
    lengths: list[int]  # each prompt's length (host)

    @classmethod
    def build(cls, step: "BatchStep", device) -> "PromptGrid":
        chosen = [b for b, n in enumerate(step.lengths) if n > 1]
        lengths = [step.lengths[b] for b in chosen]
        sequences = torch.tensor(chosen, device=device)
        row_of = torch.full((len(step.lengths),), -1, dtype=torch.int64, device=device)
        row_of[sequences] = torch.arange(len(chosen), device=device)
        token = torch.nonzero(row_of[step.sequence] >= 0).flatten()
        last = step.last_positions[sequences]
        first = last - torch.tensor(lengths, device=device) + 1
        positions = torch.minimum(first[:, None] + torch.arange(max(lengths), device=device), last[:, None])
        return cls(chosen, sequences, token, row_of[step.sequence[token]], step.offset[token], positions, lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)


class BatchedLayer(CacheLayerMixin):
    """One layer of a :class:`BatchedPackedCache`: the pass's tokens are the B sequences' tokens one after another
    (``lengths[b]`` each, a batch of one row with no padding), sequence ``b``'s go to ``parts[b]`` (its own packed
    layer, its own tail). With an ``arena`` (:class:`LayerArena`) one indexed copy writes them all and attention
    reads all sequences in one call; without (one sequence, or too much padding), part by part."""

    is_sliding = False
    is_croppable = False

    def __init__(self, parts: list[PackedLayer], step: BatchStep, arena: LayerArena | None):
        self.is_initialized = True
        self.parts, self.step, self.arena = parts, step, arena
        # each sequence's slot in the arena; ``in_order``: sequence b in slot b, every slot taken
        order = [part.arena_slot[1] for part in parts] if arena is not None else []
        self.in_order = arena is not None and order == list(range(len(arena.keys)))
        self.slots = torch.tensor(order, device=arena.keys.device) if arena is not None else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: the parts are built complete."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Sequence ``b``'s span of the new states into part ``b``; the marker tags this layer (batched attention
        only)."""
        if key_states.shape[0] != 1 or key_states.shape[2] != sum(self.step.lengths):
            raise ValueError(f"a pass of {tuple(key_states.shape[:3:2])} (rows, tokens) over caches taking "
                             f"{self.step.lengths} tokens in one row")
        if self.arena is not None:
            self.arena.write(self.parts, self.slots, key_states, value_states, self.step)
        else:
            for span, part in zip(self.step.spans(), self.parts):
                part.update(key_states[:, :, span], value_states[:, :, span])
        return PackedStates.mark(key_states, self), PackedStates.mark(value_states, self)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Masks are built by transformers but unused by the packed attention (as in PackedLayer).
        return query_length, 0

    def get_seq_length(self) -> int:
        return max(part.get_seq_length() for part in self.parts)

    def get_max_length(self) -> int:
        return -1


#: Padding an arena may hold: at most this many rows for every live one (else the layer goes part by part).
MAX_ARENA_PADDING = 4


def use_arena(parts: list[PackedLayer]) -> bool:
    """One call over all sequences pays off from two of them, while the padding stays bounded (see BENCHMARKS.md,
    "In-process batching")."""
    sizes = [len(part.buffer_keys) for part in parts]
    return len(parts) > 1 and len(sizes) * max(sizes) <= MAX_ARENA_PADDING * sum(sizes)


class BatchedPackedCache(Cache):
    """B packed caches in one forward pass: sequence ``b`` appends ``lengths[b]`` tokens to cache ``b``
    (``kvzip_rag.batch``): questions being prefilled and answers taking their next token side by side.

    Layer ``i`` is the B caches' layer ``i`` side by side, each keeping its own variable-length heads and tail
    (in a shared :class:`LayerArena` when there are several), so a sequence's logits are those it would get
    alone. ``positions`` is where each sequence's first new token sits (its own cache's length: documents,
    composed or not, and its tail)."""

    def __init__(self, caches: list[PackedCache], lengths: list[int], num_query_heads: int):
        if not caches or len(lengths) != len(caches) or min(lengths) < 1:
            raise ValueError("a batch needs at least one cache, each with at least one new token")
        if len({len(cache.layers) for cache in caches}) != 1:
            raise ModelMismatchError("the caches of one batch were built by models with different layer counts")
        self.caches, self.lengths = caches, lengths
        first = caches[0].layers[0]
        step = BatchStep.build(lengths, self.positions, first.num_heads, first.buffer_keys.device)
        layers = []
        for i in range(len(caches[0].layers)):
            parts = [cache.layers[i] for cache in caches]
            for part, length in zip(parts, lengths):
                part.reserve(length)
            arena = LayerArena.of(parts, num_query_heads) if use_arena(parts) else None
            layers.append(BatchedLayer(parts, step, arena))
        super().__init__(layers=layers)

    @property
    def positions(self) -> list[int]:
        return [cache.get_seq_length() for cache in self.caches]


def ratio_keep(layers, info: CacheInfo, ratio: float, level: str) -> dict[int, torch.Tensor]:
    """Entries to keep per head (prefix included) of every compressed layer at ``ratio``: :func:`rows_at_ratio` on
    the stored scores, for packed and quantized layers alike (``layers`` have offsets, scores and compressed)."""
    prefix = info.prefix_length
    compressed = [i for i, layer in enumerate(layers) if layer.compressed]
    if not compressed:
        return {}
    scores, offsets = [], []
    for i in compressed:
        off = layers[i].offsets.tolist()
        rows = torch.cat([torch.arange(a + prefix, z) for a, z in zip(off[:-1], off[1:])])
        scores.append(layers[i].scores[rows])
        context_offsets = torch.zeros(len(off), dtype=torch.int64)
        context_offsets[1:] = (layers[i].counts - prefix).cumsum(0)
        offsets.append(context_offsets)
    budgets = rows_at_ratio(scores, offsets, info.context_length, ratio, level)
    return {i: budget + prefix for i, budget in zip(compressed, budgets)}


# ------------------------------------------------------------------------------------------------------------------
# Storage helpers (owned by the store work): the one CacheInfo constructor from stored fields, the shared template
# prefix split from / joined to a document's cache, and how many rows of each head a lower ratio keeps.

_INFO_TYPES = {
    "model_name": str, "model_fingerprint": str, "template_digest": str, "prefix_length": int,
    "context_length": int, "ratio": float, "level": str, "scorer": str, "full_nbytes": int,
}


def cache_info(fields, input_ids=()) -> CacheInfo:
    """The one way to rebuild a ``CacheInfo`` from stored fields (a blob header's strings, a row's columns, a
    dict): each field converted to its type, a missing one raising ``KeyError``, a malformed one ``ValueError``."""
    get = fields.get if isinstance(fields, dict) else (lambda name: getattr(fields, name))
    values = {}
    for name, kind in _INFO_TYPES.items():
        value = get(name)
        if value is None:
            raise KeyError(name)
        values[name] = kind(value)
    bits = fields.get("kv_bits") if isinstance(fields, dict) else getattr(fields, "kv_bits", None)
    return CacheInfo(**values, input_ids=tuple(int(i) for i in input_ids), kv_bits=int(bits) if bits else 16)


def info_fields(info: CacheInfo) -> dict[str, str]:
    """``info`` as strings (``input_ids`` left out), the inverse of :func:`cache_info`."""
    return {name: repr(float(getattr(info, name))) if kind is float else str(getattr(info, name))
            for name, kind in _INFO_TYPES.items()}


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of the template prefix in the compressed layers.

    Causal attention never lets the prefix see the document, so this is the same for every document of one model
    and template: the store keeps it once and joins it to each document's body on load. ``keys[i]``/``values[i]``
    belong to layer ``layers[i]``, ``(heads * prefix_length, head_dim)``, head after head, like ``PackedLayer``.
    Sliding-window layers are not covered: their window may or may not still hold the prefix, so they stay whole
    in the body.
    """

    model_fingerprint: str
    template_digest: str
    prefix_length: int
    layers: tuple[int, ...]
    keys: tuple[torch.Tensor, ...] = field(repr=False)
    values: tuple[torch.Tensor, ...] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in zip(self.keys, self.values))

    def to(self, device: torch.device | str) -> "PrefixKV":
        return replace(self, keys=tuple(k.to(device) for k in self.keys), values=tuple(v.to(device) for v in self.values))

    def matches(self, info: CacheInfo) -> bool:
        return (self.model_fingerprint, self.template_digest, self.prefix_length) == (
            info.model_fingerprint, info.template_digest, info.prefix_length)


def _prefix_rows(layer: PackedLayer, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row indices of every head's first ``prefix`` entries, and of the rest (the body)."""
    starts, counts = layer.offsets[:-1], layer.counts
    head_rows = [torch.arange(int(s), int(s) + int(c)) for s, c in zip(starts, counts)]
    return torch.cat([r[:prefix] for r in head_rows]), torch.cat([r[prefix:] for r in head_rows])


def _split_layer(layer: PackedLayer, prefix: int) -> tuple[torch.Tensor, torch.Tensor, PackedLayer]:
    if bool((layer.counts < prefix).any()):
        raise ValueError("a compressed layer keeps fewer entries than the prefix")
    head_rows, body_rows = _prefix_rows(layer, prefix)
    expected = torch.arange(prefix).repeat(layer.num_heads)
    if not torch.equal(layer.positions[head_rows].to(torch.int64), expected):
        raise ValueError("the first entries of a head are not the template prefix")
    dev = layer.keys.device
    offsets = torch.zeros_like(layer.offsets)
    offsets[1:] = (layer.counts - prefix).cumsum(0)
    body = PackedLayer(
        layer.keys[body_rows.to(dev)], layer.values[body_rows.to(dev)], offsets, layer.positions[body_rows],
        layer.scores[body_rows], layer.base_length, layer.compressed, layer.sliding_window,
    )
    return layer.keys[head_rows.to(dev)], layer.values[head_rows.to(dev)], body


def split_prefix(cache: "PackedCache") -> tuple[PrefixKV, list[PackedLayer]]:
    """The shared prefix and the document's own entries (compressed layers without their prefix rows, sliding
    layers whole). ``join_prefix`` puts them back together exactly."""
    info, keys, values, body, covered = cache.info, [], [], [], []
    for index, layer in enumerate(cache.layers):
        if not layer.compressed:
            body.append(layer)
            continue
        k, v, rest = _split_layer(layer, info.prefix_length)
        keys.append(k)
        values.append(v)
        body.append(rest)
        covered.append(index)
    prefix = PrefixKV(info.model_fingerprint, info.template_digest, info.prefix_length, tuple(covered),
                      tuple(keys), tuple(values))
    return prefix, body


def join_prefix(prefix: PrefixKV, body: list[PackedLayer], info: CacheInfo) -> "PackedCache":
    """A document's cache from the shared prefix and its body (the inverse of :func:`split_prefix`)."""
    if not prefix.matches(info):
        raise ModelMismatchError(
            f"the shared prefix was built by model fingerprint {prefix.model_fingerprint}, template "
            f"{prefix.template_digest}, {prefix.prefix_length} tokens; the document cache by "
            f"{info.model_fingerprint}, {info.template_digest}, {info.prefix_length} tokens"
        )
    covered = dict(zip(prefix.layers, zip(prefix.keys, prefix.values)))
    if sorted(covered) != [i for i, layer in enumerate(body) if layer.compressed]:
        raise ModelMismatchError("the shared prefix does not cover the document cache's compressed layers")
    p, layers = info.prefix_length, []
    for index, layer in enumerate(body):
        if index not in covered:
            layers.append(layer)
            continue
        pk, pv = covered[index]
        ks, vs, pos, sc = [], [], [], []
        head_pos = torch.arange(p, dtype=layer.positions.dtype)
        head_scores = torch.full((p,), float("inf"), dtype=layer.scores.dtype)
        for h, (a, z) in enumerate(zip(layer.offsets[:-1].tolist(), layer.offsets[1:].tolist())):
            ks += [pk[h * p : (h + 1) * p], layer.keys[a:z]]
            vs += [pv[h * p : (h + 1) * p], layer.values[a:z]]
            pos += [head_pos, layer.positions[a:z]]
            sc += [head_scores, layer.scores[a:z]]
        offsets = layer.offsets.clone()
        offsets[1:] += p * torch.arange(1, layer.num_heads + 1)
        layers.append(PackedLayer(torch.cat(ks), torch.cat(vs), offsets, torch.cat(pos), torch.cat(sc),
                                  layer.base_length, True, layer.sliding_window))
    return PackedCache(layers, info)


def rows_at_ratio(
    scores: list[torch.Tensor], offsets: list[torch.Tensor], context_length: int, ratio: float, level: str
) -> list[torch.Tensor]:
    """How many context rows of each head the compressed layers keep at ``ratio``/``level``, given each layer's
    context-only (prefix removed) ``scores`` and head ``offsets``, best first per head: what ``at_ratio`` keeps."""
    per_head = [[s[a:z] for a, z in zip(o[:-1].tolist(), o[1:].tolist())] for s, o in zip(scores, offsets)]
    budgets = allocate_budgets(per_head, context_length, ratio, level)
    return list(budgets.unbind(0))


def packed_fresh(cache: "PackedCache") -> "PackedCache":
    """A new cache sharing the (never mutated) packed tensors, with its own empty tails."""
    layers = [PackedLayer(x.keys, x.values, x.offsets, x.positions, x.scores, x.base_length, x.compressed,
                          x.sliding_window) for x in cache.layers]
    return PackedCache(layers, cache.info)
