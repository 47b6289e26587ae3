"""The per-epoch progress bar (rich), drawn on stderr by rank 0 only."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class EpochBar:
    """`with EpochBar(on, epoch, epochs, batches) as bar: bar.advance(loss, acc)`; a no-op when off."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, batches: int):
        self._progress = None
        if enabled:
            self._progress = Progress(
                TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
                TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False)
            self._task = self._progress.add_task("train", total=batches, loss=float("nan"), acc=float("nan"))

    def __enter__(self) -> "EpochBar":
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()

    @property
    def enabled(self) -> bool:
        return self._progress is not None

    def advance(self, loss: float, acc: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=1, loss=loss, acc=acc)
