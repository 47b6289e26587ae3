"""Rich progress views on stderr: the per-epoch bar (rank 0 only) and the factory the other training
views share (`stderr_progress`)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def stderr_progress(*columns, enabled: bool = True, transient: bool = False) -> Progress:
    """A rich Progress drawn on stderr; when not `enabled`, a silent one (the same calls, nothing drawn)."""
    return Progress(*columns, console=Console(stderr=True), transient=transient, disable=not enabled)


class EpochBar:
    """`with EpochBar(on, epoch, epochs, batches) as bar: bar.advance(loss, acc)`; a no-op when off."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, batches: int):
        self._progress = stderr_progress(
            TextColumn(f"epoch {epoch + 1}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  acc {task.fields[acc]:.3f}"),
            TimeElapsedColumn(), TimeRemainingColumn(), enabled=enabled)
        self._task = self._progress.add_task("train", total=batches, loss=float("nan"), acc=float("nan"))

    def __enter__(self) -> "EpochBar":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    @property
    def enabled(self) -> bool:
        return not self._progress.disable

    def advance(self, loss: float, acc: float) -> None:
        if self.enabled:
            self._progress.update(self._task, advance=1, loss=loss, acc=acc)
