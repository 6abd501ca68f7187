"""Image-folder data: DATA/train/<class>/* and DATA/val/<class>/*, or one tree split by --val-split."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import SeifyError, first_line
from ..limits import check_choice
from . import AUGMENTATIONS


@dataclass
class Samples:
    """(path, class index) pairs of one split, and the files that were not readable images."""
    items: list[tuple[str, int]]
    skipped: list[str] = field(default_factory=list)


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_folders(root: Path) -> list[str]:
    """The class names of a DATA/<class>/ tree: its folders, sorted (ImageFolder's order)."""
    names = [p.name for p in _class_dirs(root)]
    if not names:
        raise SeifyError(f"{root} has no class folders")
    return names


def _files(folder: Path) -> list[Path]:
    """Every file under a class folder; links to folders are not followed (Python's rglob), so none loops."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


MAX_PIXELS = 64 * 1024 * 1024  # larger images are refused: a header can claim 30000x30000 to exhaust memory
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                  Image.DecompressionBombWarning)


def _open(path: str | Path) -> Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img = Image.open(path)
    if img.width * img.height > MAX_PIXELS:
        img.close()
        raise ValueError(f"{img.width}x{img.height} pixels is more than seify decodes ({MAX_PIXELS:,})")
    return img


def read_rgb(path: str | Path) -> tuple[Image.Image | None, str | None]:
    """The decoded image in RGB, or (None, why) for a file that cannot be decoded."""
    try:
        with _open(path) as img:
            return img.convert("RGB"), None
    except _DECODE_ERRORS as e:
        return None, first_line(e)


def _readable(path: Path) -> bool:
    """Opening reads only the header: cheap enough to check every file before training starts."""
    try:
        with _open(path) as img:
            img.verify()
        return True
    except _DECODE_ERRORS:
        return False


def _check_links(root: Path, folders: list[Path]) -> None:
    """Class folders that are links must stay inside their split folder and hold no other class: ``train/x -> ..``
    would train on every validation image, and a link out of DATA reads what the user never put there."""
    split = root.resolve()
    resolved = {folder: folder.resolve() for folder in folders}
    for folder, target in resolved.items():
        if folder.is_symlink() and (not target.is_relative_to(split) or target == split):
            raise _link_error(folder, target, root)
    for a, b in ((a, b) for a in resolved for b in resolved if a != b):
        if resolved[a].is_relative_to(resolved[b]):
            raise SeifyError(f"class folders {a} and {b} hold the same images ({a} is inside {resolved[b]} once "
                             "links are followed); remove the link")


def _link_error(path: Path, target: Path, root: Path) -> SeifyError:
    return SeifyError(f"{path} is a link to {target}, outside {root}: a link must stay inside the folder it is in, "
                      "or images would be read from elsewhere (or trained and validated on alike); copy the files "
                      "in, or remove the link")


def scan(root: Path, classes: list[str]) -> Samples:
    samples = Samples([])
    _check_links(root, [root / name for name in classes if (root / name).is_dir()])
    split = root.resolve()
    for index, name in enumerate(classes):
        folder = root / name
        files = _files(folder) if folder.is_dir() else []
        for f in files:
            if f.is_symlink() and not f.resolve().is_relative_to(split):
                raise _link_error(f, f.resolve(), root)
        good = [f for f in files if _readable(f)]
        samples.skipped += [str(f) for f in files if f not in set(good)]
        if not good:
            raise SeifyError(f"class '{name}' has no readable images in {folder}; add images or remove the folder")
        samples.items += [(str(f), index) for f in good]
    return samples


def has_val_folder(data: str | Path) -> bool:
    """DATA/train and DATA/val: the split is the user's, and ``--val-split`` has nothing to do."""
    return (Path(data) / "train").is_dir() and (Path(data) / "val").is_dir()


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
                raise SeifyError(f"{data} has train/ but no val/; add DATA/val/<class>/ or pass {{val_split}} 0.1",
                                 "val_split")
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
                         "or pass {val_split} 0.1 to split a single DATA/<class>/ tree", "val_split")
    skipped = train.skipped + val.skipped
    if skipped and strict:
        raise SeifyError(f"{len(skipped)} files are not readable images (first: {skipped[0]}); remove them or "
                         "drop {strict_data} to skip them", "strict_data")
    return classes, train, val


def fingerprint(data: str | Path, classes: list[str], *splits: Samples) -> dict:
    """What recognises a data tree wherever it lies, without its path (which would tell user and project names
    in every shared file): its class names, its image count, and a digest of every file's path below DATA and
    size. A moved or copied tree has the same; a tree with a file added, removed or changed has another."""
    root = str(Path(data))
    files = sorted({path for split in splits for path in [p for p, _ in split.items] + split.skipped})
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{os.path.relpath(path, root)}\t{os.path.getsize(path)}\n".encode())
    return {"classes": list(classes), "images": sum(len(split.items) for split in splits),
            "digest": f"sha256:{digest.hexdigest()}"}


def _check_classes(classes: list[str], root: Path) -> None:
    if len(classes) < 2:
        raise SeifyError(f"{root} has {len(classes)} class folder(s); classification needs at least 2")


def _split(samples: Samples, fraction: float, seed: int) -> tuple[Samples, Samples]:
    """Per-class split, the same for the same seed whatever the file system's order."""
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
    """Decoded, transformed images. With a ``seed`` (training), each image's random augmentation is drawn from
    (seed, epoch, index) alone: what a loading process drew ahead before a stop is drawn the same after it."""

    def __init__(self, items: list[tuple[str, int]], transform, seed: int | None = None):
        self.items, self.transform, self.seed, self.epoch = items, transform, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        """(image, label), or (None, (path, reason)) for a file that passed the header check but cannot be
        decoded (a truncated JPEG, a PNG with a damaged stream): one bad file must not end a run."""
        path, label = self.items[i]
        rgb, reason = read_rgb(path)
        if rgb is None:
            return None, (path, reason)
        if self.seed is None:
            return self.transform(rgb), label
        with sample_draws(sample_seed(self.seed, self.epoch, i)):
            return self.transform(rgb), label


def fill_failed(good: list, failures: list, size: int, fill: bool) -> list | None:
    """The good items of a batch. In training (``fill``) they also take the places of the images that could not
    be decoded, so that every process of a distributed run takes a step of the same size; evaluation drops those
    (None when none is left)."""
    if not good:
        if fill:
            raise SeifyError(f"no image of a batch of {size} could be decoded (first: {failures[0][0]}: "
                             f"{failures[0][1]}); check the data folder")
        return None
    return good + [good[k % len(good)] for k in range(len(failures))] if fill else good


def collate(batch: list, fill: bool):
    """(images, labels, failures), undecodable images handled as ``fill_failed`` says."""
    failures = [item[1] for item in batch if item[0] is None]
    good = fill_failed([item for item in batch if item[0] is not None], failures, len(batch), fill)
    if good is None:
        return None, None, failures
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, failures


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One image's augmentation seed in one epoch: the same on the CPU and the device path, whatever the worker
    count, the batch split or where a run was stopped."""
    return (seed * 1_000_003 + epoch) * 10_000_019 + index


@contextlib.contextmanager
def sample_draws(seed: int):
    """Every CPU generator an augmentation may draw from (torch's, Python's, numpy's) seeded for one image, and put
    back afterwards, so that loading in this process leaves the training draws (dropout, drop-path) as they were.
    The CUDA generators are left alone: augmentation never draws from them, and dropout on a GPU does."""
    saved = random.getstate(), numpy.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        numpy.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(saved[0])
            numpy.random.set_state(saved[1])


def loading_process(worker_id: int) -> None:
    """A data-loading process takes one thread: the trainer owns the cores."""
    torch.set_num_threads(1)


SMALL_IMAGE = 160  # below this many pixels a side, ImageNet's crops cut away most of what there is to see


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation: a preset, its random-resized-crop area range and the flip probability."""
    preset: str
    crop_scale: tuple[float, float]
    hflip: float

    @classmethod
    def choose(cls, preset: str, img_size: int, crop_scale=None, hflip=None) -> "Augmentation":
        """``auto`` is ``imagenet`` from 160 px up and ``light`` below; explicit values override the preset's."""
        check_choice(preset, "aug", AUGMENTATIONS)
        if preset == "auto":
            preset = "imagenet" if img_size >= SMALL_IMAGE else "light"
        # Small images hold little beyond their object: a crop must keep most of it, and flips (a prior of natural
        # photographs) turn digits, letters and symbols into other things, so light leaves them to --hflip.
        default_scale = {"none": (1.0, 1.0), "light": (0.8, 1.0), "imagenet": (0.08, 1.0)}[preset]
        default_flip = 0.5 if preset == "imagenet" else 0.0
        return cls(preset, tuple(crop_scale or default_scale), default_flip if hflip is None else hflip)

    def describe(self) -> str:
        if self.preset == "none":
            return "none (resize and centre crop, as for validation)" + \
                (f", horizontal flip p={self.hflip:g}" if self.hflip else "")
        jitter = ", colour jitter 0.4" if self.preset == "imagenet" else ""
        flip = f"horizontal flip p={self.hflip:g}" if self.hflip else "no flips (--hflip 0.5 for photographs)"
        return (f"{self.preset} (random-resized-crop of {self.crop_scale[0]:g}-{self.crop_scale[1]:g} of the area, "
                f"{flip}{jitter})")


def transforms(data_config: dict, img_size: int | None, augmentation: Augmentation | None = None):
    """timm's transform factory with the model's data config; ``augmentation`` None gives validation's."""
    from timm.data import create_transform
    size = tuple(data_config["input_size"] if img_size is None else (3, img_size, img_size))
    common = dict(interpolation=data_config["interpolation"], mean=tuple(data_config["mean"]),
                  std=tuple(data_config["std"]), crop_pct=data_config.get("crop_pct"),
                  crop_mode=data_config.get("crop_mode"))
    if augmentation is None or augmentation.preset == "none":
        evaluation = create_transform(size, is_training=False, **common)
        if augmentation is None or not augmentation.hflip:
            return evaluation
        from torchvision.transforms import Compose, RandomHorizontalFlip
        return Compose([RandomHorizontalFlip(augmentation.hflip), evaluation])
    jitter: dict[str, Any] = {"color_jitter": 0.4 if augmentation.preset == "imagenet" else None}
    return create_transform(size, is_training=True, scale=augmentation.crop_scale, hflip=augmentation.hflip,
                            interpolation=common["interpolation"], mean=common["mean"], std=common["std"], **jitter)


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


def loader(dataset, batch_size: int, sampler: EpochSampler, workers: int, pin: bool, training: bool,
           collate_fn=None):
    """Batches of (images, labels, failures) for the sampler's current epoch. Training drops the last incomplete
    batch. The loader is made anew each epoch, so its processes get a dataset that knows the epoch."""
    dataset.epoch = sampler.epoch
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin, drop_last=training,
        collate_fn=collate_fn or functools.partial(collate, fill=training),
        worker_init_fn=loading_process if workers else None)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers(device: torch.device) -> int:
    """On a GPU, decoding must keep up with the device; on a CPU the model is the bottleneck, and one loading
    process overlaps decoding with compute without taking cores from it."""
    return min(8, usable_cores()) if device.type == "cuda" else 1
