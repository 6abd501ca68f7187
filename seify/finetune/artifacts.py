"""What a run leaves in --out besides weights: metrics.jsonl, metrics.csv and curves.png, all written atomically."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from ..checkpoint import atomic_write

METRICS = ("epoch", "phase", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "lr_backbone",
           "images_per_sec", "seconds")


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def write_metrics(out: Path, rows: list[dict]) -> None:
    def jsonl(tmp):
        Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in rows))

    def table(tmp):
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=METRICS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        Path(tmp).write_text(buf.getvalue())
    atomic_write(out / "metrics.jsonl", jsonl, force=True)
    atomic_write(out / "metrics.csv", table, force=True)
    atomic_write(out / "curves.png", lambda tmp: draw_curves(rows).save(tmp, format="PNG"), force=True)


_COLOURS = {"train_loss": (31, 119, 180), "val_loss": (255, 127, 14), "train_top1": (44, 160, 44),
            "val_top1": (214, 39, 40), "val_top5": (148, 103, 189)}


def draw_curves(rows: list[dict], width: int = 900, height: int = 360):
    """Loss and accuracy per epoch, side by side, drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    panel = width // 2
    _panel(draw, rows, ("train_loss", "val_loss"), (0, 0, panel, height), "loss", None)
    _panel(draw, rows, ("train_top1", "val_top1", "val_top5"), (panel, 0, width, height), "accuracy (%)", (0, 100))
    return img


def _panel(draw, rows, keys, box, title, y_range):
    x0, y0, x1, y1 = box[0] + 50, box[1] + 30, box[2] - 20, box[3] - 40
    draw.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
    draw.text((x0, 8), title, fill="black")
    values = [r[k] for r in rows for k in keys if r.get(k) is not None]
    if not values:
        return
    lo, hi = y_range or (min(values), max(values))
    hi = hi if hi > lo else lo + 1
    epochs = [r["epoch"] for r in rows]
    e0, e1 = min(epochs), max(max(epochs), min(epochs) + 1)
    draw.text((box[0] + 4, y0 - 6), f"{hi:.3g}", fill="black")
    draw.text((box[0] + 4, y1 - 6), f"{lo:.3g}", fill="black")
    draw.text((x0, y1 + 6), f"epoch {e0}", fill="black")
    draw.text((x1 - 50, y1 + 6), f"epoch {e1}", fill="black")

    def point(epoch, value):
        return (x0 + (x1 - x0) * (epoch - e0) / (e1 - e0), y1 - (y1 - y0) * (value - lo) / (hi - lo))
    for i, key in enumerate(keys):
        pts = [point(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        colour = _COLOURS[key]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for px, py in pts:
            draw.ellipse((px - 3, py - 3, px + 3, py + 3), fill=colour)
        draw.text((x0 + 8, y0 + 6 + 14 * i), key, fill=colour)
