"""Benchmark method names (``family@ratio``): how they parse and the order tables list them in, shared by the
tasks, the summary and the report; and the rows of the report's targets table."""

from __future__ import annotations


def parse_method(method: str) -> tuple[str, float | None]:
    """``kvzip-pair@0.3`` -> (``kvzip-pair``, 0.3); ``full`` -> (``full``, 1.0); others -> (name, None)."""
    if "@" in method:
        family, value = method.rsplit("@", 1)
        return family, float(value)
    return method, 1.0 if method == "full" else None


CODECS = {16: "", 8: "-int8", 4: "-int4", 3: "-k4v2", 2: "-k2v2"}  # kv_bits -> method-name suffix (3: 4-bit keys,
# 2-bit values; 2: 2-bit both)


def coded(method: str, bits: int) -> str:
    """``kvzip-pair@0.125`` stored with ``bits`` -> ``kvzip-pair-int4@0.125`` (16: unchanged)."""
    family, at, ratio = method.partition("@")
    return f"{family}{CODECS[bits]}{at}{ratio}"


def split_codec(family: str) -> tuple[str, int]:
    """``kvzip-pair-int4`` -> (``kvzip-pair``, 4); a family without a codec suffix -> (family, 16)."""
    for bits, suffix in CODECS.items():
        if suffix and family.endswith(suffix):
            return family[: -len(suffix)], bits
    return family, 16


def with_key_group(method: str, key_group: int | None) -> str:
    """``kvzip-pair-k4v2@0.125`` with key groups of 32 entries -> ``kvzip-pair-k4v2-g32@0.125`` (None: the default
    groups of its ``kv_bits``, name unchanged): layouts measured against the default, paired."""
    if key_group is None:
        return method
    family, at, ratio = method.partition("@")
    return f"{family}-g{key_group}{at}{ratio}"


def default_layout(method: str) -> str | None:
    """The default-layout twin of a ``with_key_group`` method (``...-k4v2-g32@r`` -> ``...-k4v2@r``), else None."""
    family, at, ratio = method.partition("@")
    stem, dash, group = family.rpartition("-g")
    return f"{stem}{at}{ratio}" if dash and group.isdigit() else None


def method_order(method: str) -> tuple:
    family, r = parse_method(method)
    family, bits = split_codec(family)
    families = ["full", "reprefill", "chunk-rag", "kvzip-pair", "kvzip-fast", "kvzip-structure", "kvzip-value",
                "kvzip-uniform",
                "kvzip-head", "snapkv", "h2o", "keynorm", "random"]
    return (families.index(family) if family in families else len(families), -(r or 0), -bits, method)


def target_row(name: str, value, threshold, met: bool | None, measured: str, n=None, note: str = "") -> dict:
    """One row of the targets table (``met`` None: the run could not decide it)."""
    return {"target": name, "value": value, "threshold": threshold, "met": met, "measured": measured, "n": n,
            "note": note}
