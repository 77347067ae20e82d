"""Optional frameworks are extras; importing an adapter (or drawing a plot) without its extra says which one to
install."""

from __future__ import annotations

import importlib.util

from .errors import KVzipError


class MissingExtraError(KVzipError, ImportError):
    """An adapter was imported without the framework it adapts (the message names the extra to install)."""


def require(module: str, extra: str, what: str) -> None:
    """Raise :class:`MissingExtraError` naming ``pip install 'kvzip-rag[extra]'`` when ``module`` is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing or blocked
        found = False
    if not found:
        raise MissingExtraError(
            f"{what} needs the {module!r} package, which is not installed: pip install 'kvzip-rag[{extra}]' "
            "(or 'kvzip-rag[all]')"
        )


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (plots are written as PNGs, never shown), or
    :class:`MissingExtraError` naming the ``[plots]`` extra."""
    require("matplotlib", "plots", "drawing plots")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt
