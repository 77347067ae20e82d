"""Head-level KVzip's calibration: one context-independent importance per (layer, kv head), computed once per
model from a fixed text and kept in memory and in the cache dir (keyed by the model fingerprint)."""

from __future__ import annotations

import json

import torch

from ..models import KVzipModel, cache_dir
from ..prefill import prefill_document
from .kvzip import KVzipScorer

CALIBRATION_TEXT = """\
The lighthouse keeper of Skerry Point kept a ledger for forty-one years. Each morning he wrote the wind, the
height of the swell, the ships he saw and the birds that came to the lamp. In the winter of 1887 a schooner named
the Margaret Hale ran aground on the northern reef; the keeper rowed out three times and brought back eleven
sailors, and the ledger records only "wind NE, heavy sea, eleven saved, one lost, the cook". His daughter Ellen
took over the lamp in 1903, when the old man's eyes failed. She replaced the oil burner with a mantle lamp, which
tripled the range of the light to twenty-two nautical miles, and she taught herself Morse code from a manual
left by a telegraph engineer. In 1921 the light was automated and Ellen moved to the village, where she opened a
small school for the children of fishermen. The ledgers, sixty-three volumes in all, are now kept in the county
archive, where historians use them to study storms, shipping routes and the migration of seabirds. The entry for
12 March 1912 is the most quoted: "Fog all day. Heard the horn of a steamer but never saw her. Gulls quiet."
"""

_HEAD_SCORES: dict[str, torch.Tensor] = {}


def head_scores(model: KVzipModel) -> torch.Tensor:
    """Context-independent head importance (max KVzip score over a calibration text), once per model.

    Kept in memory and in the cache dir, keyed by the model fingerprint.
    """
    if model.fingerprint in _HEAD_SCORES:
        return _HEAD_SCORES[model.fingerprint]
    path = cache_dir() / "head_scores" / f"{model.fingerprint}.json"
    if path.exists():
        scores = torch.tensor(json.loads(path.read_text()))
    else:
        document = prefill_document(model, CALIBRATION_TEXT)
        scores = KVzipScorer().score(document).amax(dim=-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scores.tolist()))
    _HEAD_SCORES[model.fingerprint] = scores
    return scores
