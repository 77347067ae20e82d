"""Train the kvzip-fast gate of a model on KVzip's own scores over a calibration corpus.

For every calibration segment: one prefill, one KVzip scoring pass, and the segment's cached post-RoPE keys with
their log scores go into per-(layer, kv head) normal equations (a (head_dim+1)^2 matrix each, so memory does not
grow with the corpus). The gate is their ridge solution. The last ``holdout`` segments are not trained on: they
measure how well the gate ranks pairs (Spearman correlation with KVzip, per head and over all heads, and the
overlap of the pair-level kept sets at ratio 0.3), next to key-norm's ranking, and those figures are stored
in the gate's metadata.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import EmptyDocumentError, InvalidArgumentError
from ..models import KVzipModel
from ..prefill import PrefilledDocument, prefill_document
from .fast_gate import Gate
from .kvzip import KVzipScorer

Progress = Callable[[int, int], None]  # (segments done, total)
TEXT_SUFFIXES = (".txt", ".md")
LOG_FLOOR = 1e-8  # scores below this (underflowed attention) are all "never needed": same target


def read_corpus(folder: Path, model: KVzipModel, segment_tokens: int = 1024, max_segments: int = 10) -> list[str]:
    """Cut the ``.txt``/``.md`` files under ``folder`` (sorted, recursively) into segments of ``segment_tokens``
    tokens, at most ``max_segments`` of them, taken round-robin over the files so every file contributes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidArgumentError(f"calibration data folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file())
    limit = model.context_limit - len(model.encode(model.template.prefix)) - 8
    size = max(16, min(segment_tokens, limit))
    per_file = []
    for path in files:
        ids = model.encode(path.read_text(errors="replace"))
        per_file.append([ids[s : s + size] for s in range(0, len(ids), size) if len(ids[s : s + size]) >= size // 2])
    segments: list[str] = []
    for rank in range(max((len(p) for p in per_file), default=0)):
        for pieces in per_file:
            if rank < len(pieces) and len(segments) < max_segments:
                segments.append(model.tokenizer.decode(pieces[rank]))
    if not segments:
        raise EmptyDocumentError(f"no text to calibrate on: {folder} holds no .txt or .md file of >= {size // 2} "
                                 "tokens")
    return segments


def gate_inputs(document: PrefilledDocument, scores: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per compressed layer the context keys (kv_heads, tokens, head_dim), and the log KVzip scores."""
    keys = [document.context_keys(layer).float().cpu() for layer in document.compressed_layers]
    return keys, scores.clamp_min(LOG_FLOOR).log()


def fit_gate(model: KVzipModel, samples: Sequence[tuple[list[torch.Tensor], torch.Tensor]], layers: list[int],
             ridge: float = 1e-3) -> Gate:
    """Ridge regression of log score on [key, 1], one per (layer, kv head), from accumulated normal equations."""
    rows, heads, dim = len(layers), model.config.num_key_value_heads, samples[0][0][0].shape[-1]
    gram = torch.zeros(rows, heads, dim + 1, dim + 1, dtype=torch.float64)
    moment = torch.zeros(rows, heads, dim + 1, dtype=torch.float64)
    for keys, target in samples:
        for row, k in enumerate(keys):
            x = torch.cat([k.double(), torch.ones(*k.shape[:2], 1, dtype=torch.float64)], dim=-1)  # (H, n, d+1)
            gram[row] += x.transpose(1, 2) @ x
            moment[row] += (x.transpose(1, 2) @ target[row].double()[..., None])[..., 0]
    scale = gram.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    solution = torch.linalg.solve(gram + ridge * scale * torch.eye(dim + 1, dtype=torch.float64), moment)
    return Gate(model.fingerprint, list(layers), solution[..., :dim].float().contiguous(),
                solution[..., dim].float().contiguous())


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two 1-D tensors (average ranks for ties)."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        values, inverse, counts = torch.unique(x.double(), return_inverse=True, return_counts=True)
        ends = counts.cumsum(0).double()
        return ((ends - (counts.double() - 1) / 2))[inverse]

    ra, rb = ranks(a) - ranks(a).mean(), ranks(b) - ranks(b).mean()
    denominator = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denominator) if denominator else 0.0


def kept_overlap(truth: torch.Tensor, predicted: torch.Tensor, ratio: float = 0.3) -> float:
    """Fraction of KVzip's pair-level kept set (global top ``ratio``) that ``predicted`` keeps too."""
    k = max(1, round(ratio * truth.numel()))
    kept = truth.flatten().topk(k).indices
    mine = torch.zeros(truth.numel(), dtype=torch.bool)
    mine[predicted.flatten().topk(k).indices] = True
    return float(mine[kept].float().mean())


def agreement(truth: torch.Tensor, predicted: torch.Tensor) -> dict[str, float]:
    """How well ``predicted`` ranks like KVzip's ``truth`` (both (layers, heads, tokens))."""
    per_head = [spearman(t, p) for t, p in zip(truth.flatten(0, 1), predicted.flatten(0, 1))]
    return {"rho_per_head": sum(per_head) / len(per_head), "rho_global": spearman(truth.flatten(), predicted.flatten()),
            "kept_overlap_0.3": kept_overlap(truth, predicted)}


def calibrate(model: KVzipModel, texts: Sequence[str], holdout: int = 2, progress: Progress | None = None) -> Gate:
    """Score ``texts`` with KVzip and fit the gate on all but the last ``holdout`` of them (evaluated on those)."""
    if len(texts) <= holdout:
        raise InvalidArgumentError(f"need more than {holdout} calibration segments (the held-out ones), got "
                                   f"{len(texts)}")
    start = time.perf_counter()
    samples, layers, tokens = [], None, 0
    for done, text in enumerate(texts):
        document = prefill_document(model, text)
        layers = document.compressed_layers
        samples.append(gate_inputs(document, KVzipScorer().score(document)))
        tokens += document.context_length
        del document
        if progress:
            progress(done + 1, len(texts))
    train, test = samples[: len(samples) - holdout], samples[len(samples) - holdout :]
    gate = fit_gate(model, train, layers)
    mine, norm = [], []
    for keys, target in test:
        mine.append(agreement(target, gate.predict(keys).log()))
        norm.append(agreement(target, torch.stack([-k.norm(dim=-1) for k in keys])))
    meta = {"segments": len(texts), "holdout_segments": holdout, "tokens": tokens,
            "seconds": round(time.perf_counter() - start, 1)}
    for name, results in (("gate", mine), ("keynorm", norm)):
        for metric in results[0] if results else ():
            meta[f"heldout_{metric}_{name}"] = round(sum(r[metric] for r in results) / len(results), 4)
    gate.meta = {key: str(value) for key, value in meta.items()}
    return gate
