"""What a run says of itself before it trains: its data, device, model, augmentation and the plan of what trains
when, printed, and the same recorded in run.json."""
from __future__ import annotations

import dataclasses
import platform
import time

import torch

from .. import __version__
from ..errors import flag
from ..images import folders
from .build import Training
from .config import FinetuneConfig, Source
from .model import parameter_names


def describe(training: Training, source: Source, config: FinetuneConfig, data_dir: str, threads: str) -> list[str]:
    """The lines a run prints at its start; ``threads`` says how many CPU threads and why."""
    images, dist = training.data, training.dist
    skipped = f"; skipped {len(images.skipped)} unreadable files (first: {images.skipped[0]})" \
        if images.skipped else ""
    lines = [f"{len(images.train_set)} training and {len(images.val_set)} validation images, "
             f"{len(images.classes)} classes{skipped}",
             f"device {training.device} x{dist.world}, {training.precision.name}"
             f"{', channels_last' if images.channels_last else ''}{', compiled' if config.compile else ''}, "
             f"{threads}, {images.steps_per_epoch} steps per epoch",
             f"model: {_blocks(source)}, {images.img_size} px; augmentation: "
             f"{images.augmentation.describe()}"]
    if config.val_split is not None and folders.has_val_folder(data_dir):
        lines.append(f"{flag('val_split')} {config.val_split:g} is not used: {data_dir} has train/ and val/")
    return lines + training.prepared.notes + [plan(training, config)]


def _blocks(source: Source) -> str:
    if source.se is None:
        return "plain (no SE)"
    return "with SE" if source.se.block == "se" else f"with {source.se.block} blocks at SE's sites"


def plan(training: Training, config: FinetuneConfig) -> str:
    """What trains when, at which learning rate."""
    fresh, model, trains = training.prepared.fresh, training.model, training.prepared.trains
    trained_lr = config.lr * config.backbone_lr_scale
    if trains is not None:
        count = sum(p.numel() for n, p in model.named_parameters() if n in trains)
        return (f"plan: an adapter run: all {config.epochs} epoch(s) train {count:,} parameters at lr {config.lr:g}, "
                "the base frozen; best and last are adapter files, loaded with their base")
    if fresh == parameter_names(model):
        return f"plan: random weights, so everything trains from the start at lr {config.lr:g}"
    if not fresh:
        return f"plan: nothing new to warm up; everything trains at lr {trained_lr:g}"
    count = sum(p.numel() for n, p in model.named_parameters() if n in fresh)
    warmup = training.se_warmup_epochs
    if warmup >= config.epochs:
        return (f"plan: all {config.epochs} epoch(s) train only the new parts ({count:,} parameters) at lr "
                f"{config.lr:g}; the trained layers stay frozen ({flag('epochs')} {config.epochs} is not more than "
                f"{flag('se_warmup_epochs')} {config.se_warmup_epochs})")
    first = f"{warmup} epoch(s) train only the new parts ({count:,} parameters), then " if warmup else ""
    return (f"plan: {first}everything trains, the new parts at lr {config.lr:g} and the trained ones at "
            f"{trained_lr:g}")


def run_info(training: Training, source: Source, config: FinetuneConfig, data_dir: str, threads: int) -> dict:
    """run.json: every resolved option, the data, what trains, and the versions of everything involved."""
    import timm
    import torchvision
    images, model = training.data, training.model
    return {
        "versions": {"seify": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "timm": timm.__version__, "python": platform.python_version()},
        "source": source.to_dict(), "config": config.to_dict(), "data": str(data_dir), "classes": images.classes,
        "train_images": len(images.train_set), "val_images": len(images.val_set),
        "skipped_files": len(images.skipped), "img_size": images.img_size,
        "augmentation": dataclasses.asdict(images.augmentation), "device": str(training.device),
        "world_size": training.dist.world, "threads": threads, "workers": images.workers,
        "precision": training.precision.name,
        "se_warmup_epochs": training.se_warmup_epochs, "lr_warmup_epochs": config.lr_warmup_epochs,
        "new_parameters": len(training.prepared.fresh), "parameters": len(parameter_names(model)),
        "adapter_parameters": None if training.prepared.trains is None else len(training.prepared.trains),
        "notes": training.prepared.notes, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
