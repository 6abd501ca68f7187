"""Accuracy of a classifier on an image folder: top-1, top-5, loss, per-class accuracy, confusion matrix."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..device import check_device
from ..errors import SeifyError
from ..models import resolve
from .data import EpochSampler, ImageDataset, default_workers, loader, scan, transforms
from .dist import Dist


def evaluate(model: nn.Module, batches, device: torch.device, num_classes: int, autocast=contextlib.nullcontext,
             dist: Dist | None = None, channels_last: bool = False) -> dict:
    """Metrics over every batch (summed over ranks when distributed)."""
    dist = dist or Dist()
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = top5 = 0.0
    failures = []
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
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            k = min(5, num_classes)
            top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
            pred = logits.argmax(dim=1)
            confusion += torch.bincount(labels.cpu() * num_classes + pred.cpu(),
                                        minlength=num_classes ** 2).view(num_classes, num_classes)
    totals = dist.all_sum([loss_sum, top5] + confusion.flatten().tolist(), device)
    loss_sum, top5 = totals[0], totals[1]
    confusion = torch.tensor(totals[2:], dtype=torch.int64).view(num_classes, num_classes)
    n = int(confusion.sum())
    per_class = (confusion.diag().double() / confusion.sum(dim=1).clamp(min=1)).tolist()
    return {"images": n, "loss": loss_sum / max(n, 1), "top1": 100.0 * int(confusion.diag().sum()) / max(n, 1),
            "top5": 100.0 * top5 / max(n, 1), "per_class": [100.0 * a for a in per_class],
            "confusion": confusion.tolist(), "undecodable": [list(f) for f in failures]}


def evaluate_folder(model_spec: str, data: str, batch_size: int = 64, img_size: int | None = None,
                    device: str | None = None, workers: int | None = None, weights: str | None = None) -> dict:
    """``seify evaluate``: any MODEL (a seify file, or a name with ``weights``) on DATA/<class>/* or
    DATA/val/<class>/*, at the size the model was trained at unless ``img_size`` says otherwise."""
    if batch_size < 1:
        raise SeifyError(f"{{batch_size}} must be at least 1, not {batch_size}", "batch_size")
    if img_size is not None and not 8 <= img_size <= 4096:
        raise SeifyError(f"{{img_size}} must be from 8 to 4096, not {img_size}", "img_size")
    if workers is not None and workers < 0:
        raise SeifyError(f"{{workers}} must be at least 0, not {workers}", "workers")
    dev = torch.device(check_device(device))
    loaded = resolve(model_spec, weights=weights)
    root = Path(data)
    if not root.is_dir():
        raise SeifyError(f"data folder {data} does not exist")
    if (root / "val").is_dir():
        root = root / "val"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise SeifyError(f"{root} has no class folders")
    notes = []
    classes = loaded.classes
    if classes is None:
        classes = folders
        notes.append("the model records no class names: its outputs are taken to be the folders in sorted order")
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise SeifyError(f"{root} has classes the model was not trained on: {', '.join(unknown[:5])}")
    if loaded.num_classes != len(classes):
        raise SeifyError(f"{model_spec} has {loaded.num_classes} outputs but {root} has {len(classes)} classes; "
                         "evaluate a model trained on these classes (seify finetune gives one)")
    present = [c for c in classes if c in folders]
    samples = scan(root, present)
    index = {name: i for i, name in enumerate(classes)}
    items = [(path, index[present[label]]) for path, label in samples.items]
    dataset = ImageDataset(items, transforms(loaded.data_config, img_size))
    sampler = EpochSampler(len(dataset), shuffle=False)
    batches = loader(dataset, batch_size, sampler, default_workers(dev) if workers is None else workers,
                     dev.type == "cuda", training=False)
    result = evaluate(loaded.model.to(dev), batches, dev, len(classes))
    size = img_size or loaded.data_config["input_size"][-1]
    return {"model": model_spec, "weights": weights, "data": str(root), "img_size": size, "classes": list(classes),
            "skipped": samples.skipped, "notes": notes, **result}
