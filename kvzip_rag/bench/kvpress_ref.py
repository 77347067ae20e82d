"""External reference: our KVzip scores next to NVIDIA kvpress's ``KVzipPress`` on the same documents.

``python -m kvzip_rag.bench.kvpress_ref --docs 3 --out kvpress.json`` (needs ``pip install -e ".[kvpress]"``).
For each SQuAD document: both scorers on the *same token ids* (our prefix + context), then the Spearman rank
correlation per (layer, kv head) and over all pairs, the overlap of the pair-level kept sets at ratio 0.3 (both
keep the global top 30% over layers and heads), and the gold-answer NLL of the document's questions through OUR
packed cache built from either score tensor (so the selection is compared, not two attention implementations).

kvpress 0.5.2 is the newest release that admits transformers >= 5.3; it was written for the ``past_key_values``
argument that transformers 5 renamed ``cache``, so ``_KVzipPress`` below maps the new name back (its only change).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvzip_rag.compression import pack
from kvzip_rag.prefill import prefill_document
from kvzip_rag.scorers import KVzipScorer
from kvzip_rag.scorers.fast_calibration import agreement, spearman

from . import data as bench_data
from .fidelity import teacher_forced


def kvpress_scores(document) -> tuple[torch.Tensor, dict]:
    """KVzipPress's scores of the document's context tokens, shape (layers, kv heads, context), and its layout."""
    from kvpress import KVzipPress
    from transformers import DynamicCache

    class _KVzipPress(KVzipPress):
        def forward_hook(self, module, input, kwargs, output):
            if "cache" in kwargs:  # transformers >= 5: the attention gets ``cache=``, kvpress reads the old name
                kwargs = {**kwargs, "past_key_values": kwargs["cache"]}
            return super().forward_hook(module, input, kwargs, output)

        def compress_post(self, model):  # keep the scores; masking is not needed, we pack them ourselves
            self.captured = self.score_val[:, 0].float().cpu()
            self.layout = {"kvpress_prefix_length": self.prefix_length, "n_sink": self.n_sink}

    model = document.model
    press = _KVzipPress(compression_ratio=0.7)  # any ratio > 0 runs the scoring pass
    ids = torch.tensor([document.prefix_ids + document.context_ids], device=model.device)
    with torch.inference_mode(), press(model.model):
        model.model.model(input_ids=ids, past_key_values=DynamicCache(config=model.model.config))
    scores = press.captured[document.compressed_layers][:, :, document.prefix_length :]
    return scores, press.layout


def compare(model, docs: list, ratio: float = 0.3) -> dict:
    out = []
    for doc in docs:
        document = prefill_document(model, doc.text)
        ours = KVzipScorer().score(document)
        theirs, layout = kvpress_scores(document)
        entry = {"doc": doc.id, "context_tokens": document.context_length, **layout,
                 **agreement(ours.clamp_min(1e-12).log(), theirs.clamp_min(1e-12).log())}
        per_head = [spearman(o, t) for o, t in zip(ours.flatten(0, 1), theirs.flatten(0, 1))]
        entry["rho_per_head_min"] = min(per_head)
        entry["rho_by_layer"] = [sum(per_head[i : i + ours.shape[1]]) / ours.shape[1]
                                 for i in range(0, len(per_head), ours.shape[1])]
        for name, scores in (("ours", ours), ("kvpress", theirs)):
            cache = pack(document, scores, ratio, "pair", name)
            nll = [teacher_forced(model, cache, q.question, q.answers[0])["nll"] for q in doc.questions]
            entry[f"nll_{name}@{ratio:g}"] = sum(nll) / len(nll)
        entry["questions"] = len(doc.questions)
        out.append(entry)
    keys = [k for k, v in out[0].items() if isinstance(v, float)]
    return {"documents": out, "mean": {k: sum(e[k] for e in out) / len(out) for k in keys}}


def main() -> None:
    # kvpress wraps every attention function registered when it is imported and calls it with ``dropout`` as the
    # sixth positional argument, where ours takes ``scaling``: import it before our attention is registered.
    import kvpress  # noqa: F401

    import kvzip_rag

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3)
    parser.add_argument("--questions", type=int, default=5)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", type=Path, default=Path("kvpress-reference.json"))
    args = parser.parse_args()
    model = kvzip_rag.load_model(args.model)
    data_dir = args.data or bench_data.default_data_dir()
    count = lambda text: len(model.encode(text))  # noqa: E731
    docs = bench_data.load_squad(data_dir, count, args.docs, 250, 450, args.questions)
    result = compare(model, docs)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["mean"], indent=1))


if __name__ == "__main__":
    main()
