"""Pictures of what KVzip kept: a heatmap of per-(layer, kv head) budgets and an HTML view of the document.

Both are computed from a :class:`~kvzip_rag.PackedCache` alone: ``head_budgets()`` for the heatmap, and for the
HTML view the original ``positions`` of the entries each compressed (layer, head) kept, counted per context token
and divided by the number of (layer, head) pairs. A token shaded dark was kept by nearly every head; a pale one
survives in few or none.

    >>> from kvzip_rag.visualize import draw_budget_heatmap, write_token_html
    >>> draw_budget_heatmap(cache, "budgets.png")
    >>> write_token_html([cache], tokenizer, "kept.html")
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .cache import PackedCache
from .extras import pyplot


def budget_fractions(cache: PackedCache) -> torch.Tensor:
    """Fraction of the context each (compressed layer, kv head) kept, shape (compressed layers, kv heads)."""
    return cache.head_budgets().float() / max(cache.info.context_length, 1)


def token_survival(cache: PackedCache) -> torch.Tensor:
    """For every context token, the fraction of (compressed layer, kv head) pairs that kept its KV, in [0, 1]."""
    prefix, length = cache.info.prefix_length, cache.info.context_length
    counts = torch.zeros(length, dtype=torch.float64)
    pairs = 0
    for index in cache.compressed_layers:
        layer = cache.layers[index]
        positions = layer.positions.to(torch.int64).cpu()
        context = positions[(positions >= prefix) & (positions < prefix + length)] - prefix
        counts += torch.bincount(context, minlength=length).to(torch.float64)
        pairs += layer.num_heads
    return (counts / max(pairs, 1)).float()


def _token_pieces(tokenizer, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Decode ids into text pieces, one per token where possible.

    Byte-level tokenizers can split one character over several tokens; such tokens are merged into one piece, and
    the piece lists all their indices so its shade is their mean.
    """
    pieces: list[tuple[str, list[int]]] = []
    pending: list[int] = []
    for i in range(len(ids)):
        pending.append(i)
        text = tokenizer.decode([ids[j] for j in pending], skip_special_tokens=False)
        if "\ufffd" in text and i + 1 < len(ids) and len(pending) < 8:
            continue
        pieces.append((text, pending))
        pending = []
    return pieces


# Colour scale for kept fractions: matplotlib's YlGnBu sampled at 0, 0.1, ..., 1 (pale yellow -> deep blue).
_SCALE = [
    (255, 255, 217), (241, 250, 186), (214, 239, 179), (171, 222, 183), (115, 200, 189), (64, 181, 196),
    (36, 152, 193), (32, 114, 177), (35, 77, 160), (31, 47, 135), (8, 29, 88),
]


def _shade(value: float) -> str:
    """Background colour for a kept fraction: pale yellow (kept by no head) to deep blue (kept by every head)."""
    position = min(max(value, 0.0), 1.0) * (len(_SCALE) - 1)
    low = min(int(position), len(_SCALE) - 2)
    t = position - low
    r, g, b = (round(a + (c - a) * t) for a, c in zip(_SCALE[low], _SCALE[low + 1]))
    return f"rgb({r},{g},{b})"


_CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, sans-serif; margin: 2rem auto; max-width: 60rem; color: #222; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
.meta { color: #555; font-size: 0.9rem; }
.doc { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 0.92rem; line-height: 1.9;
       white-space: pre-wrap; word-wrap: break-word; border: 1px solid #ddd; padding: 1rem; border-radius: 6px; }
.doc span { border-radius: 2px; }
mark { background: #ffd54f; }
.legend { display: flex; align-items: center; gap: 0.5rem; font-size: 0.85rem; margin: 0.5rem 0 1rem; }
.legend .bar { width: 16rem; height: 0.9rem; border: 1px solid #ccc; background: linear-gradient(to right, GRADIENT); }
""".replace("GRADIENT", ", ".join(f"rgb{c}" for c in _SCALE))


def token_html(cache: PackedCache, tokenizer) -> str:
    """The ``<div>`` of one cache's context, each token a ``<span>`` shaded by its kept fraction."""
    survival = token_survival(cache).tolist()
    prefix = cache.info.prefix_length
    ids = list(cache.info.input_ids[prefix : prefix + cache.info.context_length])
    if len(ids) != len(survival):
        raise ValueError("the cache does not carry its input ids; cannot draw the token view")
    spans = []
    for text, indices in _token_pieces(tokenizer, ids):
        value = sum(survival[i] for i in indices) / len(indices)
        colour = "#fff" if value > 0.5 else "#222"
        spans.append(
            f'<span style="background:{_shade(value)};color:{colour}" title="kept by {value:.0%} of (layer, head) '
            f'pairs">{html.escape(text)}</span>'
        )
    return '<div class="doc">' + "".join(spans) + "</div>"


def evidence_html(question: str, answer: str, citations: Sequence, texts: dict[int, str]) -> str:
    """An answer and the stored segment texts (``segment index -> text``) it cites, each cited sentence marked
    with its share of the evidence (``citations``: :class:`~kvzip_rag.answers.Citation` s of one document)."""
    parts = [f"<h2>Evidence for: {html.escape(question)}</h2>", f'<p class="meta">answer: {html.escape(answer)}</p>']
    for index, text in texts.items():
        cited = sorted((c for c in citations if c.segment_index == index), key=lambda c: c.start)
        if not cited:
            continue
        pieces, cursor = [], 0
        for c in cited:
            pieces += [html.escape(text[cursor : c.start]),
                       f'<mark title="{c.weight:.0%} of the evidence">{html.escape(text[c.start : c.end])}</mark>']
            cursor = c.end
        pieces.append(html.escape(text[cursor:]))
        parts.append(f'<p class="meta">segment {index}</p><div class="doc">{"".join(pieces)}</div>')
    return "\n".join(parts)


def write_token_html(
    caches: Sequence[PackedCache], tokenizer, path: str | os.PathLike, title: str = "What KVzip kept",
    labels: Sequence[str] | None = None, evidence: str = "",
) -> Path:
    """Write an HTML page showing every cache's context (e.g. the segments of one document), tokens shaded;
    ``evidence`` (:func:`evidence_html`) goes first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>{html.escape(title)}</h1>", evidence]
    body.append(
        '<div class="legend">kept by no head <span class="bar"></span> kept by every (layer, kv head) pair</div>'
    )
    for number, cache in enumerate(caches):
        info = cache.info
        label = labels[number] if labels else f"segment {number}"
        body.append(f"<h2>{html.escape(label)}</h2>")
        survival = token_survival(cache)
        dropped = float((survival == 0).float().mean()) if len(survival) else 0.0
        body.append(
            f'<p class="meta">{info.context_length} tokens · ratio {info.ratio:g} · level {html.escape(info.level)} · '
            f"scorer {html.escape(info.scorer)} · model {html.escape(info.model_name)} · "
            f"{cache.nbytes / 1e6:.2f} MB kept of {cache.full_nbytes / 1e6:.2f} MB · "
            f"per token: median {float(survival.median()) if len(survival) else 0:.0%} of heads, "
            f"{dropped:.0%} of tokens dropped by every head</p>"
        )
        body.append(token_html(cache, tokenizer))
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    path.write_text(page, encoding="utf-8")
    return path


def draw_budget_heatmap(
    caches: PackedCache | Sequence[PackedCache], path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write a PNG heatmap of the fraction of context each (layer, kv head) kept.

    Several caches (segments of one document) are averaged, weighted by their context length.
    """
    plt = pyplot()
    caches = [caches] if isinstance(caches, PackedCache) else list(caches)
    if not caches:
        raise ValueError("no cache to draw")
    weights = torch.tensor([c.info.context_length for c in caches], dtype=torch.float32)
    fractions = torch.stack([budget_fractions(c) for c in caches])
    grid = (fractions * weights[:, None, None]).sum(0) / weights.sum()
    layers = caches[0].compressed_layers
    info = caches[0].info
    n_layers, n_heads = grid.shape

    width = min(max(5.5, 3.0 + 0.55 * n_heads), 14)
    height = min(max(3.5, 0.28 * n_layers + 1.8), 16)
    fig, ax = plt.subplots(figsize=(width, height), dpi=120)
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("kv head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    step = max(1, n_layers // 16)
    ax.set_yticks(range(0, n_layers, step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, n_layers, step)])
    if n_layers * n_heads <= 160:
        for row in range(n_layers):
            for col in range(n_heads):
                value = float(grid[row, col])
                ax.text(col, row, f"{value:.0%}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")
    bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.04)
    bar.set_label("fraction of context kept")
    tokens = int(weights.sum())
    kept = float((fractions.mean(dim=(1, 2)) * weights).sum() / weights.sum())
    heading = title or "KV budget per (layer, kv head)"
    ax.set_title(
        f"{heading}\n{info.level} level, ratio {info.ratio:g}: {kept:.0%} kept of {tokens} tokens",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
