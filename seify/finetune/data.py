"""Image-folder data: DATA/train/<class>/* and DATA/val/<class>/*, or one tree split by --val-split."""
from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..errors import SeifyError


@dataclass
class Samples:
    """(path, class index) pairs of one split, and the files that were not readable images."""
    items: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def _readable(path: Path) -> bool:
    """Opening reads only the header: cheap enough to check every file before training starts."""
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False


def scan(root: Path, classes: list[str]) -> Samples:
    samples = Samples([])
    for index, name in enumerate(classes):
        folder = root / name
        files = _files(folder) if folder.is_dir() else []
        good = [f for f in files if _readable(f)]
        samples.skipped += [str(f) for f in files if f not in set(good)]
        if not good:
            raise SeifyError(f"class '{name}' has no readable images in {folder}; add images or remove the folder")
        samples.items += [(str(f), index) for f in good]
    return samples


def discover(data: str | Path, val_split: float | None = None, seed: int = 0,
             strict: bool = False) -> tuple[list[str], Samples, Samples]:
    """(class names, train samples, val samples) for an image folder, failing at once on a bad tree."""
    root = Path(data)
    if not root.is_dir():
        raise SeifyError(f"data folder {data} does not exist")
    if (root / "train").is_dir():
        classes = [p.name for p in _class_dirs(root / "train")]
        _check_classes(classes, root / "train")
        train = scan(root / "train", classes)
        if not (root / "val").is_dir():
            if val_split is None:
                raise SeifyError(f"{data} has train/ but no val/; add DATA/val/<class>/ or pass --val-split 0.1")
            train, val = _split(train, val_split, seed)
        else:
            extra = sorted({p.name for p in _class_dirs(root / "val")} - set(classes))
            if extra:
                raise SeifyError(f"{data}/val has classes that train/ lacks: {', '.join(extra[:5])}")
            val = scan(root / "val", classes)
    elif val_split is not None:
        classes = [p.name for p in _class_dirs(root)]
        _check_classes(classes, root)
        train, val = _split(scan(root, classes), val_split, seed)
    else:
        raise SeifyError(f"{data} has no train/ folder; use DATA/train/<class>/ and DATA/val/<class>/, "
                         "or pass --val-split 0.1 to split a single DATA/<class>/ tree")
    skipped = train.skipped + val.skipped
    if skipped and strict:
        raise SeifyError(f"{len(skipped)} files are not readable images (first: {skipped[0]}); remove them or "
                         "drop --strict-data to skip them")
    return classes, train, val


def _check_classes(classes: list[str], root: Path) -> None:
    if len(classes) < 2:
        raise SeifyError(f"{root} has {len(classes)} class folder(s); classification needs at least 2")


def _split(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Per-class split, the same for the same seed whatever the file system's order."""
    if not 0 < fraction < 1:
        raise SeifyError(f"--val-split must be between 0 and 1, not {fraction}")
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[int, list] = {}
    for item in samples.items:
        by_class.setdefault(item[1], []).append(item)
    for label in sorted(by_class):
        items = sorted(by_class[label])
        rng.shuffle(items)
        n_val = max(1, round(len(items) * fraction))
        if n_val >= len(items):
            raise SeifyError(f"class {label} has {len(items)} image(s): too few to split off a validation set")
        val += items[:n_val]
        train += items[n_val:]
    return Samples(train, samples.skipped), Samples(val, [])


class ImageDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[tuple[str, int]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def transforms(data_config: dict, img_size: int | None, training: bool, crop_scale=(0.08, 1.0)):
    """timm's transform factory with the model's data config (input size, mean/std, interpolation, crop)."""
    from timm.data import create_transform
    size = data_config["input_size"] if img_size is None else (3, img_size, img_size)
    extra = {"scale": tuple(crop_scale)} if training else {}
    return create_transform(tuple(size), is_training=training, interpolation=data_config["interpolation"],
                            mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                            crop_pct=data_config.get("crop_pct"), crop_mode=data_config.get("crop_mode"), **extra)


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of a permutation fixed by (seed, epoch), from a given batch on.

    A resumed run sees exactly the order the interrupted one would have seen, mid-epoch included.
    """

    def __init__(self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.shuffle, self.seed, self.rank, self.world = n, shuffle, seed, rank, world
        self.epoch, self.start = 0, 0
        self.pad = shuffle  # training ranks need equal step counts; evaluation must see each image once

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.n))
        if self.pad:
            order += order[: -(-self.n // self.world) * self.world - self.n]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return len(self._indices()) - self.start


def loader(dataset, batch_size: int, sampler: EpochSampler, workers: int, pin: bool, drop_last: bool):
    """A loader for the sampler's current epoch; its augmentation seed depends on (seed, epoch) only."""
    seed = sampler.seed * 100_003 + sampler.epoch
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed), worker_init_fn=_seed_worker if workers else None)


def _seed_worker(worker_id: int) -> None:
    from .loop import _seed_everything
    _seed_everything(torch.initial_seed() % 2**32)


def default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
