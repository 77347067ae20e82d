"""The indexing progress display: documents by name, and the stages of the one being compressed."""

from __future__ import annotations

from typing import ClassVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .output import err_console, show


class IndexProgress:
    """Rich progress: one bar for documents and, for the document being compressed, one bar per stage.

    The stages are those ``compress(progress=)`` and ``CacheStore.add_document(progress=)`` report: ``prefill`` and
    ``score`` (chunks of the current segment) and ``compress`` (segments done). A stage's bar appears, pulsing,
    as soon as the stage starts, so long chunks show the elapsed time while they run.
    """

    STAGES: ClassVar[dict[str, str]] = {"prefill": "prefill chunks", "score": "scoring chunks", "compress": "segments"}
    NEXT: ClassVar[dict[str, str]] = {"prefill": "score"}

    def __init__(self, total_documents: int, scoring: bool = True):
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", style="bold"),
            BarColumn(bar_width=32),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err_console,
            transient=False,
        )
        self.scoring = scoring  # level "head" has no per-document scoring pass
        self.documents = self.progress.add_task("documents", total=total_documents)
        self.stages: dict[str, int] = {}
        self.completed: dict[str, int] = {}
        self.totals: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, stage: str, total: int | None) -> int:
        if stage not in self.stages:
            self.stages[stage] = self.progress.add_task("  " + self.STAGES.get(stage, stage), total=total)
        return self.stages[stage]

    def start_document(self, name: str) -> None:
        for task in self.stages.values():
            self.progress.remove_task(task)
        self.stages.clear()
        self.completed.clear()
        self.totals.clear()
        self.progress.update(self.documents, description=f"documents · {show(name)}")
        self._task("prefill", None)  # pulses until the first chunk is done

    def callback(self, stage: str, done: int, total: int) -> None:
        task = self._task(stage, total)
        if stage in ("prefill", "score") and 0 < done <= self.completed.get(stage, 0):
            self.progress.reset(task, total=total)  # the next segment starts over
        self.completed[stage] = done
        self.progress.update(task, completed=done, total=total)
        self.totals[stage] = total
        following = self.NEXT.get(stage)
        if done >= total and following and (self.scoring or following != "score"):
            following_task = self._task(following, None)
            if following in self.totals and self.completed.get(following, 0) >= self.totals[following]:
                self.progress.reset(following_task, total=None)  # the next segment's pass is starting
                self.completed[following] = 0

    def finish_document(self) -> None:
        self.progress.advance(self.documents)
        if self.progress.tasks[0].finished:
            self.progress.update(self.documents, description="documents")
