"""What a run shows besides weights: metrics.csv and curves.png, refreshed from each committed checkpoint."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from ..plots import save_png, training_curves
from ..writes import atomic_write

METRICS = ("epoch", "phase", "step", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
           "lr_backbone", "images_per_sec", "seconds")


def write_views(out: Path, rows: list[dict], resumes: list[float], title: str) -> None:
    def table(tmp):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        Path(tmp).write_text(buf.getvalue())

    def curves(tmp):
        save_png(training_curves(rows, resumes, f"seify fine-tune: {title}"), tmp)
    atomic_write(out / "metrics.csv", table, force=True)
    atomic_write(out / "curves.png", curves, force=True)
