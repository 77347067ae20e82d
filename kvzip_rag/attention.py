"""Attention over the packed (variable length per kv head) cache, plugged into transformers' attention registry.

One registered function, ``"kvzip"``, serves every forward pass of a loaded model:

- with a ``PackedCache`` as the model's cache (its ``update`` hands the attention ``PackedStates``, tagged with the
  layer; ``kvzip_cache=<PackedCache>`` is still accepted) it attends over the packed layout, where every kv head
  is its own variable-length sequence (pure PyTorch on CPU, ``flash_attn_varlen_func`` on CUDA when installed);
- with ``kvzip_observer=<AttentionObserver>`` it also hands the post-RoPE queries and keys to the observer
  (scorers), with the log-sum-exp of each of the observer's key ranges when the split path below computed them;
- with ``kvzip_prefill=True`` (our own batch-1, unpadded prefill and scoring passes) on CPU it splits attention into
  "all past keys" and "causal among the new tokens" and merges the two by log-sum-exp, which keeps PyTorch's
  fused flash kernel instead of the masked math path that materialises the (queries x keys) matrix;
- otherwise it is plain SDPA, so full-cache decoding and any user call are transformers' own code.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from .cache import BatchedLayer, PackedStates

if TYPE_CHECKING:
    from .cache import PackedLayer

ATTENTION_NAME = "kvzip"


class AttentionObserver(ABC):
    """What a scorer hands the attention (``kvzip_observer=``): called in every layer of the pass it observes."""

    #: Past-key positions where the attention splits its softmax normalisers (CPU prefill path), so ``observe``
    #: receives the log-sum-exp of each range between cuts and can renormalise over a subset for free.
    key_cuts: tuple[int, ...] = ()

    @abstractmethod
    def observe(
        self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
        lse_parts: dict[tuple[int, int], torch.Tensor] | None,
    ) -> None:
        """Post-RoPE ``query`` (1, H, L, d) and ``key`` (1, Hkv, S, d) of one layer; ``lse_parts`` maps key ranges
        ``(start, end)`` to their log-sum-exp (1, H, L), or is None where the attention did not split."""


def register_attention() -> None:
    """Register the dispatcher and reuse SDPA's mask builder for it (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, kvzip_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, sdpa_mask)


def kvzip_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    kvzip_cache=None,
    kvzip_observer: AttentionObserver | None = None,
    kvzip_prefill: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(key, PackedStates) or kvzip_cache is not None:
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("attention logit soft-capping is not supported by the packed cache")
        layer = key.layer if isinstance(key, PackedStates) else kvzip_cache.layers[module.layer_idx]
        return packed_attention(query, layer, scaling), None
    if kvzip_prefill and query.device.type == "cpu" and not getattr(module, "sliding_window", None):
        cuts = kvzip_observer.key_cuts if kvzip_observer is not None else ()
        out, lse_parts = causal_attention_with_past(query, key, value, scaling, cuts)
        if kvzip_observer is not None:
            kvzip_observer.observe(module, query, key, lse_parts)
        return out.transpose(1, 2), None
    if kvzip_observer is not None:
        kvzip_observer.observe(module, query, key, None)
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def flash_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, scaling: float):
    """PyTorch's fused CPU flash kernel: (output (B, H, L, d), log-sum-exp (B, H, L)); heads must match."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, causal, scale=scaling)


def expand_kv(states: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """(B, Hkv, S, d) -> (B, H, S, d): each kv head serves its group of query heads (as transformers' repeat_kv)."""
    group = num_q_heads // states.shape[1]
    return states if group == 1 else states.repeat_interleave(group, dim=1)


def merge_partial(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention computed over disjoint key sets, given each part's output and log-sum-exp."""
    lse = torch.stack([part_lse for _, part_lse in parts]).logsumexp(0)
    return sum(out * torch.exp(part_lse - lse).unsqueeze(-1) for out, part_lse in parts)


def causal_attention_with_past(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, cuts: tuple[int, ...] = ()
) -> tuple[torch.Tensor, dict[tuple[int, int], torch.Tensor]]:
    """Attention of L new queries over [past keys (all visible), new keys (causal)]; returns (B, H, L, d).

    The past is computed in ranges split at ``cuts``; the log-sum-exp of every key range (including the new
    tokens' range) is returned too, so an observer can renormalise over a subset of keys for free (KVzip's
    restricted softmax).
    """
    batch, heads, length, dim = query.shape
    num_kv = key.shape[1]
    past = key.shape[2] - length
    # Past keys are visible to every query, so the query heads sharing a kv head can be stacked as one longer
    # query block: no copy of the keys per query head (GQA), same result.
    stacked = query.reshape(batch, num_kv, heads // num_kv * length, dim)
    bounds = sorted({0, past, *(c for c in cuts if 0 < c < past)})
    parts = {}
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            out, lse = flash_cpu(stacked, key[:, :, a:b], value[:, :, a:b], False, scaling)[:2]
            parts[(a, b)] = (out.reshape(query.shape), lse.reshape(batch, heads, length))
    parts[(past, past + length)] = flash_cpu(
        query, expand_kv(key[:, :, past:], heads), expand_kv(value[:, :, past:], heads), True, scaling
    )[:2]
    out = merge_partial(list(parts.values())) if len(parts) > 1 else parts[(past, past + length)][0]
    return out, {span: lse for span, (_, lse) in parts.items()}


@lru_cache(maxsize=1)
def _flash_varlen():
    """flash-attn is an optional CUDA extra: import it lazily, once."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def use_flash(query: torch.Tensor) -> bool:
    if os.environ.get("KVZIP_RAG_ATTENTION", "auto") == "torch":
        return False
    return query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None


def packed_attention(query: torch.Tensor, layer: "PackedLayer", scaling: float) -> torch.Tensor:
    """Attend ``query`` (1, H, L, d) over the layer's packed entries plus its appended tail; returns (1, L, H, d).

    The tail already holds the current L tokens (the cache's ``update`` ran first), so query i sits at tail index
    ``T - L + i`` and sees tail entries up to it; every packed entry precedes all queries in position.
    A ``BatchedLayer`` (B sequences one after another in one row, query ``(1, H, sum of lengths, d)``) attends each
    sequence's span over its own part, by the same two paths, so each sequence's output is the one it gets alone.
    """
    if isinstance(layer, BatchedLayer):
        if layer.arena is None:
            return torch.cat([packed_attention(query[:, :, span], part, scaling)
                              for span, part in zip(layer.step.spans(), layer.parts)], dim=1)
        if use_flash(query):
            return flash_batched_attention(query, layer, scaling)
        return torch_batched_attention(query, layer, scaling)
    if use_flash(query):
        out = flash_packed_attention(query, layer, scaling)
        if layer.evidence is not None and not layer.sliding_window:  # the one extra softmax (last query only)
            layer.evidence(layer, packed_probabilities(query[:, :, -1:], layer, scaling))
        return out
    return torch_packed_attention(query, layer, scaling)


def packed_probabilities(query: torch.Tensor, layer: "PackedLayer", scaling: float) -> torch.Tensor:
    """The attention probabilities of ``query`` (1, H, L, d) over the layer's buffer rows, ``(H * L, rows)``
    (query heads outer, float32): the softmax both attention paths compute, and what an evidence recorder reads."""
    _, num_q_heads, length, head_dim = query.shape
    meta = layer.row_meta(num_q_heads)
    q = query[0].reshape(num_q_heads * length, head_dim)
    if length == 1 and not layer.sliding_window:  # decoding: the maintained mask, fused into the GEMM
        logits = torch.addmm(meta.decode_bias, q, layer.buffer_keys.T, alpha=scaling)
    else:
        group = num_q_heads // layer.num_heads
        end = layer.base_length + layer.tail_length
        query_heads = torch.arange(num_q_heads, device=query.device).repeat_interleave(length) // group
        query_positions = torch.arange(end - length, end, device=query.device).repeat(num_q_heads)
        visible = (meta.heads[None, :] == query_heads[:, None]) & (meta.positions[None, :] <= query_positions[:, None])
        if layer.sliding_window:
            visible &= meta.positions[None, :] > query_positions[:, None] - layer.sliding_window
        logits = torch.mm(q, layer.buffer_keys.T).mul_(scaling).masked_fill_(~visible, float("-inf"))
    return torch.softmax(logits.float(), dim=-1)


def torch_packed_attention(query: torch.Tensor, layer: "PackedLayer", scaling: float) -> torch.Tensor:
    """CPU path: all heads at once over the layer's buffer as it is, no per-head loop and no copy.

    Every query head scores every buffer row in one GEMM and a mask keeps, per query, the rows of its own kv head
    that precede it (positions; reserved rows sit at ``NO_POSITION``) and fall inside a sliding window; a decoding
    step uses the mask the layer maintains (``RowMeta.decode_bias``), added inside the GEMM. Decoding is bound by
    reading the keys and values once, which this does; scoring other heads' rows is the price of having no loop.
    Measured fastest of the options tried (per-head loop, per-head fused kernel on views, padded batch, nested
    tensors): see BENCHMARKS.md.
    """
    _, num_q_heads, length, head_dim = query.shape
    probabilities = packed_probabilities(query, layer, scaling)
    if layer.evidence is not None and not layer.sliding_window:  # the last query's row of the same softmax
        layer.evidence(layer, probabilities.view(num_q_heads, length, -1)[:, -1])
    weights = probabilities.to(layer.buffer_values.dtype)
    out = torch.mm(weights, layer.buffer_values)  # (H * L, d)
    return out.reshape(num_q_heads, length, head_dim).transpose(0, 1).unsqueeze(0)


def varlen_arguments(layer: "PackedLayer", length: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``cu_seqlens_q``, ``cu_seqlens_k`` and ``max_seqlen_k`` that make ``flash_attn_varlen_func`` read the
    layer's buffer in place: each kv head's live rows are one sequence (its ``length`` queries), and the unused
    rows reserved between two heads form an empty-query sequence that nothing attends to."""
    starts, counts = layer.device_layout()  # already on the device: building these copies nothing from the host
    cu_k = torch.stack([starts, starts + counts + layer.tail_length], dim=1).flatten().to(torch.int32)
    cu_q = (torch.arange(2 * layer.num_heads, dtype=torch.int32, device=starts.device) + 1) // 2 * length
    # over every sequence, the reserved ones included (host-side counts: no device sync)
    longest = max(int(layer.live_lengths.max()), layer.room - layer.tail_length)
    return cu_q, cu_k, longest


def flash_packed_attention(query: torch.Tensor, layer: "PackedLayer", scaling: float) -> torch.Tensor:
    """CUDA path: one ``flash_attn_varlen_func`` call over the buffer as it is (kv heads as the batch, each
    with its group of query heads); see ``varlen_arguments``."""
    flash_attn_varlen_func = _flash_varlen()
    _, num_q_heads, length, head_dim = query.shape
    num_kv = layer.num_heads
    group = num_q_heads // num_kv
    q = query[0].reshape(num_kv, group, length, head_dim).permute(0, 2, 1, 3).reshape(num_kv * length, group, head_dim)
    cu_q, cu_k, max_k = varlen_arguments(layer, length)
    window = (layer.sliding_window - 1, 0) if layer.sliding_window else (-1, -1)
    out = flash_attn_varlen_func(
        q, layer.buffer_keys.unsqueeze(1), layer.buffer_values.unsqueeze(1), cu_q, cu_k, length, max_k,
        softmax_scale=scaling, causal=True, window_size=window,
    )
    return out.reshape(num_kv, length, group, head_dim).permute(1, 0, 2, 3).reshape(length, num_q_heads, head_dim)[None]


def torch_batched_attention(query: torch.Tensor, layer: BatchedLayer, scaling: float) -> torch.Tensor:
    """CPU path over a batch's arena: every sequence's last query in one batched GEMM over the arena's slots (the
    maintained decode mask, as ``packed_probabilities`` decoding), each sequence's query in its own slot (a free
    slot's zero query is computed and dropped); the pass's prompts (questions admitted in it) in one more call over
    their own slots (:func:`prompt_grid_attention`; padding every sequence's queries to the longest prompt would
    cost more). ``query`` ``(1, H, tokens, d)``; returns ``(1, tokens, H, d)``."""
    arena, step = layer.arena, layer.step
    q = query[0].transpose(0, 1) if step.single else query[0, :, step.last].transpose(0, 1)  # (B, H, d)
    last_positions = step.last_positions
    if not layer.in_order:  # to the slots
        q = q.new_zeros(len(arena.keys), *q.shape[1:]).index_copy_(0, layer.slots, q)
        last_positions = last_positions.new_zeros(len(arena.keys)).index_copy_(0, layer.slots, last_positions)
    logits = torch.baddbmm(arena.bias, q, arena.keys.transpose(1, 2), alpha=scaling)  # (slots, H, rows)
    window = layer.parts[0].sliding_window
    if window:
        hidden = arena.positions <= (last_positions - window)[:, None]
        logits.masked_fill_(hidden[:, None], float("-inf"))
    probabilities = torch.softmax(logits.float(), dim=-1)
    for part, length in zip(layer.parts, step.lengths):
        if part.evidence is not None and length == 1 and not window:  # a prompt's evidence: its own call below
            part.evidence(part, probabilities[part.arena_slot[1], :, :len(part.buffer_keys)])
    out = torch.bmm(probabilities.to(arena.values.dtype), arena.values)  # (slots, H, d)
    if not layer.in_order:  # back to the sequences
        out = out[layer.slots]
    if step.single:
        return out[None]
    result = out.new_empty(len(step.sequence), *out.shape[1:])
    result[step.last] = out
    grid = step.prompts
    if len(grid.lengths) * query.shape[1] * grid.longest * arena.rows <= PROMPT_GRID_ELEMENTS:
        result[grid.token] = prompt_grid_attention(query, layer, scaling)
    else:  # one long prompt would make the padded grid mostly padding: each prompt over its own cache
        for span, part, length in zip(step.spans(), layer.parts, step.lengths):
            if length > 1:
                result[span] = torch_packed_attention(query[:, :, span], part, scaling)[0]
    return result[None]


#: Largest (prompts x query heads x longest prompt x arena rows) attention grid of the pass's prompts computed as one
#: padded call (32 MiB of float32 logits); beyond it each prompt attends over its own cache.
PROMPT_GRID_ELEMENTS = 1 << 23


def prompt_grid_attention(query: torch.Tensor, layer: BatchedLayer, scaling: float) -> torch.Tensor:
    """Every prompt of a pass (questions arriving together) over its own cache in one padded call: each prompt's
    queries, kv head by kv head (its group of query heads), over that kv head's live rows in the prompt's arena
    slot, gathered and padded to the longest such range, with a causal mask by position (a prompt token does not
    see the ones after it; a sliding window hides the old ones). Prompts are compute-bound: scoring only the own
    kv head's rows costs a third of scoring the whole slot (SmolLM2: 3 kv heads), and one call replaces one per
    prompt. Returns the prompt tokens' outputs ``(prompt tokens, query heads, d)``."""
    arena, grid = layer.arena, layer.step.prompts
    slots = grid.sequences if layer.in_order else layer.slots[grid.sequences]
    parts = [layer.parts[b] for b in grid.members]
    _, num_q_heads, _, head_dim = query.shape
    num_kv = parts[0].num_heads
    group, prompts, longest = num_q_heads // num_kv, len(parts), grid.longest
    # each prompt's kv heads' live rows (packed entries, then the tail with this pass's tokens) within its slot
    counts = torch.stack([part.device_layout()[1] for part in parts])  # (prompts, kv heads)
    live = counts + torch.tensor([part.tail_length for part in parts], device=counts.device)[:, None]
    span = int(live.max())
    index = (arena.tail_start[slots] - counts)[..., None] + torch.arange(span, device=counts.device)
    index.clamp_(max=arena.rows - 1)  # past a head's live rows: masked below
    flat = slots[:, None, None] * arena.rows + index  # (prompts, kv heads, span)
    keys = arena.keys.view(-1, head_dim)[flat].view(prompts * num_kv, span, head_dim)
    values = arena.values.view(-1, arena.values.shape[-1])[flat].view(prompts * num_kv, span, -1)
    row_positions = arena.positions.view(-1)[flat][:, :, None]  # (prompts, kv heads, 1, span)
    hidden = (torch.arange(span, device=counts.device) >= live[..., None])[:, :, None]
    hidden = hidden | (row_positions > grid.positions[:, None, :, None])  # (prompts, kv heads, longest, span)
    window = parts[0].sliding_window
    if window:
        hidden |= row_positions <= (grid.positions - window)[:, None, :, None]
    cells = query.new_zeros(prompts, longest, num_q_heads, head_dim)
    cells[grid.row, grid.column] = query[0, :, grid.token].transpose(0, 1)
    q = cells.view(prompts, longest, num_kv, group, head_dim).permute(0, 2, 1, 3, 4)
    logits = torch.bmm(q.reshape(prompts * num_kv, longest * group, head_dim), keys.transpose(1, 2)).mul_(scaling)
    logits = logits.view(prompts, num_kv, longest, group, span).masked_fill_(hidden[:, :, :, None], float("-inf"))
    probabilities = torch.softmax(logits.float(), dim=-1)  # (prompts, kv heads, longest, group, span)
    if not window:
        for row, (part, length) in enumerate(zip(parts, grid.lengths)):
            if part.evidence is not None:  # its prompt's last query over its buffer rows, as the other paths give
                size = len(part.buffer_keys)
                last = probabilities[row, :, length - 1]  # (kv heads, group, span)
                rows = index[row].clamp(max=size - 1)[:, None].expand_as(last)
                spread = last.new_zeros(num_kv, group, size).scatter_add_(2, rows, last)
                part.evidence(part, spread.view(num_q_heads, size))
    out = torch.bmm(probabilities.to(values.dtype).view(prompts * num_kv, longest * group, span), values)
    out = out.view(prompts, num_kv, longest, group, -1).permute(0, 2, 1, 3, 4)
    return out.reshape(prompts, longest, num_q_heads, -1)[grid.row, grid.column]


def flash_batched_attention(query: torch.Tensor, layer: BatchedLayer, scaling: float) -> torch.Tensor:
    """CUDA path: one ``flash_attn_varlen_func`` call over the arena as it is, every (sequence, kv head) live
    range one segment with that sequence's queries, in the arena's slot order (the padding, reserved rows and free
    slots between them empty-query segments, as in ``varlen_arguments``); prompts and single tokens alike (causal,
    aligned to each segment's end)."""
    flash_attn_varlen_func = _flash_varlen()
    arena, step = layer.arena, layer.step
    _, num_q_heads, tokens, head_dim = query.shape
    num_kv = layer.parts[0].num_heads
    group = num_q_heads // num_kv
    device = query.device
    order = sorted(range(len(layer.parts)), key=lambda b: layer.parts[b].arena_slot[1])  # host-side: no sync
    parts = [layer.parts[b] for b in order]
    slot_list = [part.arena_slot[1] for part in parts]
    lengths = torch.tensor([step.lengths[b] for b in order], device=device)
    # Queries ordered by (slot, kv head, token): kv head h of the sequence in that slot takes its tokens.
    per_segment = lengths.repeat_interleave(num_kv)  # (B * kv heads,)
    heads = torch.arange(num_kv, device=device).repeat(len(parts)).repeat_interleave(per_segment)
    first = (step.last[torch.tensor(order, device=device)] - lengths + 1).repeat_interleave(num_kv)
    segment_start = per_segment.cumsum(0) - per_segment
    ranks = torch.arange(num_kv * sum(step.lengths), device=device) - segment_start.repeat_interleave(per_segment)
    token = first.repeat_interleave(per_segment) + ranks
    q = query[0].view(num_kv, group, tokens, head_dim)[heads, :, token]  # (queries, group, d)
    tails = torch.tensor([part.tail_length for part in parts], device=device)
    slots = torch.tensor(slot_list, device=device)
    counts = torch.stack([part.device_layout()[1] for part in parts])
    starts = slots[:, None] * arena.rows + arena.tail_start[slots] - counts  # (B, kv heads): first rows, flat
    # an empty-query segment from row 0 to the first head, and between every two heads
    cu_k = torch.cat([starts.new_zeros(1), torch.stack([starts, starts + counts + tails[:, None]], dim=-1).flatten()])
    cu_q = torch.cat([per_segment.new_zeros(2), torch.stack([per_segment, torch.zeros_like(per_segment)], -1)
                      .flatten()[:-1].cumsum(0)])
    # the longest segment: a slot, or the free slots between two taken ones with the padding around them
    gaps = [b - a for a, b in zip([-1] + slot_list, slot_list)]
    window = (layer.parts[0].sliding_window - 1, 0) if layer.parts[0].sliding_window else (-1, -1)
    out = flash_attn_varlen_func(
        q, arena.keys.view(-1, 1, head_dim), arena.values.view(-1, 1, arena.values.shape[-1]),
        cu_q.to(torch.int32), cu_k.to(torch.int32), max(step.lengths), arena.rows * max(gaps),
        softmax_scale=scaling, causal=True, window_size=window,
    )
    result = out.new_empty(num_kv, tokens, group, head_dim)
    result[heads, token] = out
    for part, span in zip(layer.parts, step.spans()):  # host-side spans: no device sync
        if part.evidence is not None and not part.sliding_window:  # the one extra softmax (last query only)
            part.evidence(part, packed_probabilities(query[:, :, span.stop - 1:span.stop], part, scaling))
    return result.permute(1, 0, 2, 3).reshape(tokens, num_q_heads, head_dim)[None]
