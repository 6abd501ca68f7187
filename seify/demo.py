"""``seify demo``: the whole job on data it draws itself, with nothing downloaded.

Four classes (smooth colour gradients; horizontal, vertical and diagonal stripes) in random colours, scales and
phases with noise, written as JPEGs in DATA/train and DATA/val. A resnet18 is converted, profiled, fine-tuned
and evaluated on them, in a new temporary folder unless ``out`` names one.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from .api import convert, save
from .errors import SeifyError
from .finetune.config import FinetuneConfig
from .finetune.loop import finetune
from .images.scoring import evaluate_folder
from .profile import profile

CLASSES = ("gradient", "stripes_diagonal", "stripes_horizontal", "stripes_vertical")


def _texture(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    period = rng.uniform(6, 16)
    phase_x, phase_y = rng.uniform(0, period, 2)
    if kind == "stripes_horizontal":
        mask = np.sin(2 * np.pi * (y + phase_y) / period) > 0
    elif kind == "stripes_vertical":
        mask = np.sin(2 * np.pi * (x + phase_x) / period) > 0
    elif kind == "stripes_diagonal":
        direction = rng.choice((-1.0, 1.0))
        mask = np.sin(2 * np.pi * (x + direction * y + phase_x) / (period * 1.4)) > 0
    else:
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (x * np.cos(angle) + y * np.sin(angle)) / size
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = bg + (fg - bg) * ((ramp - ramp.min()) / np.ptp(ramp))[..., None] + rng.normal(0, 12, (size, size, 3))
        return np.clip(img, 0, 255).astype(np.uint8)
    fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    while np.abs(fg - bg).sum() < 150:
        fg = rng.uniform(0, 255, 3)
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_dataset(root: str | Path, train_per_class: int = 160, val_per_class: int = 40, size: int = 64,
                 seed: int = 0) -> Path:
    """Write DATA/{train,val}/<class>/*.jpg; the same seed draws the same images."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(_texture(kind, size, rng)).save(folder / f"{i:04d}.jpg", quality=90)
    return root


def run(out: str | Path | None = None, epochs: int = 5, force: bool = False, log=None, size: int = 64,
        train_per_class: int = 160) -> dict:
    """Draw data, convert, profile, fine-tune and evaluate; returns the figures and where everything is."""
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="seify-demo-"))
    if out.exists() and any(out.iterdir()) and not force:
        raise SeifyError(f"{out} is not empty; pass {{force}} to replace the demo there or choose {{out}}", "force",
                         "out")
    start = time.perf_counter()
    data = make_dataset(out / "data", train_per_class=train_per_class, val_per_class=train_per_class // 4, size=size)
    print(f"drew {len(CLASSES)} classes of textures in {data} (train and val, {size} px JPEGs)")
    result = convert("resnet18", input_size=(3, size, size))
    converted = save(result, out / "resnet18-se.safetensors", force=True)
    print(f"converted resnet18 (random weights): {len(result.sites)} SE blocks, +{result.added_params:,} parameters, "
        f"max output change {result.max_abs_diff:.3g} -> {converted}")
    cost = profile(str(converted), batch_sizes=(1,), device="cpu", repeats=5, warmup=2)
    timing = cost.timings[0]
    print(f"profiled: +{cost.added_macs_percent:.2f}% MACs, CPU inference x{timing.infer_ratio:.2f} "
        f"and training step x{timing.train_ratio or float('nan'):.2f} of the base model")
    config = FinetuneConfig(out=str(out / "run"), epochs=epochs, batch_size=32, lr=2e-3, img_size=size,
                            device="cpu", log_every=0, force=True)
    run_result = finetune(str(converted), str(data), config, log=log)
    metrics = evaluate_folder(str(out / "run" / "best.safetensors"), str(data / "val"), device="cpu", workers=2)
    seconds = time.perf_counter() - start
    print(f"evaluated {out / 'run' / 'best.safetensors'}: top-1 {metrics['top1']:.1f}% on {metrics['images']} "
        f"validation images")
    artifacts = {"data": str(data), "converted": str(converted), "run": str(out / "run"),
                 "best": str(out / "run" / "best.safetensors"), "curves": str(out / "run" / "curves.png"),
                 "metrics": str(out / "run" / "metrics.csv")}
    for name, path in artifacts.items():
        print(f"  {name:10s} {path}")
    print(f"demo finished in {seconds:.0f} s with {metrics['top1']:.1f}% validation top-1")
    return {"top1": metrics["top1"], "seconds": seconds, "best_epoch": run_result.best_epoch, **artifacts}
