"""What a run shows: rich progress bars on a terminal, one plain line per epoch (and every N steps) in a log."""
from __future__ import annotations


class PlainLog:
    """One line per epoch and every --log-every steps: what a log file should hold."""

    def __init__(self, enabled: bool, every: int = 50):
        self.enabled, self.every = enabled, every

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, flush=True)

    def epoch_start(self, epoch, epochs, steps, first, phase):
        self.epochs, self.steps = epochs, steps
        self.line(f"epoch {epoch + 1}/{epochs}: training {phase}")

    def step(self, batch, loss, top1, lr, rate):
        if self.every and batch % self.every == 0:
            self.line(f"  step {batch}/{self.steps} loss {loss:.4f} top1 {top1:.1f}% lr {lr:.3g} {rate:.1f} img/s")

    def epoch_end(self, row):
        self.line(f"epoch {row['epoch']}/{self.epochs}: train loss {row['train_loss']:.4f} top1 "
                  f"{row['train_top1']:.1f}% | val loss {row['val_loss']:.4f} top1 {row['val_top1']:.1f}% top5 "
                  f"{row['val_top5']:.1f}% | {row['images_per_sec']:.1f} img/s, {row['seconds']:.1f}s")

    def done(self):
        pass


class SilentLog(PlainLog):
    """Nothing at all: for ``--json``, where stdout holds one document."""

    def __init__(self, enabled: bool, every: int = 0):
        super().__init__(False, every)


class RichLog(PlainLog):
    """Progress bars for epochs and steps with loss, accuracy, learning rate, images/s and time left."""

    def __init__(self, enabled: bool, every: int = 50):
        super().__init__(enabled, every)
        self.progress = None

    def _ensure(self):
        if self.progress is None:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
            self.progress.start()
            self.epochs_task = self.progress.add_task("epochs", total=self.epochs, info="")
            self.steps_task = self.progress.add_task("steps", total=self.steps, info="")

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def epoch_start(self, epoch, epochs, steps, first, phase):
        self.epochs, self.steps = epochs, steps
        if not self.enabled:
            return
        self._ensure()
        self.progress.update(self.epochs_task, completed=epoch, description=f"epoch {epoch + 1}/{epochs}")
        self.progress.reset(self.steps_task, total=steps, completed=first, info=phase)

    def step(self, batch, loss, top1, lr, rate):
        if self.enabled:
            self.progress.update(self.steps_task, completed=batch,
                                 info=f"loss {loss:.3f} top1 {top1:.1f}% lr {lr:.2g} {rate:.0f} img/s")

    def epoch_end(self, row):
        if self.enabled:
            self.progress.update(self.epochs_task, completed=row["epoch"],
                                 info=f"val top1 {row['val_top1']:.1f}%")
            super().epoch_end(row)

    def done(self):
        if self.progress is not None:
            self.progress.refresh()
            self.progress.stop()
            self.progress = None
