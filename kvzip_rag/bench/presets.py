"""Benchmark sizes. ``quick`` is a smoke run of a few minutes; ``full`` is the report (estimated 20-25 minutes on an
idle 2-core CPU with SmolLM2-135M, with a 24-minute guard; see BENCHMARKS.md). Any field can be overridden from the
command line with ``--set name=value``."""

from __future__ import annotations

import ast
from dataclasses import dataclass, fields, replace

from kvzip_rag.budget import DEFAULT_BUDGET

RATIOS = (0.1, 0.2, 0.3, 0.5, 0.7)


def main_ratio(ratios: tuple[float, ...]) -> float:
    """The ratio a task reports its timings at: the package's default ratio when measured, else the first."""
    return DEFAULT_BUDGET.ratio if DEFAULT_BUDGET.ratio in ratios else ratios[0]

LEVELS = ("pair", "uniform", "head")
BASELINES = ("snapkv", "h2o", "keynorm", "random")


@dataclass(frozen=True)
class Preset:
    name: str
    # SQuAD: documents of consecutive paragraphs, all their questions answered from one compressed cache
    squad_docs: int
    squad_min_tokens: int
    squad_max_tokens: int
    squad_questions: int
    ratios: tuple[float, ...]  # every KVzip level and every baseline at each of these (SQuAD)
    # Needle in a haystack (Paul Graham essays): (context tokens, depth) cases; a length above the model's
    # context limit is clamped to it (SmolLM2: 8192 positions - 512 reserved for the answer - the prompt prefix)
    needle_cases: tuple[tuple[int, float], ...]
    needle_ratios: tuple[float, ...]  # every level and baseline
    needle_extra_ratios: tuple[float, ...]  # KVzip pair level only (cheap: same scores, one more answer)
    # NarrativeQA summaries
    nqa_docs: int
    nqa_questions: int
    nqa_ratios: tuple[float, ...]
    nqa_max_tokens: int = 1500
    # cost measurements
    ttft_length: int = 4096  # needle length at which the stored-cache time to first token is measured
    decode_steps: int = 16  # forced decode steps per per-token latency measurement
    ttft_repeats: int = 3
    prefill_repeats: int = 2  # plain prefill timed this many times per document, best kept
    # no new document is started after this many minutes (the skipped ones are listed in the report); None: no limit
    budget_minutes: float | None = None
    # methods
    levels: tuple[str, ...] = LEVELS
    baselines: tuple[str, ...] = BASELINES
    baseline_level: str = "uniform"  # per-head top-k, as SnapKV/H2O/key-norm are defined
    max_new_tokens: int = 24
    needle_max_new_tokens: int = 32
    chunk_tokens: int = 128  # chunk retrieval: chunk size in LLM tokens, overlap, chunks retrieved
    chunk_overlap: int = 16
    top_k: int = 3
    # multidoc (kvzip_rag/bench/multidoc.py): HotpotQA questions, documents routed per question, composed methods
    multidoc_questions: int = 50
    multidoc_first: int = 0  # first question index (to split a run over processes; see multidoc.merge_runs)
    multidoc_indices: tuple[int, ...] = ()  # explicit question indices (instead of first/questions)
    multidoc_nll_only: bool = False  # time to first token and gold NLL only (cheap; F1/contains/best-of-k not run)
    multidoc_checkpoint: str = ""  # a file the rows so far are written to after every question (long runs)
    multidoc_k: int = 4
    multidoc_ratios: tuple[float, ...] = (1.0, 0.3)
    multidoc_best_of_k_ratios: tuple[float, ...] = (0.3,)  # k answers each: the costliest method to run
    multidoc_max_new_tokens: int = 12  # HotpotQA answers are a name, a date or yes/no
    multidoc_repair: int = 16  # tokens recomputed per document (composed-sequential-repair); 0: no repair methods
    multidoc_needle_cases: int = 2  # cross-segment needle: two facts in different segments of one essay
    multidoc_segments: int = 6
    multidoc_segment_tokens: int = 300
    # --task scale (kvzip_rag/bench/scale.py): synthetic segments per database size, routing queries, Ray documents
    scale_sizes: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    scale_words: int = 100
    scale_queries: int = 200
    scale_ray_documents: int = 12
    # grounding task (kvzip_rag/bench/grounding.py): SQuAD articles x questions, HotpotQA questions, ratios
    grounding_articles: int = 24  # all of the shared SQuAD articles
    # 216 questions over them, none of those the abstention was calibrated on (the issue asks >= 200)
    grounding_questions_per_doc: int = 12
    grounding_min_tokens: int = 400
    grounding_max_tokens: int = 900
    grounding_hotpot: int = 50
    grounding_ratios: tuple[float, ...] = (0.3, 1.0)
    grounding_max_new_tokens: int = 24
    grounding_budget_minutes: float | None = None  # no new question round is started after this
    grounding_first_round: int = 0  # question rounds before it are skipped (a run extends an earlier one: merge)
    # fidelity task (kvzip_rag.bench.fidelity): teacher-forced passes on many SQuAD questions, F1 on a subset
    fidelity_questions: int = 300
    fidelity_first_article: int = 0  # SQuAD article to start from (a later run can extend an earlier one)
    fidelity_questions_per_doc: int = 15  # spread over many documents: the bootstrap resamples documents
    fidelity_f1_questions: int = 100
    fidelity_min_tokens: int = 500
    fidelity_max_tokens: int = 900
    fidelity_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    fidelity_f1_ratios: tuple[float, ...] = (0.3,)
    fidelity_baselines: tuple[str, ...] = ("snapkv", "h2o")
    fidelity_scorers: tuple[str, ...] = ()  # further pair-level scorers measured beside KVzip, e.g. kvzip-structure
    fidelity_bits: tuple[int, ...] = (16,)  # stored precisions of the KVzip methods (kvzip-pair-int4@r, ...)
    fidelity_key_groups: tuple[tuple[int, int], ...] = ()  # (kv_bits, key group) layouts measured beside that
    # precision's default, e.g. ((3, 64),) -> kvzip-pair-k4v2-g64@r, paired against it as nll_minus_layout
    fidelity_fast: bool = True  # measure kvzip-fast@r (calibrates its gate first when the model has none)
    fidelity_max_new_tokens: int = 16
    fidelity_budget_minutes: float | None = None
    fidelity_checkpoint: str = ""  # a file the record so far is written to after every document (fidelity_merge.merge_runs
    # reads it as a part: a run cut short keeps its finished documents)
    fidelity_calibration_tokens: int = 1024  # kvzip-fast gate calibration (Paul Graham essays) when none exists
    fidelity_calibration_segments: int = 10
    # task "quant" (quantized caches, bench/quant.py): SQuAD NLL for every ratio x {16, 8, 4} bits, answers (F1) at
    # quant_answer_ratios, needle hits at quant_needle_ratios; the stored-cache TTFT at ttft_length
    quant_squad_docs: int = 2
    quant_squad_questions: int = 5  # NLL at ratio 0.3 and full
    quant_grid_questions: int = 2  # NLL at the other quant_ratios
    quant_answer_questions: int = 2  # greedy answers (F1) at quant_answer_ratios and full
    quant_first_article: int = 0
    quant_ratios: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    quant_answer_ratios: tuple[float, ...] = (0.3,)
    quant_needle_cases: tuple[tuple[int, float], ...] = ((2048, 0.5),)
    quant_needle_ratios: tuple[float, ...] = (0.3,)
    # task "conversations" (bench/conversations.py): the scripted set ("dev", the shipped one the follow-up margins
    # were chosen on, or "heldout"), whether to plan the turns only (no answers), the routings (None: all)
    conversations_set: str = "dev"
    conversations_routing_only: bool = False
    conversations_routings: tuple[str, ...] | None = None


PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        squad_docs=2, squad_min_tokens=400, squad_max_tokens=800, squad_questions=5,
        ratios=(0.3,),
        needle_cases=((1024, 0.5), (2048, 0.5)), needle_ratios=(0.3,), needle_extra_ratios=(),
        nqa_docs=1, nqa_questions=3, nqa_ratios=(0.3,), nqa_max_tokens=900,
        ttft_length=2048, decode_steps=8, ttft_repeats=2,
        multidoc_questions=4, multidoc_needle_cases=1,
        scale_sizes=(10_000,), scale_queries=50, scale_ray_documents=4,
    ),
    "full": Preset(
        name="full",
        squad_docs=4, squad_min_tokens=1000, squad_max_tokens=2000, squad_questions=5,
        ratios=RATIOS,
        # two depths where a haystack is cheap, one at 4K and at the window (KVzip scoring dominates there)
        needle_cases=((1024, 0.25), (1024, 0.75), (2048, 0.25), (2048, 0.75), (4096, 0.5), (8192, 0.5)),
        needle_ratios=(0.3,), needle_extra_ratios=(0.1, 0.2, 0.5),
        nqa_docs=3, nqa_questions=4, nqa_ratios=(0.3,),
        ttft_length=4096, budget_minutes=24.0,
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    unknown = set(overrides) - {f.name for f in fields(Preset)}
    if unknown:
        raise ValueError(f"unknown preset field(s) {sorted(unknown)}; fields: {[f.name for f in fields(Preset)]}")
    return replace(PRESETS[name], **overrides) if overrides else PRESETS[name]


def parse_overrides(items: list[str] | None) -> dict:
    """``["squad_docs=2", "ratios=(0.3, 0.5)"]`` -> ``{"squad_docs": 2, "ratios": (0.3, 0.5)}`` (Python literals)."""
    out = {}
    for item in items or ():
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes name=value, got {item!r}")
        try:
            out[name.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[name.strip()] = value.strip()  # a bare string, e.g. baseline_level=pair
    return out
