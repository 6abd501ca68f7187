"""Accuracy of a classifier on an image folder: top-1, top-5, loss, per-class accuracy, confusion matrix."""
from __future__ import annotations

import contextlib
import hashlib
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..device import check_device
from ..errors import SeifyError
from ..limits import CONFUSION_CLASSES, MAX_BATCH_SIZE, check_img_size, check_number, check_whole
from ..models import LoadedModel, resolve
from .folders import (
    EpochSampler,
    ImageDataset,
    Samples,
    class_folders,
    default_workers,
    discover,
    fingerprint,
    has_val_folder,
    loader,
    scan,
    transforms,
)


class Ranks(Protocol):
    """The processes of a distributed run, as scoring needs them (``seify.finetune.dist.Dist``)."""
    @property
    def enabled(self) -> bool: ...

    def all_sum(self, values: list[float], device) -> list[float]: ...


class _OneProcess:
    enabled = False

    def all_sum(self, values: list[float], device) -> list[float]:
        return values


def evaluate(model: nn.Module, batches, device: torch.device, num_classes: int, autocast=contextlib.nullcontext,
             dist: Ranks | None = None, channels_last: bool = False) -> dict:
    """Metrics over every batch (summed over ranks when distributed); ``correct`` says per image, in order, whether
    the top-1 prediction was right (this rank's images only when distributed). Counts stay on the device until the
    end; the confusion matrix is reported up to ``CONFUSION_CLASSES`` classes (per-class accuracy always)."""
    dist = dist or _OneProcess()
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    top5 = torch.zeros((), dtype=torch.int64, device=device)
    labels_seen, predicted, failures = [], [], []
    with torch.inference_mode():
        for images, labels, failed in batches:
            failures += failed
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            with autocast():
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            top5 += (logits.topk(min(5, num_classes), dim=1).indices == labels[:, None]).any(dim=1).sum()
            labels_seen.append(labels)
            predicted.append(logits.argmax(dim=1))
    labels = torch.cat(labels_seen) if labels_seen else torch.zeros(0, dtype=torch.int64, device=device)
    pred = torch.cat(predicted) if predicted else labels
    dense = num_classes <= CONFUSION_CLASSES
    counts = torch.bincount(labels * num_classes + pred, minlength=num_classes ** 2) if dense else \
        torch.cat([torch.bincount(labels, minlength=num_classes), torch.bincount(labels[pred == labels],
                                                                                 minlength=num_classes)])
    totals = dist.all_sum([float(loss_sum), float(top5), *counts.tolist()], device)
    counts = torch.tensor(totals[2:], dtype=torch.int64)
    confusion = counts.view(num_classes, num_classes) if dense else None
    images, right = (confusion.sum(dim=1), confusion.diag()) if confusion is not None else counts.view(2, -1)
    n = int(images.sum())
    return {"images": n, "loss": totals[0] / max(n, 1), "top1": 100.0 * int(right.sum()) / max(n, 1),
            "top5": 100.0 * totals[1] / max(n, 1),
            "per_class": (100 * right.double() / images.clamp(min=1)).tolist(),
            "confusion": confusion.tolist() if confusion is not None else None,
            "undecodable": [list(f) for f in failures],
            "correct": (pred == labels).int().tolist() if not dist.enabled else None}


@dataclass
class Scored:
    """The images a command runs a model over, labelled in the model's class order, and the size it runs at."""
    classes: list[str]
    dataset: ImageDataset
    where: str  # which images these are, in words
    skipped: list[str]  # files of DATA that are not readable images
    notes: list[str]
    img_size: int = 0
    size_from: str = ""  # where the size came from, in words

    def at_chance(self, top1: float) -> list[str]:
        """A warning where a model scores about what guessing would: the size or the classes may be wrong."""
        chance = 100 / max(len(self.classes), 1)
        if len(self.classes) < 2 or top1 > chance + CHANCE_POINTS:
            return []
        return [f"top-1 {top1:.2f}% is about chance ({chance:.1f}% for {len(self.classes)} classes): is "
                f"{self.img_size} px ({self.size_from}) the size it was trained at, and are these its classes? "
                "Pass --img-size N to run it at another size"]


CHANCE_POINTS = 5  # within this many points of 1/classes, a model is taken to be guessing


def size_of(loaded: LoadedModel, img_size: int | None) -> tuple[int, str]:
    """(the size a model is run at, where that size came from, in words)."""
    if img_size is not None:
        return img_size, "--img-size"
    recipe = loaded.recipe or {}
    size = int(loaded.data_config["input_size"][-1])
    if (recipe.get("finetune") or {}).get("img_size"):
        return size, "the size it was fine-tuned at"
    if recipe:
        return size, "the size its file records"
    return size, "the architecture's default: the checkpoint records no size"

def scored_images(loaded: LoadedModel, data: str, img_size: int | None = None, val_split: float | None = None,
                  seed: int | None = None, all_images: bool = False, max_images: int | None = None,
                  own_classes: bool = False) -> Scored:
    """The images of DATA to score ``loaded`` on: DATA/val where DATA has train/ and val/; the held-out part of a
    DATA/<class> tree when ``val_split`` says so, or when the model was fine-tuned on this tree with
    ``--val-split`` (it records the split, and the same images are held out again); every image of DATA otherwise,
    or with ``all_images``. ``max_images`` takes a fixed random subset of them. Labels follow the model's classes
    (its head must fit DATA), or with ``own_classes`` DATA's folders whatever the head (nothing is scored then)."""
    if val_split is not None:
        check_number(val_split, "val_split", 0, 1, low_open=True, high_open=True)
    if seed is not None:
        check_whole(seed, "seed", 0, None)
    if all_images and val_split is not None:
        raise SeifyError("pass {val_split} to score a held-out part or {all_images} to score every image, not both",
                         "val_split", "all_images")
    folder_classes, samples, where, notes = _images(data, (loaded.recipe or {}).get("finetune") or {}, val_split,
                                                    seed, all_images)
    classes = folder_classes if own_classes else loaded.classes
    if classes is None:
        classes = folder_classes
        notes.append("the model records no class names: its outputs are taken to be the folders in sorted order")
    unknown = sorted(set(folder_classes) - set(classes))
    if unknown:
        raise SeifyError(f"{data} has classes the model was not trained on: {', '.join(unknown[:5])}")
    if loaded.num_classes != len(classes) and not own_classes:
        raise SeifyError(f"{loaded.spec} has {loaded.num_classes} outputs but {data} has {len(classes)} classes; "
                         "use a model trained on these classes (seify finetune gives one)")
    index = {name: i for i, name in enumerate(classes)}
    items = [(path, index[folder_classes[label]]) for path, label in samples.items]
    if max_images is not None and len(items) > max_images:
        where = f"{max_images} of the {len(items)} {where} (each class in its share)"
        items = stratified(items, max_images)
    size, size_from = size_of(loaded, img_size)
    notes.append(f"at {size} px ({size_from})")
    return Scored(list(classes), ImageDataset(items, transforms(loaded.data_config, img_size)), where,
                  samples.skipped, notes, size, size_from)


def stratified(items: list[tuple[str, int]], size: int, seed: int = 0) -> list[tuple[str, int]]:
    """A fixed random subset of ``size`` items in which every class has an image (where ``size`` allows) and the
    rest goes to each class in its share (largest remainders): per-class statistics rest on every class, and a
    small subset is not all one class by chance."""
    by_class: dict[int, list] = {}
    for item in items:
        by_class.setdefault(item[1], []).append(item)
    base = 1 if size >= len(by_class) else 0
    rest, pool = size - base * len(by_class), len(items) - base * len(by_class)
    exact = {label: rest * (len(group) - base) / pool for label, group in by_class.items()}
    shares = {label: base + int(share) for label, share in exact.items()}
    for label in sorted(exact, key=lambda c: (int(exact[c]) - exact[c], c))[: size - sum(shares.values())]:
        shares[label] += 1
    rng = random.Random(seed)
    chosen = {item for label, group in sorted(by_class.items()) for item in rng.sample(group, shares[label])}
    return [item for item in items if item in chosen]


def batches_of(dataset: ImageDataset, batch_size: int, device: torch.device, workers: int | None = None):
    """The images in order, for scoring (no augmentation, nothing dropped)."""
    return loader(dataset, batch_size, EpochSampler(len(dataset), shuffle=False),
                  default_workers(device) if workers is None else workers, device.type == "cuda", training=False)


def evaluate_folder(model_spec: str, data: str, batch_size: int = 64, img_size: int | None = None,
                    device: str | None = None, workers: int | None = None, weights: str | None = None,
                    val_split: float | None = None, seed: int | None = None, all_images: bool = False,
                    pretrained: bool = False) -> dict:
    """``seify evaluate``: any MODEL (a seify file, a name with ``weights`` or ``pretrained``, an adapter with its
    base) on the images ``scored_images`` chooses, at the size the model was trained at unless ``img_size`` says
    otherwise."""
    _check_limits(batch_size, img_size, workers)
    dev = torch.device(check_device(device))
    loaded = resolve(model_spec, weights=weights, pretrained=pretrained)
    images = scored_images(loaded, data, img_size, val_split, seed, all_images)
    result = evaluate(loaded.model.to(dev), batches_of(images.dataset, batch_size, dev, workers), dev,
                      len(images.classes))
    skipped = images.skipped + [path for path, _ in result["undecodable"]]
    notes = _adapter_notes(loaded) + images.notes + images.at_chance(result["top1"])
    return {"model": model_spec, "weights": weights, "data": str(data), "scored": images.where,
            "img_size": images.img_size, "img_size_from": images.size_from, "classes": images.classes,
            "skipped": skipped, "notes": notes, **result}


def _adapter_notes(loaded) -> list[str]:
    """An adapter's line: which base it was put on, checked."""
    return loaded.notes if (loaded.recipe or {}).get("adapter_base") else []


def _check_limits(batch_size: int, img_size: int | None, workers: int | None) -> None:
    """The limits fine-tuning has, so that a value refused there is refused here."""
    check_whole(batch_size, "batch_size", 1, MAX_BATCH_SIZE)
    check_img_size(img_size)
    if workers is not None:
        check_whole(workers, "workers", 0, 256)


def _run_split(root: Path, trained: dict) -> tuple | None:
    """The run's split of ``root`` (classes, train, val) where ``root`` is the tree it was fine-tuned on, wherever
    it lies now (the same fingerprint; files of 0.1.0 recorded the tree's path instead), else None."""
    if "data_fingerprint" not in trained and trained.get("data") != str(root.resolve()):
        return None
    split = discover(root, trained["val_split"], trained["seed"])
    if "data_fingerprint" in trained and fingerprint(root, *split) != trained["data_fingerprint"]:
        return None
    return split


def _images(data: str, trained: dict, val_split: float | None, seed: int | None, all_images: bool):
    """(the tree's class names, the samples to score, which images those are, in words, notes)."""
    root = Path(data)
    if not root.is_dir():
        raise SeifyError(f"data folder {data} does not exist")
    if all_images and has_val_folder(root):
        classes, train, val = discover(root)
        return classes, Samples(train.items + val.items, train.skipped + val.skipped), \
            f"every image of {data} (train/ and val/)", []
    if (root / "val").is_dir():
        classes = class_folders(root / "val")
        return classes, scan(root / "val", classes), f"{root / 'val'}", []
    tree = root / "train" if (root / "train").is_dir() else root
    split, how = None, "held out"
    if all_images:
        val_split = None
    elif val_split is None and trained.get("val_split"):
        split = _run_split(root, trained)
        if split is None:
            return _changed_tree(root, tree, trained)
        val_split, seed, how = trained["val_split"], trained["seed"] if seed is None else seed, \
            "that the run held out"
    if val_split is not None:
        seed = trained.get("seed", 0) if seed is None else seed
        if split is None or seed != trained["seed"]:  # the run's split is scanned once, here or above
            split = discover(root, val_split, seed)
        classes, _, val = split
        return classes, val, f"the images of {tree} {how} with --val-split {val_split:g} --seed {seed}", []
    classes = class_folders(tree)
    return classes, scan(tree, classes), f"every image of {tree}", []


def _changed_tree(root: Path, tree: Path, trained: dict):
    """A tree the run split with --val-split whose files changed since: the images the run held out that are still
    there (a file records them by a digest of their names), said in one line; every image where a file from
    before 0.3 records none, said too, since the run trained on some of them."""
    classes = class_folders(tree)
    samples = scan(tree, classes)
    changed = f"{root} is not the tree the run trained on (its files changed since)"
    held = set(trained.get("held_out") or [])
    if not held:
        return classes, samples, f"every image of {tree}", [
            f"{changed}: all {len(samples.items)} of its images are scored, some of which it trained on; pass "
            "--all-images to say so, or --val-split F to hold out a part"]
    kept = [item for item in samples.items if name_digest(root, item[0]) in held]
    return classes, Samples(kept, samples.skipped), \
        f"the {len(kept)} images of {tree} that the run held out and are still there ({len(held)} held out)", [
            f"{changed}: scoring the images the run held out that are still there; --all-images scores all "
            f"{len(samples.items)}, some of which it trained on"]


def name_digest(root: str | Path, path: str) -> str:
    """A short digest of an image's path inside DATA: how a file records the images its run held out, without
    their names."""
    return hashlib.sha256(Path(os.path.relpath(path, root)).as_posix().encode()).hexdigest()[:12]
