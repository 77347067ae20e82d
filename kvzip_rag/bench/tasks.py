"""Every ``kvzip-rag bench --task``, behind one interface: :class:`Task`.

A task has a ``name``, ``run(context)`` that returns its results, and ``section(results)``, its part of the report.
The tasks that measure methods on the shared document pipeline (:class:`~.runner.Bench`: one model, one table of
rows, bytes and timings for all of them) return what is theirs beyond those tables, and their sections make up
``results.md`` with the costs they share; a ``standalone`` task brings its own model work and writes
``<name>.json`` and ``<name>.md``. :func:`run_tasks` only dispatches.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from .presets import Preset
from .report import SECTIONS, markdown, plots
from .runner import Bench, write_json, write_outputs
from .summary import summarize

Log = Callable[[str], None]


@dataclass
class Context:
    """What every task runs with: the preset, the data and output folders, the model (loaded once, on first use),
    the log; ``bench``: the shared document pipeline, built on first use."""

    preset: Preset
    data_dir: Path
    out_dir: Path
    model_name: str | None = None
    loaded_model: Any = None
    log: Log = print
    embedding: str = "minilm"
    limit: int | None = None  # at most this many questions per set (grounding, quick runs); answers per serve setting
    threads: int | None = None  # torch threads (``--threads``); None: the library's policy (kvzip_rag.runtime)
    _bench: Bench | None = field(default=None, init=False, repr=False)

    @property
    def model(self) -> Any:
        if self.loaded_model is None:
            import kvzip_rag

            start = time.perf_counter()
            self.loaded_model = kvzip_rag.load_model(self.model_name, threads=self.threads)
            self.log(f"model {self.loaded_model.name} loaded in {time.perf_counter() - start:.1f}s; preset "
                     f"{self.preset.name}; data {self.data_dir}; output {self.out_dir}")
        return self.loaded_model

    @property
    def bench(self) -> Bench:
        if self._bench is None:
            self._bench = Bench(self.model, self.preset, self.data_dir, embedding=self.embedding, log=self.log)
        return self._bench


class Task(Protocol):
    """One ``--task``."""

    name: str
    standalone: bool  # writes <name>.json and <name>.md; else part of results.json and results.md

    def run(self, context: Context) -> dict | None:
        """Run the task; its results (``None``: all it measured is in the shared tables of ``context.bench``)."""

    def section(self, results: dict) -> list[str]:
        """Its part of the report, as Markdown lines (``results``: its own when standalone, else the whole run's)."""


@dataclass(frozen=True)
class SharedTask:
    """A task over the shared document pipeline: ``measure(bench)`` fills the bench's tables and returns what is
    its own beyond them."""

    name: str
    measure: Callable[[Bench], dict | None]
    section: Callable[[dict], list[str]]
    standalone: bool = False

    def run(self, context: Context) -> dict | None:
        return self.measure(context.bench)


@dataclass(frozen=True)
class StandaloneTask:
    """A task with its own model work and its own files (``<name>.json``, ``<name>.md``)."""

    name: str
    measure: Callable[[Context], dict]
    markdown: Callable[[dict], str]
    standalone: bool = True

    def run(self, context: Context) -> dict:
        results = self.measure(context)
        context.log(f"{self.name} done: {write_outputs(context.out_dir, self.name, results, self.markdown(results))}")
        return results

    def section(self, results: dict) -> list[str]:
        return self.markdown(results).splitlines()


def _fidelity(bench: Bench) -> dict:
    from .fidelity import run_fidelity

    return run_fidelity(bench)


def _multidoc(bench: Bench) -> None:
    from .multidoc import run_multidoc

    run_multidoc(bench)


def _quant(bench: Bench) -> dict:
    from .quant import QuantTask

    return QuantTask(bench).run()


def _grounding(context: Context) -> dict:
    from .grounding import GroundingTask

    return GroundingTask(context.model, context.preset, context.data_dir, context.out_dir, context.log,
                         context.embedding, context.limit).run()


def _scale(context: Context) -> dict:
    from .scale import run_scale_task

    return run_scale_task(context.preset, context.data_dir, context.model_name, context.model, context.log)


def _contention(context: Context) -> dict:
    from .contention import run_contention

    return run_contention(context.model_name, log=context.log)


def _conversations(context: Context) -> dict:
    from .conversations import ROUTINGS, conversation_figures

    preset = context.preset
    return conversation_figures(context.model, context.out_dir, context.limit, data_dir=context.data_dir,
                                routings=preset.conversations_routings or ROUTINGS,
                                conversation_set=preset.conversations_set,
                                routing_only=preset.conversations_routing_only, log=context.log)


def _serve(context: Context) -> dict:
    from .serve_batching import DEFAULT_REQUESTS, plot, run_serve

    results = run_serve(context.model_name, context.data_dir, requests=context.limit or DEFAULT_REQUESTS,
                        threads=context.threads, log=context.log)
    plot(results, context.out_dir)
    return results


def _precision(context: Context) -> dict:
    from .precision import DEFAULT_QUESTIONS, run_precision

    return run_precision(context.model, context.data_dir, context.limit or DEFAULT_QUESTIONS, context.log)


def _serve_http(context: Context) -> dict:
    from .serve_sweep import plot
    from .serving import run_serve

    results = run_serve(context.model_name, context.data_dir, log=context.log, sweep={})
    plot(results["sweep"], context.out_dir)
    return results


def _markdown(module: str) -> Callable[[dict], str]:
    """A standalone task's report, its module's ``markdown`` (imported when the report is written)."""

    def markdown(results: dict) -> str:
        from importlib import import_module

        return import_module(f"kvzip_rag.bench.{module}").markdown(results)

    return markdown


def _shared(name: str, measure: Callable[[Bench], dict | None]) -> SharedTask:
    return SharedTask(name, measure, SECTIONS[name])


TASKS: dict[str, Task] = {task.name: task for task in (
    _shared("squad", Bench.squad),
    _shared("needle", Bench.needle),
    _shared("narrativeqa", Bench.narrativeqa),
    _shared("fidelity", _fidelity),
    _shared("multidoc", _multidoc),
    _shared("quant", _quant),
    StandaloneTask("grounding", _grounding, _markdown("grounding")),
    StandaloneTask("scale", _scale, _markdown("scale")),
    StandaloneTask("contention", _contention, _markdown("contention")),
    StandaloneTask("conversations", _conversations, _markdown("conversations")),
    StandaloneTask("serve", _serve, _markdown("serve_batching")),
    StandaloneTask("serve-http", _serve_http, _markdown("serving")),
    StandaloneTask("precision", _precision, _markdown("precision")),
)}
DEFAULT_TASKS = ("squad", "needle", "narrativeqa")  # what runs when no --task is named


def run_tasks(names: Sequence[str], context: Context, command: str | None = None) -> dict:
    """Run the named tasks: the standalone ones each on its own, then the shared ones on one bench, whose
    results.json, results.md and plots are written here. Returns the shared run's results (if any) with each
    standalone task's under its name."""
    tasks = [TASKS[name] for name in dict.fromkeys(names)]  # in the order given
    out = {task.name: task.run(context) for task in tasks if task.standalone}
    shared = [task for task in tasks if not task.standalone]
    if not shared:
        return out
    bench = context.bench
    bench.start()
    own = {}
    for task in shared:
        try:
            result = task.run(context)
        except FileNotFoundError as error:
            bench.skipped[task.name] = f"data not found: {error}"
            bench.say(f"{task.name} skipped: {error}")
            continue
        if result is not None:
            own[task.name] = result
    results = bench.results([task.name for task in shared], own)
    results["summary"] = summarize(results, context.preset)
    results["meta"]["command"] = command
    write_json(results, context.out_dir / "results.json")
    in_report_order = sorted(shared, key=lambda task: list(SECTIONS).index(task.name))
    (context.out_dir / "results.md").write_text(
        markdown(results, command, [task.section for task in in_report_order]))
    plots(results, context.out_dir)
    context.log(f"done in {results['meta']['duration_s'] / 60:.1f} min: {context.out_dir / 'results.md'}")
    return {**results, **out}
