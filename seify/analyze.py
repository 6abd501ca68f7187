"""``seify analyze``: what the SE blocks learned on your data, site by site (the paper's Sec. 7.2, Figs. 6 and 7).

Every SE gate is recorded over the images: per channel its mean and spread over images and its mean per class;
per site a class-specificity score (the spread of the class means over the spread within classes, summed over
channels: near 0 where every class gets the same gates, large where the class decides them) and the saturation
(the share of gates within 0.05 of 0 or 1). The full vectors go to ``gates.safetensors`` beside ``analysis.json``;
``excitations.png`` is the paper's Fig. 6 for your data, ``summary.png`` specificity and saturation against depth.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import kernels
from .checkpoint import atomic_write, check_output_folder
from .counting import count_macs
from .device import check_device
from .errors import SeifyError
from .images.scoring import batches_of, scored_images
from .limits import check_whole
from .models import LoadedModel, model_of, name_of, resolve
from .plots import excitations, gate_summary, save_png
from .se import SqueezeExcite

SATURATED = 0.05  # a gate this close to 0 or 1 is saturated


@dataclass
class GateStats:
    """One SE site's gates over a set of images (the gate's own output, before any x2 of a fresh block)."""
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
        per_class = {name: {"images": int(n), "mean": _number(m.mean()), "std_over_channels": _number(m.std())}
                     for name, n, m in zip(classes, self.class_images.tolist(), self.class_mean, strict=True)}
        return {"path": self.path, "stage": self.stage, "channels": self.channels, "params": self.params,
                "macs": self.macs, "images": self.images, "mean": _number(self.mean.mean()),
                "std_mean": _number(self.std.mean()), "std_max": _number(self.std.max()),
                "specificity": _number(self.specificity), "saturation": _number(self.saturation),
                "std_per_million_params": _number(1e6 * self.std.mean() / max(self.params, 1)),
                "classes": per_class}


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class _Recorder:
    """Sums of each site's gates, their squares and their saturated count, overall and per class."""

    def __init__(self, blocks: dict[str, SqueezeExcite], classes: int):
        self.classes = classes
        self.sums: dict[str, dict] = {}
        self.labels: torch.Tensor | None = None
        self.hooks = [block.gate.register_forward_hook(self._record(path)) for path, block in blocks.items()]

    def _record(self, path: str):
        def hook(module, args, gate):
            g = gate.detach().double().flatten(1).cpu()
            assert self.labels is not None and len(self.labels) == len(g)
            one_hot = torch.nn.functional.one_hot(self.labels, self.classes).double()
            s = self.sums.setdefault(path, {"n": 0, "sum": 0, "sq": 0, "class_sum": 0, "class_sq": 0,
                                            "class_n": 0, "saturated": 0})
            s["n"] += len(g)
            s["sum"] = s["sum"] + g.sum(0)
            s["sq"] = s["sq"] + (g * g).sum(0)
            s["class_sum"] = s["class_sum"] + one_hot.T @ g
            s["class_sq"] = s["class_sq"] + one_hot.T @ (g * g)
            s["class_n"] = s["class_n"] + one_hot.sum(0)
            s["saturated"] += int(((g <= SATURATED) | (g >= 1 - SATURATED)).sum())
        return hook

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


def se_blocks(model: nn.Module) -> dict[str, SqueezeExcite]:
    return {path: m for path, m in model.named_modules() if isinstance(m, SqueezeExcite)}


def record_gates(model: nn.Module, batches, classes: int, device: torch.device,
                 sites: dict[str, dict] | None = None, failed: list | None = None) -> dict[str, GateStats]:
    """Run ``model`` over ``batches`` of (images, labels, failures) and summarise every SE gate; ``sites`` (the
    recipe's, by path) adds each site's stage, parameters and MACs; ``failed`` collects the (path, reason) of the
    images that could not be decoded."""
    blocks = se_blocks(model)
    recorder = _Recorder(blocks, classes)
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
    return {path: _stats(path, recorder.sums[path], blocks[path], (sites or {}).get(path, {}))
            for path in blocks if path in recorder.sums}


def _stats(path: str, s: dict, block: SqueezeExcite, site: dict) -> GateStats:
    """Per channel: the mean and the sample standard deviation (n - 1) over images. Class specificity is a one-way
    ANOVA's F ratio over all channels: the between-class mean square over the within-class one (each summed over
    channels, with its degrees of freedom, k - 1 and n - k), so that gates that do not depend on the class score about 1
    whatever the number of images and classes (0 where every gate is constant); NaN with fewer than two classes
    or no image beyond one per class."""
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
    params = sum(p.numel() for p in block.parameters())
    return GateStats(path, site.get("stage"), len(mean), params, site.get("macs"), n, mean.float(),
                     variance.sqrt().float(), class_mean.float(), counts.float(), specificity,
                     s["saturated"] / (n * len(mean)))


@dataclass
class Analysis:
    model: str
    data: str
    where: str
    classes: list[str]
    sites: list[GateStats]
    files: list[str]
    notes: list[str]
    skipped: list[str] = field(default_factory=list)  # files of DATA that could not be read as images

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "images": self.where, "classes": self.classes,
                "sites": [s.summary(self.classes) for s in self.sites], "files": self.files, "notes": self.notes,
                "skipped": self.skipped}

    def ranked(self) -> list[GateStats]:
        """Sites by how little they do for what they cost: the gates' spread over images per parameter, least
        first (a gate that hardly moves could be a constant, folded away for free)."""
        return sorted(self.sites, key=lambda s: float(s.std.mean()) / max(s.params, 1))


def analyze(model: str | nn.Module, data: str, *, weights: str | None = None, out: str | Path | None = None,
            max_images: int | None = None, batch_size: int = 64, device: str | None = None,
            val_split: float | None = None, seed: int | None = None, force: bool = False) -> Analysis:
    """Record every SE gate of ``model`` over the images of ``data`` (as ``seify evaluate`` chooses them) and
    write analysis.json, gates.safetensors, excitations.png and summary.png into ``out``. ``model`` is any spec
    seify takes, or a module you hold."""
    if max_images is not None:
        check_whole(max_images, "max_images", 1, None)
    dev = torch.device(check_device(device))
    loaded = resolve(model, weights=weights)
    if not se_blocks(loaded.model):
        raise SeifyError(f"{loaded.spec} has no SE blocks to analyze; convert it first (seify convert), or "
                         "fine-tune it (seify finetune adds them)")
    default = f"{Path(name_of(model)).name.removesuffix('.safetensors')}-analysis"
    folder = check_output_folder(out if out is not None else default, force=force)
    images = scored_images(loaded, data, val_split=val_split, seed=seed, max_images=max_images)
    failed: list = []
    stats = record_gates(loaded.model, batches_of(images.dataset, batch_size, dev), len(images.classes), dev,
                         _sites(loaded), failed)
    skipped = images.skipped + [path for path, _ in failed]
    notes = images.notes + ([f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:3])}"
                             f"{', ...' if len(skipped) > 3 else ''}"] if skipped else [])
    result = Analysis(name_of(model), str(data), images.where, images.classes, list(stats.values()), [], notes, skipped)
    result.files = _write(folder, result)
    return result


def _sites(loaded: LoadedModel) -> dict[str, dict]:
    """The recipe's sites by path, with each one's MACs at the size the model was trained at (counted on the meta
    device, as profile counts)."""
    if loaded.recipe is None:
        return {}
    sites = {s["path"]: dict(s) for s in loaded.recipe["sites"]}
    with torch.device("meta"):
        _, _, per_block = count_macs(model_of(loaded.recipe), tuple(loaded.data_config["input_size"]))
    for path, macs in per_block.items():
        sites.setdefault(path, {})["macs"] = macs
    return sites


def _write(folder: Path, result: Analysis) -> list[str]:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for s in result.sites:
        tensors.update({f"{s.path}.mean": s.mean, f"{s.path}.std": s.std, f"{s.path}.class_mean": s.class_mean,
                        f"{s.path}.class_images": s.class_images})
    classes = json.dumps(result.classes)
    files = [folder / "analysis.json", folder / "gates.safetensors", folder / "excitations.png",
             folder / "summary.png"]
    atomic_write(files[0], lambda t: Path(t).write_text(json.dumps(result.to_dict(), indent=2) + "\n"), force=True)
    atomic_write(files[1], lambda t: save_file(tensors, t, metadata={"classes": classes}), force=True)
    atomic_write(files[2], lambda t: save_png(excitations(result.sites, result.classes), t), force=True)
    atomic_write(files[3], lambda t: save_png(gate_summary(result.sites), t), force=True)
    return [str(f) for f in files]
