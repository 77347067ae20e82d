"""Answer-quality metrics: SQuAD EM/F1 with the official normalisation, containment, needle hits, aggregation."""

from __future__ import annotations

import math
import random
import re
import statistics
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
NEEDLE_KEYWORDS = ("sandwich", "dolores park")


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lower-case, drop punctuation and articles, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str) -> float:
    """Token-level F1 between the normalised prediction and gold answer (SQuAD v1.1 script)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_gold(prediction: str, gold: str) -> float:
    """1 when the normalised gold answer appears in the normalised prediction (generative models are verbose)."""
    gold_norm = normalize_answer(gold)
    if not gold_norm:
        return 0.0
    return float(f" {gold_norm} " in f" {normalize_answer(prediction)} ")


def best_over(metric, prediction: str, golds: Sequence[str]) -> float:
    """Max of ``metric`` over the reference answers (SQuAD and NarrativeQA have several)."""
    return max((metric(prediction, gold) for gold in golds), default=0.0)


def needle_hit(prediction: str, keywords: Iterable[str] = NEEDLE_KEYWORDS) -> float:
    """The needle counts as retrieved when the answer mentions the sandwich or Dolores Park."""
    text = prediction.lower()
    return float(any(word in text for word in keywords))


def mean(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def median(values: Iterable[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def stderr(values: Iterable[float]) -> float | None:
    """Standard error of the mean, so the noise of a small sample is visible next to it."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    return statistics.stdev(values) / math.sqrt(len(values))


def median_interval(values: Sequence[float], samples: int = 4000, seed: int = 0) -> tuple[float, float, float] | None:
    """Median of ``values`` (e.g. paired per-repeat differences) with a 95% bootstrap interval: a timing difference
    is a result only where its interval excludes 0, whatever the machine's load did meanwhile."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    boot = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(samples))
    return statistics.median(values), boot[int(0.025 * samples)], boot[int(0.975 * samples) - 1]


def ratio(value: float | None, baseline: float | None) -> float | None:
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def share_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float, float] | None:
    """A share ``hits / n`` with its 95% Wilson score interval (sound near 0% and 100%, unlike the normal one)."""
    if n <= 0:
        return None
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return share, max(centre - half, 0.0), min(centre + half, 1.0)
