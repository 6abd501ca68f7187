"""``seify fold``: take channel gates out where they do nothing, for free; seify's SE blocks and the ones a network
ships (EfficientNet, MobileNetV3, RegNetY, SE-ResNet, ...: ``seify.gates``).

A gate that does not depend on the input multiplies its input by a constant per channel. That constant is folded
into the layer that makes the gate's input (a norm's affine, a convolution's or linear layer's weights and bias, a
layer scale), or else into the plain linear layers that read its output, and the gate leaves the model: it costs
no parameter and no multiply-add any more. Without DATA only gates that are constant by their weights are folded,
and the result computes exactly what the model did; a fresh ``convert`` followed by ``fold`` is the original
model again. With DATA, gates whose values, measured over its images, vary by at most ``max_gate_std`` in every
channel are folded at their mean; with ``max_top1_drop`` (the budget) the gates that cost least top-1 when folded
go first, one at a time, re-measured after each, until the next would take the drop past the budget. The change
of the outputs, the top-1 before and after, and the latency won are measured and reported, never estimated.
"""
from __future__ import annotations

import copy
import math
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from .checkpoint import save
from .counting import count_macs
from .device import check_device
from .equivalence import Difference, compare, difference
from .errors import SeifyError, first_line
from .gates import (
    Gate,
    Plan,
    find_gates,
    multiplier,
    no_gates,
    plan,
    record_gates,
    without_any_gate,
    without_gates,
)
from .images.scoring import Scored, batches_of, scored_images
from .limits import check_img_size, check_number, check_pattern, check_whole
from .models import HELD, LoadedModel, files_read, resolve
from .models.files import module_or_none
from .options import FOLD_LATENCY
from .timing import inference_ms, onnxruntime_ms, paired_change
from .writes import check_writable


@dataclass
class FoldedSite:
    path: str
    into: list[str]  # the parameters the multiplier went into
    multiplier_min: float
    multiplier_max: float
    gate_std_max: float | None  # measured over DATA; None where the gate is constant by its weights
    max_output_change: float | None = None  # this site alone folded, over DATA's images (or a probe)
    top1_alone: float | None = None  # top-1 with this gate alone folded (the budget's ranking)
    params: int = 0  # what folding it saves
    macs: int = 0


@dataclass
class Folded:
    model: str
    output: str | None  # None: nothing was written
    folded: list[FoldedSite]
    kept: list[dict]  # {"path", "why"} for every gate left in
    images: str | None  # which images were measured
    max_output_change: float  # every fold together
    top1_before: float | None = None
    top1_after: float | None = None
    params_saved: int = 0
    macs_saved: int = 0
    budget: float | None = None  # --max-top1-drop
    steps: list[dict] = field(default_factory=list)  # the budget's folds in order, each with top-1 after it
    stopped_at: dict | None = None  # the gate whose fold would have passed the budget, and the top-1 it gave
    latency: dict | None = None  # milliseconds before, after and with every gate removed; eager and onnxruntime
    img_size: int | None = None  # the size the images were measured at, and where it came from
    img_size_from: str | None = None
    image_count: int | None = None
    notes: list[str] = field(default_factory=list)
    module: nn.Module | None = field(default=None, repr=False)  # the folded model

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(replace(self, module=None)).items() if k != "module"}


def fold(model: str | nn.Module, out: str | Path | None, data: str | None = None, *, weights: str | None = None,
         pretrained: bool = False, max_gate_std: float | None = None, max_top1_drop: float | None = None,
         include: str | None = None, exclude: str | None = None, max_images: int | None = 512, batch_size: int = 64,
         device: str | None = None, latency: bool = FOLD_LATENCY, force: bool = False,
         img_size: int | None = None) -> Folded:
    """Fold the gates of ``model`` that do nothing input-dependent (see the module's doc) and write the result to
    ``out`` as a seify file whose recipe records what was folded. ``model`` may be a module you hold (it is left as
    it is); with ``out`` None nothing is written, and the folded model is ``result.module``."""
    _check(max_gate_std, max_top1_drop, max_images, include, exclude, data, img_size)
    max_gate_std = MAX_GATE_STD if max_gate_std is None else max_gate_std
    inputs = files_read(*(x for x in (model, weights) if isinstance(x, str)))
    if out is not None:
        check_writable(out, force=force, inputs=inputs)
    loaded = resolve(model, weights=weights, pretrained=pretrained)
    gates = find_gates(loaded.model, include, exclude)
    if not gates:
        raise no_gates(loaded.spec, include, exclude)
    if out is not None and loaded.weights == HELD and loaded.recipe is None:  # a module held, not a file of one
        raise SeifyError(f"{loaded.spec} carries no seify recipe to write a file with: fold it with out=None and keep "
                         "result.module, or fold the file that seify.save wrote")
    dev = torch.device(check_device(device))
    images = scored_images(loaded, data, img_size, max_images=max_images) if data is not None else None
    # decoded once and kept: every gate is measured on them alone and again with the others (max_images bounds it)
    batches = list(batches_of(images.dataset, batch_size, dev)) if images is not None else []
    stats = record_gates(loaded.model, gates, batches, len(images.classes), dev) if images is not None else {}
    original = copy.deepcopy(loaded.model).eval()
    plans, kept = _plans(loaded.model, gates, stats, math.inf if max_top1_drop is not None else max_gate_std)
    if not plans:
        raise SeifyError(f"nothing to fold in {loaded.spec} ({_reasons(kept)})", "max_gate_std")
    slots = {p for p in gates if loaded.base is not None and isinstance(module_or_none(loaded.base, p), nn.Identity)}
    costs = _costs(loaded.model, gates, loaded)
    sites = {path: FoldedSite(path, p.into, float(p.multiplier.min()), float(p.multiplier.max()),
                              float(stats[path].std.max()) if path in stats else None, **costs[path])
             for path, p in plans.items()}
    measure = _Measure(original, images, batches, loaded, dev, plans, slots)
    for site in sites.values():
        site.max_output_change, site.top1_alone = measure.alone(site.path)
    result = Folded(loaded.spec, None if out is None else str(out), [], [], images.where if images else None, 0.0,
                    top1_before=measure.measured(original)[1], budget=max_top1_drop)
    chosen = _within_budget(sites, result, measure, max_top1_drop) if max_top1_drop is not None else list(sites)
    kept.update({p: f"folding it would take the top-1 drop past {max_top1_drop:g} points"
                 for p in sites if p not in chosen})
    folded_model = measure.model_without(chosen)
    result.folded = [sites[p] for p in chosen]
    result.kept = [{"path": p, "why": why} for p, why in kept.items()]
    result.max_output_change, result.top1_after = measure.measured(folded_model)
    result.params_saved, result.macs_saved = (sum(sites[p].params for p in chosen), sum(sites[p].macs for p in chosen))
    if not chosen:
        result.notes.append(f"the budget of {max_top1_drop:g} points allows no gate: the model is written unchanged")
    result.notes += gates.note() + (images.notes + images.at_chance(result.top1_before or 0.0) if images else [])
    if images is not None:
        result.img_size, result.img_size_from = images.img_size, images.size_from
        result.image_count = len(images.dataset)
    if latency:
        result.latency = _latency(original, folded_model, gates, tuple(loaded.data_config["input_size"]),
                                  result.notes)
    result.module = folded_model.cpu()
    if out is not None:
        save(result.module, out, _recipe(loaded, gates, result, img_size), force=force, inputs=inputs)
    return result


MAX_GATE_STD = 0.01  # fold's default: a gate varying by at most this over the images is folded at its mean


def _check(max_gate_std, max_top1_drop, max_images, include, exclude, data, img_size) -> None:
    if max_gate_std is not None:
        check_number(max_gate_std, "max_gate_std", 0, 1e6)
        if max_top1_drop is not None:
            raise SeifyError("{max_top1_drop} chooses the gates by the top-1 they cost, {max_gate_std} by how much "
                             "they vary: pass one of them", "max_top1_drop", "max_gate_std")
    check_img_size(img_size)
    if img_size is not None and data is None:
        raise SeifyError("{img_size} is the size DATA's images are measured at: pass DATA", "img_size")
    if max_top1_drop is not None:
        check_number(max_top1_drop, "max_top1_drop", 0, 100)
        if data is None:
            raise SeifyError("{max_top1_drop} measures top-1 on DATA: pass DATA (an image folder of the model's "
                             "classes)", "max_top1_drop")
    if max_images is not None:
        check_whole(max_images, "max_images", 1, None)
    for text, name in ((include, "include"), (exclude, "exclude")):
        check_pattern(text, name)


def _plans(model: nn.Module, gates: dict[str, Gate], stats: dict, max_gate_std: float
           ) -> tuple[dict[str, Plan], dict[str, str]]:
    """(how each gate that can go is folded, why each other one stays)."""
    multipliers, kept = {}, {}
    for path, gate in gates.items():
        value, why = multiplier(gate, stats.get(path), max_gate_std)
        if value is None:
            kept[path] = why
        else:
            multipliers[path] = value
    plans, unplaced = plan(model, gates, multipliers)
    return plans, {**kept, **unplaced}


def _reasons(kept: dict[str, str]) -> str:
    return "; ".join(f"{path}: {why}" for path, why in list(kept.items())[:2]) + ("; ..." if len(kept) > 2 else "")


def _costs(model: nn.Module, gates: dict[str, Gate], loaded: LoadedModel) -> dict[str, dict]:
    """What folding each gate saves: its parameters and its MACs at the model's size."""
    _, _, macs = count_macs(model, tuple(loaded.data_config["input_size"]), {p: g.module for p, g in gates.items()})
    return {path: {"params": gate.params, "macs": macs[path]} for path, gate in gates.items()}


class _Measure:
    """The model with some of its planned gates folded, and what that changes: top-1 and the largest output change
    over DATA's images (or a random probe at the model's size without DATA). Each is one pass over the images,
    against the original's outputs kept from the first."""

    def __init__(self, original: nn.Module, images: Scored | None, batches: list, loaded: LoadedModel, device,
                 plans: dict[str, Plan], slots: set[str]):
        self.original, self.images, self.batches, self.loaded, self.device = original, images, batches, loaded, device
        self.plans, self.slots = plans, slots
        self.reference = self._outputs(original) if images is not None else []

    def model_without(self, paths: list[str]) -> nn.Module:
        return without_gates(self.original, {p: self.plans[p] for p in paths}, self.slots & set(paths))

    def alone(self, path: str) -> tuple[float, float | None]:
        return self.measured(self.model_without([path]))

    def measured(self, model: nn.Module) -> tuple[float, float | None]:
        """(the largest output change, top-1 in percent: None without DATA)."""
        if self.images is None:
            return compare(self.original, model, tuple(self.loaded.data_config["input_size"])).max_abs, None
        outputs = self._outputs(model)
        checked = Difference()
        for expected, got in zip(self.reference, outputs, strict=True):
            checked = checked | difference(expected, got)
        labels = [batch[1] for batch in self.batches if batch[0] is not None]
        correct = sum(int((out.argmax(1).cpu() == y).sum()) for out, y in zip(outputs, labels, strict=True))
        return checked.max_abs, 100.0 * correct / max(sum(len(y) for y in labels), 1)

    def _outputs(self, model: nn.Module) -> list[torch.Tensor]:
        model = model.to(self.device).eval()
        with torch.inference_mode():
            return [model(x.to(self.device)).float() for x, _, _ in self.batches if x is not None]


def _within_budget(sites: dict[str, FoldedSite], result: Folded, measure: _Measure, budget: float) -> list[str]:
    """The least harmful gates first (top-1 alone, then output change), each fold re-measured with those before
    it; the first that would take the drop past ``budget`` ends it."""
    assert result.top1_before is not None
    order = sorted(sites.values(), key=lambda s: (-(s.top1_alone or 0.0), s.max_output_change or 0.0, s.path))
    chosen: list[str] = []
    for site in order:
        top1 = measure.measured(measure.model_without(chosen + [site.path]))[1]
        assert top1 is not None
        if result.top1_before - top1 > budget:
            result.stopped_at = {"path": site.path, "top1": top1}
            break
        chosen.append(site.path)
        result.steps.append({"path": site.path, "top1": top1, "params_saved": site.params, "macs_saved": site.macs})
    return chosen


def _latency(original: nn.Module, folded: nn.Module, gates: dict[str, Gate], size, notes: list[str]) -> dict:
    """Batch 1, one thread: the model before and after folding and with every gate removed (the limit), eager on
    this CPU and in onnxruntime, timed in turns in one run. A timing that fails is said in ``notes`` and left out:
    it never costs the fold."""
    limit = without_any_gate(original, gates)
    models = [m.cpu() for m in (original, folded, limit)]
    timed = {}
    for runtime, timer in (("eager", inference_ms), ("onnxruntime", onnxruntime_ms)):
        try:
            timed[runtime] = timer(models, size)
        except Exception as e:  # a model this runtime cannot run (an export it refuses): the fold stands
            timed[runtime] = None
            notes.append(f"the {runtime} timing failed ({first_line(e)[:160]}); left out")
    return {runtime: None if ms is None else _timing(*ms) for runtime, ms in timed.items()}


def _timing(before: list[float], after: list[float], limit: list[float]) -> dict:
    """Medians in ms, and each change as the median of the paired ratios with its quartiles: the spread the
    report shows, and whether a change is within it."""
    after_ratio, limit_ratio = paired_change(before, after), paired_change(before, limit)
    return {"before": statistics.median(before), "after": statistics.median(after),
            "every_gate_removed": statistics.median(limit), "after_ratio": after_ratio,
            "every_gate_removed_ratio": limit_ratio, "repeats": len(before)}


def _recipe(loaded: LoadedModel, gates: dict[str, Gate], result: Folded, img_size: int | None) -> dict:
    """The recipe of the folded file: seify's blocks leave its sites, a network's own gates are recorded as
    replaced (``from_recipe`` takes them out of the rebuilt model); the size it was measured at where it was given
    (``img_size``), which later commands then default to; and the fold itself, as measured (``folds``: what its
    model card says)."""
    chosen = [site.path for site in result.folded]
    recipe = dict(loaded.recipe) if loaded.recipe is not None else loaded.plain_recipe()
    if img_size is not None:
        recipe["data_config"] = {**recipe["data_config"], "input_size": [3, img_size, img_size]}
    ours = [p for p in chosen if gates[p].ours]
    native = [p for p in chosen if not gates[p].ours]
    if ours:
        recipe["folded"] = list(recipe.get("folded") or []) + ours
        recipe["sites"] = [s for s in recipe["sites"] if s["path"] not in ours]
    if native:
        recipe["folded_native"] = list(recipe.get("folded_native") or []) + native
    how = {site.path: "constant" if gates[site.path].constant() is not None else
           "within the top-1 budget" if result.budget is not None else
           f"at its mean over the images (it varied by up to {site.gate_std_max:.3g})" for site in result.folded}
    recipe["folds"] = list(recipe.get("folds") or []) + [{
        "gates": how, "images": result.image_count, "img_size": result.img_size, "budget": result.budget,
        "top1_before": result.top1_before, "top1_after": result.top1_after,
        "max_output_change": result.max_output_change}]
    return recipe
