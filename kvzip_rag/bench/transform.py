"""What transform coding (KLT + adaptive bits, KVTC's idea) would give stored caches (issue #25), measured before
building a blob format for it.

Per (layer, kv head) and for keys and values apart, a codec calibrated once per model on text the measurement
never uses (the Paul Graham essays):

- **keys with RoPE undone** (rotated back by each entry's position, re-applied on decode): their rotation depends
  on the position, the content does not;
- a **weighted KLT**: the error that matters is not the key/value error itself but what attention reads of it, so
  coefficients are taken in the metric ``M``: for keys the queries' energy per RoPE plane (plane-averaged, as
  the relative rotation averages it), for values ``W_o^T W_o`` over the query heads that read the kv head. With
  ``W = M^(1/2)``, ``c = (x - mean) W U`` where ``U`` diagonalises the covariance of ``(x - mean) W``; decode
  ``x = c U^T W^-1 + mean``;
- **bits per component by reverse water-filling** (greedy: each extra bit to the component whose measured
  distortion drops most), so a budget of e.g. 2 bits per element on average gives the strong components 4-6 bits
  and the weak ones none (they decode to the mean);
- a **uniform quantizer per component** whose clip range is calibrated (a Gaussian-optimal step scaled by 0.8, 1
  or 1.25, whichever measured best): nothing per entry or per group is stored beside the codes.

Entries stay independent, so a lower-ratio load would still read a prefix of each head; the never-evicted prefix
is not coded. Bytes are estimated, not written: the codes (bit-packed, ``budget * 2 * head_dim / 8`` bytes per
entry and head) plus what the K4V2 blob of the same cache stores beside its keys and values (positions, scores,
offsets, input ids, header). Run::

    python -m kvzip_rag.bench.transform --docs 24 --questions-per-doc 13 --out transform.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

GAUSSIAN_CLIP = (1.596, 1.99, 2.34, 2.68, 3.0, 3.33, 3.67, 4.0)  # clip / sigma of the MSE-best uniform quantizer
CLIP_SCALES = (0.8, 1.0, 1.25)
MAX_BITS = len(GAUSSIAN_CLIP)
METRIC_FLOOR = 1e-4  # eigenvalues of M below this fraction of its largest are raised to it (W stays invertible)


def uniform_quantize(c: torch.Tensor, bits: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """``c`` (rows, components) through a midrise uniform quantizer of ``2**bits[j]`` levels on ``[-clip[j],
    clip[j]]`` per component (0 bits: 0, the mean)."""
    levels = 2.0 ** bits.float()
    step = 2 * clip / levels
    code = torch.floor(c / step + levels / 2).clamp(torch.zeros_like(levels), levels - 1)
    return torch.where(bits > 0, (code + 0.5 - levels / 2) * step, torch.zeros_like(c))


def allocate(distortion: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Bits per component (greedy reverse water-filling): each of ``total_bits`` goes to the component whose
    distortion drops most with it. ``distortion`` (components, MAX_BITS + 1) must not increase along a row."""
    bits = torch.zeros(distortion.shape[0], dtype=torch.long)
    for _ in range(total_bits):
        nxt = (bits + 1).clamp(max=distortion.shape[1] - 1)
        gain = distortion.gather(1, bits[:, None])[:, 0] - distortion.gather(1, nxt[:, None])[:, 0]
        gain[bits >= distortion.shape[1] - 1] = -1.0
        bits[int(gain.argmax())] += 1
    return bits


@dataclass
class ComponentCodec:
    """The calibrated transform of one (layer, kv head, keys or values)."""

    mean: torch.Tensor  # (d,)
    encode_matrix: torch.Tensor  # W U (d, d)
    decode_matrix: torch.Tensor  # U^T W^-1 (d, d)
    distortion: torch.Tensor  # (d, MAX_BITS + 1): mean squared coefficient error at each bit count
    clip: torch.Tensor  # (d, MAX_BITS + 1): the clip range that measured best at each bit count

    @classmethod
    def fit(cls, x: torch.Tensor, metric: torch.Tensor) -> "ComponentCodec":
        """From calibration rows ``x`` (rows, d) and the error metric ``metric`` (d, d, symmetric PSD)."""
        lam, vec = torch.linalg.eigh(metric.double())
        lam = lam.clamp(min=float(lam.max()) * METRIC_FLOOR)
        root, inverse_root = (vec * lam.sqrt()) @ vec.T, (vec / lam.sqrt()) @ vec.T
        mean = x.double().mean(0)
        y = (x.double() - mean) @ root
        var, basis = torch.linalg.eigh(y.T @ y / len(y))
        basis = basis[:, var.argsort(descending=True)]
        c = (y @ basis).float()
        sigma = c.std(0).clamp(min=1e-8)
        d = c.shape[1]
        distortion, clip = torch.zeros(d, MAX_BITS + 1), torch.zeros(d, MAX_BITS + 1)
        distortion[:, 0] = (c**2).mean(0)
        for b in range(1, MAX_BITS + 1):
            bits = torch.full((d,), b)
            tried = [GAUSSIAN_CLIP[b - 1] * s * sigma for s in CLIP_SCALES]
            errors = torch.stack([((uniform_quantize(c, bits, t) - c) ** 2).mean(0) for t in tried])
            best = errors.argmin(0)
            distortion[:, b] = errors.min(0).values
            clip[:, b] = torch.stack(tried).gather(0, best[None])[0]
        return cls(mean.float(), (root @ basis).float(), (basis.T @ inverse_root).float(),
                   torch.cummin(distortion, 1).values, clip)

    def code(self, x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """``x`` (rows, d) encoded and decoded with ``bits`` per component (what a load would give back)."""
        clip = self.clip.gather(1, bits[:, None])[:, 0]
        c = (x.float() - self.mean) @ self.encode_matrix
        return uniform_quantize(c, bits, clip) @ self.decode_matrix + self.mean


class RopeFrame:
    """Keys rotated back to position 0 and forward again, with the model's own rotary module."""

    def __init__(self, model):
        decoder = model.model.get_decoder()
        self.rotary = decoder.rotary_emb
        self.apply = sys.modules[type(decoder).__module__].apply_rotary_pos_emb

    def _cos_sin(self, keys: torch.Tensor, positions: torch.Tensor):
        return self.rotary(keys.float()[None, None], positions.long()[None])

    def undo(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(keys, positions)
        return self.apply(keys.float()[None, None], keys.float()[None, None], cos, -sin)[1][0, 0]

    def redo(self, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self._cos_sin(keys, positions)
        return self.apply(keys.float()[None, None], keys.float()[None, None], cos, sin)[1][0, 0]


def coded_rows(cache):
    """(layer, head, rows) of every head's entries a codec codes: all but the never-evicted prefix."""
    prefix = cache.info.prefix_length
    for index, layer in enumerate(cache.layers):
        skip = prefix if layer.compressed else 0
        offsets = layer.offsets.tolist()
        for head in range(len(offsets) - 1):
            yield index, head, slice(min(offsets[head] + skip, offsets[head + 1]), offsets[head + 1])


class TransformCodec:
    """Every (layer, kv head, keys/values) codec of one model, calibrated on ``texts``."""

    def __init__(self, model, texts: list[str]):
        from kvzip_rag.bench.runner import PreparedDocument

        self.frame = RopeFrame(model)
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        group = heads // kv_heads
        layers = model.model.get_decoder().layers
        queries = [torch.zeros(kv_heads, self.head_dim, self.head_dim, dtype=torch.float64) for _ in layers]

        def watch(index):
            def hook(module, args, out):  # the queries' second moment per kv head, summed over its query heads
                q = out.detach().double().reshape(-1, kv_heads, group, self.head_dim)
                queries[index] += torch.einsum("tgri,tgrj->gij", q, q)
            return hook

        hooks = [layer.self_attn.q_proj.register_forward_hook(watch(i)) for i, layer in enumerate(layers)]
        samples: dict[tuple[int, int, str], list[torch.Tensor]] = {}
        try:
            for text in texts:
                cache, _ = PreparedDocument(model, text).base("full")
                for index, head, rows in coded_rows(cache):
                    layer = cache.layers[index]
                    keys = self.frame.undo(layer.keys[rows], layer.positions[rows])
                    samples.setdefault((index, head, "k"), []).append(keys)
                    samples.setdefault((index, head, "v"), []).append(layer.values[rows].float())
        finally:
            for hook in hooks:
                hook.remove()
        self.codecs: dict[tuple[int, int, str], ComponentCodec] = {}
        for (index, head, kind), parts in samples.items():
            x = torch.cat(parts)  # every row: fits on random subsets of 2,500 moved the NLL by up to 0.07 nats
            if kind == "k":
                energy = queries[index][head].diagonal()
                half = self.head_dim // 2
                plane = (energy[:half] + energy[half:]) / 2
                metric = torch.diag(torch.cat([plane, plane]))
            else:
                w = layers[index].self_attn.o_proj.weight.detach().double()
                cols = w[:, head * group * self.head_dim:(head + 1) * group * self.head_dim]
                metric = sum(cols[:, g * self.head_dim:(g + 1) * self.head_dim].T
                             @ cols[:, g * self.head_dim:(g + 1) * self.head_dim] for g in range(group))
            self.codecs[(index, head, kind)] = ComponentCodec.fit(x, metric)
        self._bits: dict[tuple, torch.Tensor] = {}

    def bits(self, index: int, head: int, kind: str, budget: float) -> torch.Tensor:
        key = (index, head, kind, budget)
        if key not in self._bits:
            self._bits[key] = allocate(self.codecs[(index, head, kind)].distortion, round(budget * self.head_dim))
        return self._bits[key]

    def apply(self, cache, budget: float):
        """``cache`` as a load of it coded at ``budget`` bits per element on average would give it back."""
        from kvzip_rag.cache import PackedCache, PackedLayer

        keys = [layer.keys.float().clone() for layer in cache.layers]
        values = [layer.values.float().clone() for layer in cache.layers]
        for index, head, rows in coded_rows(cache):
            if rows.stop <= rows.start:
                continue
            positions = cache.layers[index].positions[rows]
            k = self.frame.undo(keys[index][rows], positions)
            k = self.codecs[(index, head, "k")].code(k, self.bits(index, head, "k", budget))
            keys[index][rows] = self.frame.redo(k, positions)
            values[index][rows] = self.codecs[(index, head, "v")].code(values[index][rows],
                                                                       self.bits(index, head, "v", budget))
        layers = [PackedLayer(k.to(layer.keys.dtype), v.to(layer.values.dtype), layer.offsets, layer.positions,
                              layer.scores, layer.base_length, layer.compressed, layer.sliding_window)
                  for layer, k, v in zip(cache.layers, keys, values)]
        return PackedCache(layers, cache.info)

    def code_bytes(self, cache, budget: float) -> int:
        """Bytes of the bit-packed codes of ``cache`` at ``budget`` (one byte-aligned row per entry and head)."""
        per_entry = -(-round(budget * self.head_dim) * 2 // 8)
        return per_entry * sum(rows.stop - rows.start for _, _, rows in coded_rows(cache))


def method_name(ratio: float, budget: float) -> str:
    return f"kvzip-pair-pca{budget:g}@{ratio:g}"


def measure(model, data_dir: Path, docs: int, questions_per_doc: int, ratios: tuple[float, ...],
            budgets: tuple[float, ...], calibration_segments: int, say=print, checkpoint: Path | None = None) -> dict:
    """The fidelity task's record (rows and bytes, see :mod:`kvzip_rag.bench.fidelity`) for ``full``, KVzip pair at
    each ratio as computed and as K4V2, and each transform-coded budget; the codec calibrated on the essays."""
    from kvzip_rag.bench import data as bench_data
    from kvzip_rag.bench.fidelity import fp16_bytes_per_token, stored, teacher_forced
    from kvzip_rag.bench.runner import PreparedDocument
    from kvzip_rag.scorers.fast_calibration import read_corpus

    start = time.perf_counter()
    texts = read_corpus(data_dir / "paul_graham_essays", model, 1024, calibration_segments)
    codec = TransformCodec(model, texts)
    say(f"calibrated on {len(texts)} essay segments in {time.perf_counter() - start:.0f} s")
    record: dict = {"rows": [], "bytes": [], "fp16_bytes_per_token": fp16_bytes_per_token(model.config)}
    count = lambda text: len(model.encode(text))  # noqa: E731
    for doc in bench_data.load_squad(data_dir, count, docs, 500, min(900, model.context_limit), questions_per_doc):
        prep = PreparedDocument(model, doc.text)
        base, _ = prep.base("kvzip")
        caches = {"full": (prep.base("full")[0], None)}
        for ratio in ratios:
            cut = base.at_ratio(ratio, "pair")
            k4v2, blob, kv = stored(cut, 3)
            caches[f"kvzip-pair@{ratio:g}"] = (cut, None)
            caches[f"kvzip-pair-k4v2@{ratio:g}"] = (k4v2, (blob, kv))
            for budget in budgets:
                code = codec.code_bytes(cut, budget)
                caches[method_name(ratio, budget)] = (codec.apply(cut, budget), (blob - kv + code, code))
        for method, (_, size) in caches.items():
            if size is not None:
                record["bytes"].append({"doc": doc.id, "method": method, "context_tokens": prep.context_length,
                                        "blob_bytes": size[0], "kv_bytes": size[1]})
        reference: dict = {}
        for question in doc.questions:
            for method, (cache, _) in caches.items():
                out = teacher_forced(model, cache, question.question, question.answers[0])
                full = reference.setdefault(question.id, out)
                record["rows"].append({"doc": doc.id, "qid": question.id, "method": method, "nll": out["nll"],
                                       "first_token_match": float(out["greedy"][0] == full["greedy"][0]),
                                       "token_agreement": float((out["greedy"] == full["greedy"]).float().mean()),
                                       "kl_from_full": None, "f1": None})
        say(f"{doc.id}: {prep.context_length} tokens, {len(doc.questions)} questions")
        if checkpoint is not None:
            checkpoint.write_text(json.dumps(record))
    return record


def paired(record: dict, method: str, other: str, samples: int = 2000, seed: int = 0) -> tuple[float, list[float]]:
    """Mean NLL of ``method`` minus ``other`` and its 95% interval, resampling documents (as the fidelity task)."""
    import numpy as np

    from kvzip_rag.bench.fidelity import _cluster_means

    docs = sorted({r["doc"] for r in record["rows"]})
    resamples = np.random.default_rng(seed).integers(0, len(docs), size=(samples, len(docs)))
    means = []
    for name in (method, other):
        per: dict[str, list[float]] = {}
        for r in record["rows"]:
            if r["method"] == name:
                per.setdefault(r["doc"], []).append(r["nll"])
        means.append((_cluster_means(per, resamples, docs), float(np.mean([x for v in per.values() for x in v]))))
    diff = means[0][0] - means[1][0]
    return means[0][1] - means[1][1], [float(x) for x in np.percentile(diff, [2.5, 97.5])]


def table(record: dict) -> list[str]:
    """Markdown rows: n, NLL - full, NLL - K4V2 at the same ratio (paired), bytes per document token."""
    from kvzip_rag.bench.fidelity import summarize

    summary = summarize(record)
    lines = ["| method | n | NLL - full (paired 95% CI) | NLL - K4V2, same ratio (paired) | B / doc token "
             "| x full fp16 |", "|---|---|---|---|---|---|"]
    for method, entry in summary.items():
        ratio = method.rpartition("@")[2]
        k4v2 = f"kvzip-pair-k4v2@{ratio}"
        against = "-"
        if "@" in method and method != k4v2:
            mean, ci = paired(record, method, k4v2)
            against = f"{mean:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        ci = entry.get("nll_minus_full_ci", [0.0, 0.0])
        size, share = entry.get("blob_bytes_per_token"), entry.get("blob_vs_full_fp16")
        lines.append(f"| `{method}` | {entry['n']} | {entry.get('nll_minus_full', 0.0):+.3f} [{ci[0]:+.3f}, "
                     f"{ci[1]:+.3f}] | {against} | {'-' if size is None else f'{size:,.0f}'} | "
                     f"{'-' if share is None else f'{share:.4f}'} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=24)
    parser.add_argument("--questions-per-doc", type=int, default=13)
    parser.add_argument("--ratios", default="0.125")
    parser.add_argument("--budgets", default="2,2.25,2.5")
    parser.add_argument("--calibration-segments", type=int, default=10)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("transform.json"))
    args = parser.parse_args(argv)

    import kvzip_rag
    from kvzip_rag.bench.data import default_data_dir

    model = kvzip_rag.load_model(threads=1)
    say = lambda text: print(time.strftime("%H:%M:%S"), text, flush=True)  # noqa: E731
    record = measure(model, args.data or default_data_dir(), args.docs, args.questions_per_doc,
                     tuple(float(r) for r in args.ratios.split(",")), tuple(float(b) for b in args.budgets.split(",")),
                     args.calibration_segments, say, args.out)
    print("\n".join(table(record)))


if __name__ == "__main__":
    main()
