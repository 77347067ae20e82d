"""Attention over the packed (variable length per kv head) cache, plugged into transformers' attention registry.

One registered function, ``"kvzip"``, serves every forward pass of a loaded model:

- with ``kvzip_cache=<PackedCache>`` in the forward kwargs it attends over the packed layout, where every kv head
  is its own variable-length sequence (pure PyTorch on CPU, ``flash_attn_varlen_func`` on CUDA when installed);
- with ``kvzip_observer=<callable>`` it also hands the post-RoPE queries and keys to the observer (scorers),
  with the log-sum-exp of each key range when the split path below computed them;
- with ``kvzip_prefill=True`` (our own batch-1, unpadded prefill and scoring passes) on CPU it splits attention into
  "all past keys" and "causal among the new tokens" and merges the two by log-sum-exp, which keeps PyTorch's
  fused flash kernel instead of the masked math path that materialises the (queries x keys) matrix;
- otherwise it is plain SDPA, so full-cache decoding and any user call are transformers' own code.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .cache import PackedLayer

ATTENTION_NAME = "kvzip"


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
    scaling: float | None = None,
    dropout: float = 0.0,
    kvzip_cache=None,
    kvzip_observer=None,
    kvzip_prefill: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    if kvzip_cache is not None:
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("attention logit soft-capping is not supported by the packed cache")
        layer = kvzip_cache.layers[module.layer_idx]
        return packed_attention(query, layer, scaling), None
    if kvzip_prefill and query.device.type == "cpu" and not getattr(module, "sliding_window", None):
        cuts = getattr(kvzip_observer, "key_cuts", ())
        out, lse_parts = causal_attention_with_past(query, key, value, scaling, cuts)
        if kvzip_observer is not None:
            kvzip_observer(module, query, key, lse_parts)
        return out.transpose(1, 2), None
    if kvzip_observer is not None:
        kvzip_observer(module, query, key, None)
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
    """
    if use_flash(query):
        return _flash_packed_attention(query, layer, scaling)
    return torch_packed_attention(query, layer, scaling)


def _query_positions(layer: "PackedLayer", length: int, device) -> torch.Tensor:
    tail = layer.tail_length
    return torch.arange(layer.base_length + tail - length, layer.base_length + tail, device=device)


def torch_packed_attention(query: torch.Tensor, layer: "PackedLayer", scaling: float) -> torch.Tensor:
    """Reference path: per kv head, one softmax over [its packed keys, the tail], no padding to a common length.

    Heads with equal budgets (ratio 1.0, uniform level, sliding layers) are computed as one batch; otherwise
    head by head over each head's contiguous slice.
    """
    _, num_q_heads, length, head_dim = query.shape
    num_kv = layer.num_heads
    group = num_q_heads // num_kv
    q = query[0].reshape(num_kv, group * length, head_dim)
    tail_k, tail_v = layer.tail_keys[0], layer.tail_values[0]  # (Hkv, T, d)
    tail = tail_k.shape[1]
    q_pos = _query_positions(layer, length, query.device)
    tail_pos = torch.arange(layer.base_length, layer.base_length + tail, device=query.device)
    visible_tail = tail_pos[None, :] <= q_pos[:, None]  # (L, T)
    window = layer.sliding_window
    if window:
        visible_tail &= tail_pos[None, :] > q_pos[:, None] - window
    visible_tail = visible_tail.repeat(group, 1)  # rows ordered (group, L) like q

    def attend(heads: slice, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Heads ``heads`` attending over their packed (h, c, d) entries and the tail."""
        qh = q[heads]
        packed_logits = (qh @ keys.transpose(1, 2)) * scaling
        if window:
            visible = (positions.to(query.device)[:, None, :] > q_pos[None, :, None] - window).repeat(1, group, 1)
            packed_logits = packed_logits.masked_fill(~visible, float("-inf"))
        tail_logits = ((qh @ tail_k[heads].transpose(1, 2)) * scaling).masked_fill(~visible_tail, float("-inf"))
        weights = torch.softmax(torch.cat([packed_logits, tail_logits], dim=-1).float(), dim=-1).to(values.dtype)
        count = keys.shape[1]
        return weights[..., :count] @ values + weights[..., count:] @ tail_v[heads]

    if layer.equal_count is not None:
        shape = (num_kv, layer.equal_count, head_dim)
        out = attend(slice(None), layer.keys.view(shape), layer.values.view(shape),
                     layer.positions.view(num_kv, layer.equal_count))
    else:
        out = query.new_empty(num_kv, group * length, head_dim)
        offsets = layer.offsets.tolist()
        for head in range(num_kv):
            start, end = offsets[head], offsets[head + 1]
            out[head] = attend(slice(head, head + 1), layer.keys[None, start:end], layer.values[None, start:end],
                               layer.positions[None, start:end])[0]
    return out.reshape(num_q_heads, length, head_dim).transpose(0, 1).unsqueeze(0)


def _flash_packed_attention(query: torch.Tensor, layer: "PackedLayer", scaling: float) -> torch.Tensor:
    """CUDA path: each kv head is one sequence of a varlen batch (its group of query heads attends to it)."""
    flash_attn_varlen_func = _flash_varlen()
    _, num_q_heads, length, head_dim = query.shape
    num_kv = layer.num_heads
    group = num_q_heads // num_kv
    q = query[0].reshape(num_kv, group, length, head_dim).permute(0, 2, 1, 3).reshape(num_kv * length, group, head_dim)
    offsets = layer.offsets.tolist()
    keys, values, lengths = [], [], []
    for head in range(num_kv):
        start, end = offsets[head], offsets[head + 1]
        keys += [layer.keys[start:end], layer.tail_keys[0, head]]
        values += [layer.values[start:end], layer.tail_values[0, head]]
        lengths.append(end - start + layer.tail_length)
    k = torch.cat(keys).unsqueeze(1)
    v = torch.cat(values).unsqueeze(1)
    cu_k = torch.zeros(num_kv + 1, dtype=torch.int32, device=query.device)
    cu_k[1:] = torch.tensor(lengths, device=query.device).cumsum(0)
    cu_q = torch.arange(0, (num_kv + 1) * length, length, dtype=torch.int32, device=query.device)
    window = (layer.sliding_window - 1, 0) if layer.sliding_window else (-1, -1)
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, length, max(lengths), softmax_scale=scaling, causal=True, window_size=window
    )
    return out.reshape(num_kv, length, group, head_dim).permute(1, 0, 2, 3).reshape(length, num_q_heads, head_dim)[None]
