"""Benchmark method names (``family@ratio``): how they parse and the order tables list them in, shared by the
tasks, the summary and the report; and the rows of the report's targets table."""

from __future__ import annotations


def parse_method(method: str) -> tuple[str, float | None]:
    """``kvzip-pair@0.3`` -> (``kvzip-pair``, 0.3); ``full`` -> (``full``, 1.0); others -> (name, None)."""
    if "@" in method:
        family, value = method.rsplit("@", 1)
        return family, float(value)
    return method, 1.0 if method == "full" else None


def method_order(method: str) -> tuple:
    family, r = parse_method(method)
    families = ["full", "reprefill", "chunk-rag", "kvzip-pair", "kvzip-uniform", "kvzip-head", "snapkv", "h2o",
                "keynorm", "random"]
    return (families.index(family) if family in families else len(families), -(r or 0), method)


def target_row(name: str, value, threshold, met: bool | None, measured: str, n=None, note: str = "") -> dict:
    """One row of the targets table (``met`` None: the run could not decide it)."""
    return {"target": name, "value": value, "threshold": threshold, "met": met, "measured": measured, "n": n,
            "note": note}
