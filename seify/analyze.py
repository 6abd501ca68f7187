"""``seify analyze``: what the channel gates learned on your data, site by site (the paper's Sec. 7.2, Figs. 6
and 7): seify's SE blocks, or those a network ships (EfficientNet, MobileNetV3, RegNetY, SE-ResNet, ...).

Every gate is recorded over the images: per channel its mean and spread over images and its mean per class;
per site a class-specificity score (the spread of the class means over the spread within classes, summed over
channels: near 0 where every class gets the same gates, large where the class decides them) and the saturation
(the share of gates within 0.05 of 0 or 1). The full vectors go to ``gates.safetensors`` beside ``analysis.json``;
``excitations.png`` is the paper's Fig. 6 for your data, ``summary.png`` specificity and saturation against depth.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .counting import count_macs
from .device import check_device
from .gates import Gate, GateStats, find_gates, no_gates, record_gates
from .images.scoring import batches_of, scored_images
from .limits import check_img_size, check_pattern, check_whole
from .models import LoadedModel, model_of, name_of, resolve
from .plots import excitations, gate_summary, save_png
from .writes import atomic_write, check_output_folder


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
    img_size: int | None = None  # the size the images ran at, and where it came from
    img_size_from: str | None = None

    def to_dict(self) -> dict:
        return {"model": self.model, "data": self.data, "images": self.where, "classes": self.classes,
                "img_size": self.img_size, "img_size_from": self.img_size_from,
                "sites": [s.summary(self.classes) for s in self.sites], "files": self.files, "notes": self.notes,
                "skipped": self.skipped}

    def ranked(self) -> list[GateStats]:
        """Sites by how little they do for what they cost: the gates' spread over images per parameter, least
        first (a gate that hardly moves could be a constant, folded away for free)."""
        return sorted(self.sites, key=lambda s: float(s.std.mean()) / max(s.params, 1))


def analyze(model: str | nn.Module, data: str, *, weights: str | None = None, pretrained: bool = False,
            out: str | Path | None = None, max_images: int | None = None, batch_size: int = 64,
            device: str | None = None, val_split: float | None = None, seed: int | None = None, force: bool = False,
            include: str | None = None, exclude: str | None = None, img_size: int | None = None) -> Analysis:
    """Record every channel gate of ``model`` (seify's SE blocks or a network's own: ``seify.gates``) over the
    images of ``data`` (as ``seify evaluate`` chooses them, grouped by DATA's own classes, whatever the model's
    head) and write analysis.json, gates.safetensors, excitations.png and summary.png into ``out``. ``model`` is
    any spec seify takes, or a module you hold."""
    if max_images is not None:
        check_whole(max_images, "max_images", 1, None)
    check_img_size(img_size)
    for text, name in ((include, "include"), (exclude, "exclude")):
        check_pattern(text, name)
    dev = torch.device(check_device(device))
    loaded = resolve(model, weights=weights, pretrained=pretrained)
    gates = find_gates(loaded.model, include, exclude)
    if not gates:
        raise no_gates(loaded.spec, include, exclude)
    default = f"{Path(name_of(model)).name.removesuffix('.safetensors')}-analysis"
    folder = check_output_folder(out if out is not None else default, force=force)
    images = scored_images(loaded, data, img_size, val_split=val_split, seed=seed, max_images=max_images,
                           own_classes=True)
    failed: list = []
    stats = record_gates(loaded.model, gates, batches_of(images.dataset, batch_size, dev), len(images.classes), dev,
                         _sites(loaded, gates), failed)
    skipped = images.skipped + [path for path, _ in failed]
    notes = images.notes + gates.note() + ([f"skipped {len(skipped)} unreadable file(s): {', '.join(skipped[:3])}"
                             f"{', ...' if len(skipped) > 3 else ''}"] if skipped else [])
    result = Analysis(name_of(model), str(data), images.where, images.classes, list(stats.values()), [], notes, skipped,
                      images.img_size, images.size_from)
    result.files = _write(folder, result)
    return result


def _sites(loaded: LoadedModel, gates: dict[str, Gate]) -> dict[str, dict]:
    """Each gate's stage (seify's recipe records it) and MACs at the size the model works at (counted on the meta
    device, as profile counts)."""
    sites = {s["path"]: dict(s) for s in (loaded.recipe or {}).get("sites", [])}
    size = tuple(loaded.data_config["input_size"])
    with torch.device("meta"):  # a seify file's model rebuilt without weights; any other counted as it is
        skeleton = model_of(loaded.recipe) if loaded.recipe is not None else loaded.model
    _, _, per_gate = count_macs(skeleton, size, {p: skeleton.get_submodule(p) for p in gates})
    for path, macs in per_gate.items():
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
