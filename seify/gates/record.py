"""Recording gates over images: per channel, per class, their spread, specificity and saturation."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .. import kernels
from ..errors import SeifyError
from .find import Gate

SATURATED = 0.05  # a gate this close to 0 or 1 is saturated


@dataclass
class GateStats:
    """One gate over a set of images (the gate's own output, before any x2 of a fresh seify block)."""
    path: str
    stage: int | None
    channels: int
    params: int
    macs: int | None
    images: int
    mean: torch.Tensor  # (C,) over all images
    std: torch.Tensor  # (C,)
    class_mean: torch.Tensor  # (classes, C); NaN for a class without images
    class_images: torch.Tensor  # (classes,)
    specificity: float
    saturation: float

    def summary(self, classes: list[str]) -> dict:
        per_class = {name: {"images": int(n), "mean": number(m.mean()), "std_over_channels": number(m.std())}
                     for name, n, m in zip(classes, self.class_images.tolist(), self.class_mean, strict=True)}
        return {"path": self.path, "stage": self.stage, "channels": self.channels, "params": self.params,
                "macs": self.macs, "images": self.images, "mean": number(self.mean.mean()),
                "std_mean": number(self.std.mean()), "std_max": number(self.std.max()),
                "specificity": number(self.specificity), "saturation": number(self.saturation),
                "std_per_million_params": number(1e6 * self.std.mean() / max(self.params, 1)),
                "classes": per_class}


def number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _measured(module, args, y) -> torch.Tensor:
    """g per channel from ``y = x * g``: ``<x, y> / <x, x>`` over the map, 1 where ``x`` is zero."""
    x = args[0].detach().double()
    y = y.detach().double()
    dims = tuple(range(2, x.dim()))
    energy = (x * x).sum(dims)
    return torch.where(energy > 0, (x * y).sum(dims) / energy.clamp(min=1e-300), torch.ones_like(energy))


class _Recorder:
    """Sums of each gate, its squares and its saturated count, overall and per class."""

    def __init__(self, gates: dict[str, Gate], classes: int):
        self.classes = classes
        self.sums: dict[str, dict] = {}
        self.labels: torch.Tensor | None = None
        self.hooks = [(gate.activation or gate.module).register_forward_hook(self._record(gate))
                      for gate in gates.values()]

    def _record(self, gate: Gate):
        def hook(module, args, out):
            value = out if gate.activation is not None else _measured(module, args, out)
            self.add(gate.path, value.detach().double().reshape(len(value), -1).cpu())
        return hook

    def add(self, path: str, gate: torch.Tensor) -> None:
        assert self.labels is not None and len(self.labels) == len(gate)
        one_hot = torch.nn.functional.one_hot(self.labels, self.classes).double()
        s = self.sums.setdefault(path, {"n": 0, "sum": 0, "sq": 0, "class_sum": 0, "class_sq": 0, "class_n": 0,
                                        "saturated": 0})
        s["n"] += len(gate)
        s["sum"] = s["sum"] + gate.sum(0)
        s["sq"] = s["sq"] + (gate * gate).sum(0)
        s["class_sum"] = s["class_sum"] + one_hot.T @ gate
        s["class_sq"] = s["class_sq"] + one_hot.T @ (gate * gate)
        s["class_n"] = s["class_n"] + one_hot.sum(0)
        s["saturated"] += int(((gate <= SATURATED) | (gate >= 1 - SATURATED)).sum())

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def record_gates(model: nn.Module, gates: dict[str, Gate], batches, classes: int, device: torch.device,
                 sites: dict[str, dict] | None = None, failed: list | None = None) -> dict[str, GateStats]:
    """Run ``model`` over ``batches`` of (images, labels, failures) and summarise every gate; ``sites`` (by path)
    adds each one's stage and MACs; ``failed`` collects the (path, reason) of images that could not be decoded.
    ``classes`` are DATA's own: the model's head plays no part."""
    recorder = _Recorder(gates, classes)
    model = model.to(device).eval()
    try:
        with torch.inference_mode(), kernels.disabled():  # the fused kernels never call the gate module
            for images, labels, failures in batches:
                if failed is not None:
                    failed += failures
                if images is None:
                    continue
                recorder.labels = labels.cpu()
                model(images.to(device))
    finally:
        recorder.close()
    measured = min((s["n"] for s in recorder.sums.values()), default=0)
    if measured < 2:  # one image has no spread: every gate would look constant
        raise SeifyError(f"the gates were measured on {measured} image(s); at least 2 are needed to tell how they "
                         "vary over images: give DATA more images (or a larger {max_images})", "max_images")
    return {path: _stats(path, recorder.sums[path], gates[path], (sites or {}).get(path, {}))
            for path in gates if path in recorder.sums}


def _stats(path: str, s: dict, gate: Gate, site: dict) -> GateStats:
    """Per channel: the mean and the sample standard deviation (n - 1) over images. Class specificity is a one-way
    ANOVA's F ratio over all channels: the between-class mean square over the within-class one (each summed over
    channels, with its degrees of freedom, k - 1 and n - k), so that gates that do not depend on the class score
    about 1 whatever the number of images and classes (0 where every gate is constant); NaN with fewer than two
    classes or no image beyond one per class."""
    n = s["n"]
    mean = s["sum"] / n
    variance = ((s["sq"] - n * mean * mean) / max(n - 1, 1)).clamp(min=0)
    counts = s["class_n"]
    class_mean = s["class_sum"] / counts[:, None]  # NaN where a class has no image
    seen = counts > 0
    k = int(seen.sum())
    between = (counts[seen, None] * (class_mean[seen] - mean) ** 2).sum() / max(k - 1, 1)
    within = (s["class_sq"][seen].sum(0) - (counts[seen, None] * class_mean[seen] ** 2).sum(0)).clamp(min=0).sum() / \
        max(n - k, 1)
    specificity = float(between / (within + 1e-12)) if 1 < k < n else math.nan  # finite where a class decides a gate
    return GateStats(path, site.get("stage"), len(mean), gate.params, site.get("macs"), n, mean.float(),
                     variance.sqrt().float(), class_mean.float(), counts.float(), specificity,
                     s["saturated"] / (n * len(mean)))
