"""The package's shape (issue 22): layers that import one way only, test infrastructure outside the wheel, plotting
an extra. Imports are read from the source (every ``import``, top-level or inside a function), nothing is run."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

import pytest

from kvzip_rag.extras import MissingExtraError, pyplot

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"kvzip_rag": ROOT / "kvzip_rag", "kvzip_rag.store": ROOT / "store",
            "kvzip_rag.integrations": ROOT / "integrations"}
ENGINE = ["kvzip_rag.models", "kvzip_rag.prompt", "kvzip_rag.cache", "kvzip_rag.attention", "kvzip_rag.budget",
          "kvzip_rag.prefill", "kvzip_rag.compression", "kvzip_rag.quant", "kvzip_rag.scorers",
          "kvzip_rag.generate"]


def _module_files() -> dict[str, Path]:
    files = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts))
            files[name.removesuffix(".__init__")] = path
    return files


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


@cache
def _graph() -> dict[str, set[str]]:
    files = _module_files()
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets = set()
        tree = ast.parse(path.read_text())
        type_only = {id(n) for block in ast.walk(tree) if _is_type_checking(block) for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in type_only:  # ``if TYPE_CHECKING:`` imports are annotations, never run
                continue
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                module = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                targets.add(module)
                targets |= {f"{module}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def _reaches(start: str, goal_prefix: str) -> list[str] | None:
    """An import path from ``start`` to a module under ``goal_prefix``, or None."""
    graph, seen, stack = _graph(), {start}, [[start]]
    while stack:
        path = stack.pop()
        for nxt in sorted(graph.get(path[-1], ())):
            if nxt == goal_prefix or nxt.startswith(goal_prefix + "."):
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append(path + [nxt])
    return None


def test_the_graph_sees_lazy_imports():
    assert "kvzip_rag.scorers.fast_gate" in _graph()["kvzip_rag.scorers.fast"]  # a relative import inside a function
    assert "kvzip_rag.store.objects" in _graph()["kvzip_rag.store.cache_store"]


@pytest.mark.parametrize("engine", ENGINE)
def test_the_engine_never_imports_the_store_or_what_sits_above_it(engine):
    for above in ("kvzip_rag.store", "kvzip_rag.qa", "kvzip_rag.bench", "kvzip_rag.cli"):
        assert _reaches(engine, above) is None, _reaches(engine, above)


def test_the_store_never_imports_what_sits_above_it():
    for name in _graph():
        if name.startswith("kvzip_rag.store"):
            for above in ("kvzip_rag.qa", "kvzip_rag.bench", "kvzip_rag.cli", "kvzip_rag.integrations"):
                assert _reaches(name, above) is None, _reaches(name, above)


def test_scorers_do_not_import_compression():
    for name in _graph():
        if name.startswith("kvzip_rag.scorers"):
            assert _reaches(name, "kvzip_rag.compression") is None, _reaches(name, "kvzip_rag.compression")


def test_benchmark_fidelity_summary_report_import_one_way():
    """report -> summary -> fidelity -> methods (the runner's own circle with fidelity is the runner's to break)."""
    graph = _graph()
    assert "kvzip_rag.bench.summary" not in graph["kvzip_rag.bench.fidelity"]
    assert "kvzip_rag.bench.report" not in graph["kvzip_rag.bench.summary"]
    assert "kvzip_rag.bench.methods" in graph["kvzip_rag.bench.fidelity"]


@pytest.mark.parametrize("task", ["fidelity", "multidoc", "quant", "grounding", "scale", "contention",
                                  "conversations", "report", "summary", "tasks"])
def test_the_benchmark_runner_knows_no_task(task):
    """Tasks use the runner's shared pipeline; the runner only dispatches (bench/tasks.py names the tasks)."""
    assert _reaches("kvzip_rag.bench.runner", f"kvzip_rag.bench.{task}") is None, \
        _reaches("kvzip_rag.bench.runner", f"kvzip_rag.bench.{task}")


def test_benchmark_tasks_use_the_bench_through_public_members():
    for name, path in _module_files().items():
        if name.startswith("kvzip_rag.bench.") and name != "kvzip_rag.bench.runner":
            assert not re.search(r"\bbench\._[a-z]", path.read_text()), name


@pytest.mark.parametrize("above", ["kvzip_rag.composers", "kvzip_rag.compose"])
def test_composition_does_not_import_the_service(above):
    """qa -> composers -> compose, never back (the composers get the service as an argument)."""
    assert _reaches(above, "kvzip_rag.qa") is None, _reaches(above, "kvzip_rag.qa")


def test_abstention_does_not_import_the_service():
    """qa -> abstain, never back: fitting the calibration, which answers through the service, is a bench module."""
    assert _reaches("kvzip_rag.abstain", "kvzip_rag.qa") is None, _reaches("kvzip_rag.abstain", "kvzip_rag.qa")


def test_the_llamaindex_engines_reach_no_private_index_member():
    """The retriever, the engines and persistence call the service (``index.qa``) and the index's public members,
    never its private ones (``index._store``, ``self._index._qa``)."""
    folder = PACKAGES["kvzip_rag.integrations"] / "llamaindex"

    def private(tree: ast.AST, own: bool) -> set[str]:
        """Private attributes read on ``self`` (``own``) or on anything else."""
        return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr.startswith("_")
                and not n.attr.startswith("__") and (isinstance(n.value, ast.Name) and n.value.id == "self") == own}

    index_members = private(ast.parse((folder / "index.py").read_text()), own=True)
    assert {"_qa", "_store"} <= index_members
    for name in ("retriever.py", "query_engine.py", "chat_engine.py", "persistence.py"):
        reached = private(ast.parse((folder / name).read_text()), own=False) & index_members
        assert not reached, (name, reached)


def test_store_modules_import_no_private_store_member():
    for name, path in _module_files().items():
        if name.startswith("kvzip_rag.store.") and name not in ("kvzip_rag.store.cache_store",
                                                                "kvzip_rag.store.indexer"):
            text = path.read_text()
            for member in ("store._read(", "store._write(", "store._where(", "store._label(", "store._load_prefix("):
                assert member not in text, (name, member)


def test_test_servers_are_not_in_the_package():
    assert importlib.util.find_spec("kvzip_rag.bench.services") is None
    assert (ROOT / "tests" / "services.py").is_file()


def test_matplotlib_is_the_plots_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("matplotlib") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["plots"] == ["matplotlib>=3.8"] and "plots" in extras["all"][0]


def test_plotting_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r"kvzip-rag\[plots\]"):
        pyplot()


def test_compress_is_the_function_and_its_module_has_another_name():
    import kvzip_rag
    import kvzip_rag.compression as module

    assert callable(kvzip_rag.compress) and module.compress is kvzip_rag.compress
    assert importlib.util.find_spec("kvzip_rag.compress") is None


def test_the_readme_architecture_names_modules_that_exist():
    """Every module the README's "How it works" section names is there (a rename updates the README)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## How it works"):text.index("\n## ", text.index("### Repository layout"))]
    files = [path.as_posix() for folder in (*PACKAGES.values(), ROOT / "tests") for path in folder.rglob("*.py")]
    named = set(re.findall(r"[\w/]+\.py\b", section))
    assert {"kvzip_rag/qa.py", "store/ranking.py", "budget.py", "generate.py"} <= named
    missing = [name for name in named if not any(f.endswith("/" + name) for f in files)]
    assert not missing, missing


@pytest.mark.parametrize("module", sorted(m for m in _module_files() if m.startswith("kvzip_rag.bench.")))
def test_no_benchmark_module_is_imported_back_by_what_it_imports(module):
    assert _reaches(module, module) is None, _reaches(module, module)
