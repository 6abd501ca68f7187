"""``seify fold``: take SE blocks back where they do nothing, for free.

A block whose gate does not depend on the input multiplies its input by a constant per channel. That constant is
folded into the layer that makes the block's input (a norm's affine, a convolution's or linear layer's weights
and bias, a layer scale), or else into the plain linear layers that read its output, and the block leaves the
graph: it costs no parameter and no multiply-add any more. Without DATA only blocks whose gate is exactly constant
(fc2's weights all zero, as in a fresh conversion) are folded, and the result computes exactly what the model did;
a fresh ``convert`` followed by ``fold`` is the original model again. With DATA, blocks whose gates, measured over
its images, vary by at most ``max_gate_std`` in every channel are folded at their mean, and the change of the
model's outputs and top-1 on DATA are measured and reported.
"""
from __future__ import annotations

import copy
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.fx as fx
from torch import nn

from . import graph as g
from .analyze import record_gates, se_blocks
from .checkpoint import check_writable, save
from .compensation import fold_backward, fold_forward, tensor_of
from .device import check_device
from .equivalence import Difference, compare, difference
from .errors import SeifyError
from .images.scoring import Scored, batches_of, evaluate, scored_images
from .limits import check_number, check_whole
from .models import LoadedModel, resolve
from .models.files import module_or_none
from .surgery import remove_se


@dataclass
class FoldedSite:
    path: str
    into: list[str]  # the parameters the multiplier went into
    multiplier_min: float
    multiplier_max: float
    gate_std_max: float | None  # measured over DATA; None where the gate is constant by its weights
    max_output_change: float | None = None  # this site alone folded, over DATA's images (or a probe)


@dataclass
class Folded:
    model: str
    output: str | None  # None: nothing was written
    folded: list[FoldedSite]
    kept: list[dict]  # {"path", "why"} for every block left in
    images: str | None  # which images were measured
    max_output_change: float  # every fold together
    top1_before: float | None = None
    top1_after: float | None = None
    params_saved: int = 0
    module: nn.Module | None = field(default=None, repr=False)  # the folded model

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(replace(self, module=None)).items() if k != "module"}


def fold(model: str | nn.Module, out: str | Path | None, data: str | None = None, *, weights: str | None = None,
         max_gate_std: float = 0.01, include: str | None = None, exclude: str | None = None,
         max_images: int | None = 512, batch_size: int = 64, device: str | None = None, force: bool = False
         ) -> Folded:
    """Fold the SE blocks of ``model`` that do nothing input-dependent (see the module's doc) and write the result
    to ``out`` as a seify file whose recipe records what was folded. ``model`` may be a module you hold (it is
    left as it is); with ``out`` None nothing is written, and the folded model is ``result.module``."""
    check_number(max_gate_std, "max_gate_std", 0, math.inf)
    if max_images is not None:
        check_whole(max_images, "max_images", 1, None)
    patterns = [_regex(text, name) for text, name in ((include, "include"), (exclude, "exclude"))]
    inputs = tuple(x for x in (model, weights) if isinstance(x, str))
    if out is not None:
        check_writable(out, force=force, inputs=inputs)
    loaded = resolve(model, weights=weights)
    name = loaded.spec
    blocks = se_blocks(loaded.model)
    if not blocks:
        raise SeifyError(f"{name} has no SE blocks to fold")
    if out is not None and loaded.recipe is None:
        raise SeifyError(f"{name} carries no seify recipe to write a file with: fold it with out=None and keep "
                         "result.module, or fold the seify file that seify.save wrote")
    chosen = {p: b for p, b in blocks.items() if (patterns[0] is None or patterns[0].search(p))
              and not (patterns[1] is not None and patterns[1].search(p))}
    if not chosen:
        raise SeifyError(f"no SE block of {name} matches {{include}}/{{exclude}}", "include", "exclude")
    dev = torch.device(check_device(device))
    images = scored_images(loaded, data, max_images=max_images) if data is not None else None
    stats = record_gates(loaded.model, batches_of(images.dataset, batch_size, dev), len(images.classes), dev) \
        if images is not None else {}
    original = copy.deepcopy(loaded.model).eval()
    plans, kept = _plans(loaded.model, chosen, stats, max_gate_std)
    if not plans:
        reasons = "; ".join(f"{k['path']}: {k['why']}" for k in kept[:2])
        raise SeifyError(f"nothing to fold in {name} ({reasons}{'; ...' if len(kept) > 2 else ''})",
                         "max_gate_std")
    folded = [FoldedSite(path, into, float(c.min()), float(c.max()), _std(stats, path))
              for path, (into, c, _) in plans.items()]
    for site in folded:
        site.max_output_change = _change(original, _folded_copy(original, {site.path: plans[site.path]}, loaded),
                                         images, loaded, dev, batch_size)
    result_model = _folded_copy(original, plans, loaded)
    result = Folded(name, None if out is None else str(out), folded, kept, images.where if images else None,
                    _change(original, result_model, images, loaded, dev, batch_size),
                    params_saved=sum(p.numel() for p in original.parameters()) -
                    sum(p.numel() for p in result_model.parameters()))
    if images is not None:
        result.top1_before, result.top1_after = (_top1(m, images, dev, batch_size) for m in (original, result_model))
    result.module = result_model.cpu()
    if out is not None and loaded.recipe is not None:
        recipe = dict(loaded.recipe)
        recipe["folded"] = list(recipe.get("folded") or []) + list(plans)
        recipe["sites"] = [s for s in recipe["sites"] if s["path"] not in plans]
        save(result.module, out, recipe, force=force, inputs=inputs)
    return result


def _regex(text: str | None, name: str) -> re.Pattern | None:
    try:
        return re.compile(text) if text else None
    except re.error as e:
        raise SeifyError(f"{{{name}}} is not a valid regular expression: {e}", name) from e


def _std(stats: dict, path: str) -> float | None:
    return float(stats[path].std.max()) if path in stats else None


def _plans(model: nn.Module, chosen: dict, stats: dict, max_gate_std: float):
    """({path: (parameters to scale, the per-channel multiplier, the dimension its channels are on)}, the blocks
    kept with why)."""
    traced = g.trace(model)
    calls = Counter(n.target for n in traced.graph.nodes if n.op in ("call_module", "get_attr"))
    taken: set[str] = set()
    plans: dict[str, tuple[list[str], torch.Tensor, int]] = {}
    kept: list[dict] = []
    for path, block in chosen.items():
        multiplier, why = _multiplier(block, stats.get(path), max_gate_std)
        if multiplier is not None and float(multiplier.min()) < 0:
            multiplier, why = None, "its gate is negative in some channel, which a ReLU before it would not pass"
        if multiplier is not None and bool((multiplier == 1).all()):  # it multiplies by 1: nothing to fold into
            plans[path] = ([], multiplier, 0)
            continue
        target = _target(traced, path, calls, taken) if multiplier is not None else None
        if multiplier is None or target is None:
            kept.append({"path": path, "why": why or "no layer next to it takes a per-channel scale exactly"})
            continue
        taken.update(target[0])
        plans[path] = (target[0], multiplier, target[1])
    return plans, kept


def _multiplier(block, stats, max_gate_std: float) -> tuple[torch.Tensor | None, str]:
    """What the block multiplies its input by, per channel, where that is (nearly) a constant."""
    constant = block.constant_gate()
    if constant is not None:
        return constant, ""
    if stats is None:
        return None, "its gate depends on the input (fc2's weights are not zero); measure it on DATA"
    spread = float(stats.std.max())
    if spread > max_gate_std:
        return None, f"its gate varies by up to {spread:.3g} over the images (more than {max_gate_std:g})"
    return stats.mean * block.scale, ""


def _target(traced: fx.GraphModule, path: str, calls: Counter, taken: set[str]):
    """(parameter names, channel dimension) where this block's multiplier folds exactly, or None."""
    node = next(n for n in traced.graph.nodes if n.op == "call_module" and n.target == path)
    producer = node.all_input_nodes[0]
    backward = fold_backward(producer, [node], traced, calls)
    if backward and not taken & set(backward):
        return backward, 0
    forward = fold_forward(node, list(node.users), traced, calls)
    if forward and not taken & set(forward) and all(_plain_input(traced, p) for p in forward) and len(node.args) == 1:
        return forward, 1
    return None


def _plain_input(root: nn.Module, weight: str) -> bool:
    """A layer whose weight's second dimension is its whole input (no groups), so input channel k is column k."""
    layer = root.get_submodule(weight.rsplit(".", 1)[0])
    return getattr(layer, "groups", 1) == 1


def _folded_copy(model: nn.Module, plans: dict, loaded: LoadedModel) -> nn.Module:
    """A copy of ``model`` with each planned multiplier in its layer's parameters and its block gone."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for params, multiplier, dim in plans.values():
            for name in params:
                t = tensor_of(folded, name)
                shape = [1] * t.dim()
                shape[dim] = -1
                t.mul_(multiplier.to(t).view(shape))
    slots = {p for p in plans if loaded.base is not None and isinstance(module_or_none(loaded.base, p), nn.Identity)}
    remove_se(folded, list(plans), slots)
    return folded.eval()


def _change(a: nn.Module, b: nn.Module, images: Scored | None, loaded: LoadedModel, device, batch_size: int) -> float:
    """The largest change of the outputs: over DATA's images, or on a random probe at the trained size."""
    if images is None:
        return compare(a, b, tuple(loaded.data_config["input_size"])).max_abs
    checked = Difference()
    a, b = a.to(device).eval(), b.to(device).eval()
    with torch.no_grad():
        for x, _, _ in batches_of(images.dataset, batch_size, device):
            if x is not None:
                x = x.to(device)
                checked = checked | difference(a(x), b(x))
    return checked.max_abs


def _top1(model: nn.Module, images: Scored, device, batch_size: int) -> float:
    return evaluate(model.to(device), batches_of(images.dataset, batch_size, device), device,
                    len(images.classes))["top1"]
