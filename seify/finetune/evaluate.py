"""Accuracy of a classifier on an image folder: top-1, top-5, loss, per-class accuracy, confusion matrix."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SeifyError
from .data import EpochSampler, ImageDataset, default_workers, loader, scan, transforms
from .dist import Dist


def evaluate(model: nn.Module, batches, device: torch.device, num_classes: int, autocast=contextlib.nullcontext,
             dist: Dist = Dist(), channels_last: bool = False) -> dict:
    """Metrics over every batch (summed over ranks when distributed)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = top5 = 0.0
    with torch.inference_mode():
        for images, labels in batches:
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
            "confusion": confusion.tolist()}


def evaluate_folder(model_spec: str, data: str, batch_size: int = 64, img_size: int | None = None,
                    device: str | None = None, workers: int | None = None) -> dict:
    """``seify evaluate``: a seify file (or any MODEL) on DATA/<class>/* or DATA/val/<class>/*."""
    from ..models import create
    loaded = create(model_spec)
    root = Path(data)
    if not root.is_dir():
        raise SeifyError(f"data folder {data} does not exist")
    if (root / "val").is_dir():
        root = root / "val"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = (loaded.recipe or {}).get("classes") or folders
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise SeifyError(f"{root} has classes the model was not trained on: {', '.join(unknown[:5])}")
    if not folders:
        raise SeifyError(f"{root} has no class folders")
    present = [c for c in classes if c in folders]
    samples = scan(root, present)
    index = {name: i for i, name in enumerate(classes)}
    items = [(path, index[present[label]]) for path, label in samples.items]
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dataset = ImageDataset(items, transforms(loaded.data_config, img_size, training=False))
    sampler = EpochSampler(len(dataset), shuffle=False)
    batches = loader(dataset, batch_size, sampler, default_workers() if workers is None else workers,
                     dev.type == "cuda", drop_last=False)
    result = evaluate(loaded.model.to(dev), batches, dev, len(classes))
    return {"model": model_spec, "data": str(root), "classes": list(classes), "skipped": samples.skipped, **result}
