"""Choosing ratio and stored precision for the user from the model's measured compression curve.

A curve is what the fidelity task measured for one model (``kvzip-rag bench --task fidelity --write-curve``): per
scorer, ratio and ``kv_bits``, the blob bytes a store keeps per document token (template prefix shared) and the gold
answer NLL lost against the full cache (mean, and the upper end of its paired 95% interval, n questions). It is
written to ``cache_dir()/curves/<model fingerprint>.json``; curves measured by the maintainers ship in
``kvzip_rag/curves/`` (the default model's), and a written one takes precedence.

:func:`choose` picks a point: ``max_nll_loss`` -> the fewest bytes whose interval's upper end is within the loss
(and within ``target_bytes`` if given too); ``target_bytes`` alone -> the smallest mean loss among the points that fit
the byte budget (ties: fewer bytes). ``target_bytes`` is bytes per document token (``"900"``) or a fraction of the
full float16 cache (``"0.02x"``). Torch-free: the CLI can read a curve before loading anything heavy.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .errors import InvalidArgumentError

PACKAGED = Path(__file__).with_name("curves")
# the fidelity task's method families -> (scorer, level) a store compresses with
FAMILIES = {"kvzip-pair": ("kvzip", "pair"), "kvzip-uniform": ("kvzip", "uniform"),
            "kvzip-fast": ("kvzip-fast", "pair"), "kvzip-structure": ("kvzip-structure", "pair"),
            "kvzip-value": ("kvzip-value", "pair")}


@dataclass(frozen=True)
class CurvePoint:
    scorer: str
    level: str
    ratio: float
    kv_bits: int
    bytes_per_token: float  # blob bytes a store keeps per document token
    fp16_share: float  # bytes_per_token over the full cache's in float16
    nll_loss: float  # mean gold NLL minus the full cache's (nats)
    nll_loss_high: float  # upper end of its paired 95% interval: what a loss bound is checked against
    n: int

    @property
    def fp16_bytes_per_token(self) -> float:
        """The full cache in float16 per token, as this point's share was computed against."""
        return self.bytes_per_token / self.fp16_share

    def describe(self) -> str:
        return (f"{self.scorer}, ratio {self.ratio:g}, kv_bits {self.kv_bits} ({self.bytes_per_token:,.0f} B/token, "
                f"{self.fp16_share:.3f}x the fp16 cache; NLL loss {self.nll_loss:+.3f} "
                f"nats, 95% CI upper end {self.nll_loss_high:+.3f}, n={self.n})")


@dataclass(frozen=True)
class Curve:
    model_name: str
    fingerprint: str
    fp16_bytes_per_token: int  # the full cache in float16: what "0.02x" is a fraction of
    points: tuple[CurvePoint, ...]
    source: dict  # the command, date and data of the run that measured it

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {**asdict(self), "points": [asdict(p) for p in self.points]}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Curve":
        try:
            body = json.loads(Path(path).read_text())
            return cls(body["model_name"], body["fingerprint"], int(body["fp16_bytes_per_token"]),
                       tuple(CurvePoint(**p) for p in body["points"]), dict(body.get("source") or {}))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InvalidArgumentError(f"compression curve {path} is unreadable ({type(error).__name__}: {error}); "
                                       "write it again with kvzip-rag bench --task fidelity --write-curve") from None


def curve_path(fingerprint: str) -> Path:
    """Where the curve written for the model with ``fingerprint`` lives (beside its kvzip-fast gate)."""
    from .models import cache_dir

    return cache_dir() / "curves" / f"{fingerprint}.json"


def find_curve(model) -> Curve:
    """The curve of ``model`` (a ``KVzipModel``): written by the user, else shipped; a clear error when neither."""
    for path in (curve_path(model.fingerprint), PACKAGED / f"{model.fingerprint}.json"):
        if path.is_file():
            return Curve.load(path)
    raise InvalidArgumentError(
        f"no compression curve for model {model.name} (fingerprint {model.fingerprint}): measure one with "
        f"`kvzip-rag bench --full --task fidelity --write-curve --model {model.name}`, or give ratio and kv_bits")


def curve_from_fidelity(table: dict, model_name: str, fingerprint: str, fp16_bytes_per_token: int,
                        source: dict) -> Curve:
    """The curve in a fidelity summary (``summary.quality.fidelity`` of the bench's results): every KVzip-family
    method below ratio 1 with its bytes and paired interval."""
    from .bench.methods import parse_method, split_codec

    points = []
    for method, q in table.items():
        family, ratio = parse_method(method)
        family, bits = split_codec(family)
        if family not in FAMILIES or ratio is None or ratio >= 1 or q.get("blob_bytes_per_token") is None \
                or not q.get("nll_minus_full_ci"):
            continue
        scorer, level = FAMILIES[family]
        points.append(CurvePoint(scorer, level, ratio, bits, round(q["blob_bytes_per_token"], 1),
                                 round(q["blob_bytes_per_token"] / fp16_bytes_per_token, 5),
                                 round(q["nll_minus_full"], 4), round(q["nll_minus_full_ci"][1], 4), int(q["n"])))
    if not points:
        raise InvalidArgumentError("the fidelity results hold no KVzip method with bytes and a paired interval: "
                                   "nothing to make a curve of")
    points.sort(key=lambda p: (p.scorer, p.level, p.bytes_per_token))
    return Curve(model_name, fingerprint, fp16_bytes_per_token, tuple(points), source)


def write_curve(results: dict, path: str | os.PathLike | None = None) -> tuple[Curve, Path]:
    """Write the curve of a bench run's ``results`` (its fidelity task) for the model it ran; returns it and where.

    The run's points join the model's curve already there (the file at ``path``, else the one written for the
    model, else the shipped one): a run of a few more ratios adds them instead of dropping the rest. A point the run
    measured again replaces the old one; the points kept name the run that measured them (``source["kept"]``)."""
    table = (results.get("summary", {}).get("quality", {}) or {}).get("fidelity")
    fidelity, meta = results.get("fidelity") or {}, results.get("meta") or {}
    if not table or "fp16_bytes_per_token" not in fidelity:
        raise InvalidArgumentError("these results hold no fidelity task: run kvzip-rag bench --task fidelity")
    n = max((q.get("n", 0) for q in table.values()), default=0)
    source = {"command": meta.get("command"), "duration_s": meta.get("duration_s"), "questions": n,
              "documents": len({r["doc"] for r in fidelity.get("rows", ())}), "data": "SQuAD (fidelity task)"}
    curve = curve_from_fidelity(table, meta["model"], meta["model_fingerprint"], fidelity["fp16_bytes_per_token"],
                                source)
    path = Path(path or curve_path(curve.fingerprint))
    curve = _joined(curve, _earlier(curve, path))
    return curve, curve.save(path)


def written(curve: Curve, path: Path) -> str:
    """What :func:`write_curve` did, in one line."""
    kept = (curve.source.get("kept") or {}).get("points", 0)
    also = f", {kept} of them kept from the earlier curve" if kept else ""
    return f"compression curve of {curve.model_name} ({len(curve.points)} points{also}) written to {path}"


def _earlier(curve: Curve, path: Path) -> Curve | None:
    """The model's curve before this run: the file at ``path``, else the shipped one; None when there is none or it
    belongs to another model (its points would not describe this one)."""
    for candidate in (path, PACKAGED / f"{curve.fingerprint}.json"):
        if candidate.is_file():
            earlier = Curve.load(candidate)
            return earlier if (earlier.fingerprint, earlier.fp16_bytes_per_token) == (
                curve.fingerprint, curve.fp16_bytes_per_token) else None
    return None


def _joined(curve: Curve, earlier: Curve | None) -> Curve:
    """``curve`` plus the points of ``earlier`` it did not measure again (one point per scorer, level, ratio, bits)."""
    key = lambda p: (p.scorer, p.level, p.ratio, p.kv_bits)  # noqa: E731
    measured = {key(p) for p in curve.points}
    kept = [p for p in (earlier.points if earlier else ()) if key(p) not in measured]
    if not kept:
        return curve
    points = tuple(sorted((*curve.points, *kept), key=lambda p: (p.scorer, p.level, p.bytes_per_token)))
    source = {**curve.source, "kept": {"points": len(kept), "source": earlier.source}}
    return replace(curve, points=points, source=source)


def parse_target_bytes(value: str | float | int, fp16_bytes_per_token: float) -> float:
    """Bytes per document token from ``900`` / ``"900"`` (bytes) or ``"0.02x"`` (of the full float16 cache)."""
    text = str(value).strip().lower()
    share = text.endswith("x")
    try:
        number = float(text[:-1] if share else text)
    except ValueError:
        raise InvalidArgumentError(f"target bytes is bytes per document token (900) or a fraction of the full fp16 "
                                   f"cache (0.02x), got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise InvalidArgumentError(f"target bytes must be a positive, finite number, got {value!r}")
    return number * fp16_bytes_per_token if share else number


def choose(curve: Curve, *, target_bytes: str | float | None = None, max_nll_loss: float | None = None,
           scorer: str | None = "kvzip", level: str = "pair") -> CurvePoint:
    """The measured point of ``scorer``/``level`` that meets the bounds (see the module docstring); ``scorer`` None:
    of any scorer measured at ``level`` (the point names the one to compress with)."""
    if target_bytes is None and max_nll_loss is None:
        raise InvalidArgumentError("give target bytes or a maximum NLL loss to choose ratio and kv_bits")
    if max_nll_loss is not None and not max_nll_loss >= 0:
        raise InvalidArgumentError(f"the maximum NLL loss is in nats, >= 0, got {max_nll_loss!r}")
    budget = None if target_bytes is None else parse_target_bytes(target_bytes, curve.fp16_bytes_per_token)
    points = [p for p in curve.points if scorer in (None, p.scorer) and p.level == level]
    if not points:
        raise InvalidArgumentError(f"the compression curve of {curve.model_name} measured no {scorer or 'scorer'} "
                                   f"at level {level!r}; it has {sorted({(p.scorer, p.level) for p in curve.points})}")
    fits = [p for p in points if (budget is None or p.bytes_per_token <= budget)
            and (max_nll_loss is None or p.nll_loss_high <= max_nll_loss)]
    if not fits:
        smallest = min(points, key=lambda p: p.bytes_per_token)
        safest = min(points, key=lambda p: p.nll_loss_high)
        wanted = " and ".join(x for x in (
            None if budget is None else f"<= {budget:,.0f} B/token",
            None if max_nll_loss is None else f"NLL loss <= {max_nll_loss:g} nats") if x)
        raise InvalidArgumentError(
            f"no measured point of {scorer or 'any scorer'} on {curve.model_name} has {wanted}: the smallest is "
            f"{smallest.describe()}; the closest to full is "
            f"{safest.describe()}")
    if max_nll_loss is not None:
        return min(fits, key=lambda p: (p.bytes_per_token, p.nll_loss_high))
    return min(fits, key=lambda p: (p.nll_loss, p.bytes_per_token))


def pick_budget(model, *, target_bytes: str | float | None, max_nll_loss: float | None, scorer: str | None,
                ratio: float | None, kv_bits: int | None
                ) -> tuple[float | None, int | None, str | None, CurvePoint | None]:
    """``(ratio, kv_bits, scorer, point)``: chosen from ``model``'s curve when a bound is given (then ratio and
    kv_bits must not be; ``scorer`` None lets the curve choose it too), else as given (point None). ``model`` is
    loaded only to be read when a bound is given."""
    if target_bytes is None and max_nll_loss is None:
        return ratio, kv_bits, scorer, None
    given = [name for name, value in (("ratio", ratio), ("kv_bits", kv_bits)) if value is not None]
    if given:
        raise InvalidArgumentError(f"target bytes / max NLL loss choose ratio and kv_bits from the measured curve; "
                                   f"drop {' and '.join(given)}")
    point = choose(find_curve(model), target_bytes=target_bytes, max_nll_loss=max_nll_loss, scorer=scorer)
    return point.ratio, point.kv_bits, point.scorer, point


def stored_against_point(documents, point: CurvePoint,
                         target_bytes: str | float | None = None) -> tuple[str, bool]:
    """``(line, above)``: the blob bytes per document token the caches of ``documents`` (a store's document records)
    at ``point`` take, against the point, and whether that is above ``target_bytes``.

    The curve's bytes come from its benchmark documents (SQuAD, 500-900 tokens); a blob also pays a fixed cost per
    document (header, a key-scale group for every head), so shorter documents take more per token: every interface
    that builds a store by a curve point tells the user what was stored, and, above the target, why."""
    from .budget import same_ratio

    caches = [c for record in documents if record is not None for c in record.caches
              if same_ratio(c.ratio, point.ratio) and c.kv_bits == point.kv_bits and c.scorer == point.scorer]
    tokens = sum(c.context_length for c in caches)
    if not tokens:
        return "no cache was stored at the chosen ratio and kv_bits", False
    per_token = sum(c.nbytes for c in caches) / tokens
    line = (f"stored {per_token:,.0f} B/token ({per_token / point.fp16_bytes_per_token:.3f}x the fp16 cache) over "
            f"{len(caches)} segment(s); the curve's point: {point.bytes_per_token:,.0f} B/token on the documents it "
            "was measured on")
    budget = None if target_bytes is None else parse_target_bytes(target_bytes, point.fp16_bytes_per_token)
    above = budget is not None and per_token > budget
    if above:
        line += (f"; above the target of {budget:,.0f} B/token: every blob has a fixed cost (header, key scales of "
                 "every head), which short documents spread over fewer tokens")
    return line, above


def log_stored(documents, point: CurvePoint, target_bytes: str | float | None = None) -> None:
    """:func:`stored_against_point` for the framework adapters: a warning on the ``kvzip_rag`` logger when above the
    target, else an info line."""
    line, above = stored_against_point(documents, point, target_bytes)
    logging.getLogger("kvzip_rag").log(logging.WARNING if above else logging.INFO, "%s", line)


def plot_curve(curve: Curve, path: str | os.PathLike, highlight: CurvePoint | None = None) -> Path:
    """The curve as a PNG: NLL loss (with its interval) against bytes per token, one line per scorer and precision;
    ``highlight`` (e.g. a document's cache) ringed."""
    from .extras import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    series: dict[tuple[str, int], list[CurvePoint]] = {}
    for p in curve.points:
        series.setdefault((p.scorer, p.kv_bits), []).append(p)
    names = {16: "as computed", 8: "int8", 4: "int4", 3: "K4V2", 2: "K2V2"}
    markers = {16: "o", 8: "s", 4: "^", 3: "v", 2: "x"}
    colors = {scorer: f"C{i}" for i, scorer in enumerate(sorted({p.scorer for p in curve.points}))}
    for (scorer, bits), points in sorted(series.items()):
        points.sort(key=lambda p: p.bytes_per_token)
        xs, ys = [p.fp16_share for p in points], [p.nll_loss for p in points]
        ax.plot(xs, ys, marker=markers.get(bits, "o"), color=colors[scorer], linestyle="-" if bits >= 4 else ":",
                label=f"{scorer} {names.get(bits, bits)}")
        ax.vlines(xs, ys, [p.nll_loss_high for p in points], color=colors[scorer], alpha=0.3)
        for x, p in zip(xs, points):
            ax.annotate(f"{p.ratio:g}", (x, p.nll_loss), fontsize=6, xytext=(2, 2), textcoords="offset points")
    if highlight is not None:
        ax.scatter([highlight.fp16_share], [highlight.nll_loss], s=220, facecolors="none", edgecolors="red",
                   linewidths=1.5, label="this cache", zorder=5)
    ax.set_xscale("log")
    ax.axhline(0, color="k", linewidth=0.6)
    n = max((p.n for p in curve.points), default=0)
    ax.set(xlabel="blob bytes per document token / full fp16 cache (log)",
           ylabel="gold NLL - full cache (nats; bar: to 95% CI upper end)",
           title=f"Compression curve of {curve.model_name} (n={n} SQuAD questions; labels: ratio)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """``python -m kvzip_rag.frontier RESULTS.json [--to PATH] [--plot PNG]``: the curve of an earlier bench run."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m kvzip_rag.frontier", description=main.__doc__)
    parser.add_argument("results", type=Path, help="results.json of a kvzip-rag bench run with the fidelity task")
    parser.add_argument("--to", type=Path, help="where to write the curve (default: the model's curve path)")
    parser.add_argument("--plot", type=Path, help="also draw the curve to this PNG")
    args = parser.parse_args(argv)
    curve, path = write_curve(json.loads(args.results.read_text()), args.to)
    print(written(curve, path))
    if args.plot:
        print(f"plot: {plot_curve(curve, args.plot)}")


if __name__ == "__main__":
    main()
