"""A small image dataset drawn here, with nothing downloaded: four classes (smooth colour gradients; horizontal,
vertical and diagonal stripes) in random colours, scales and phases with noise, written as JPEGs in DATA/train and
DATA/val. ``seify demo`` and the tests train on it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
