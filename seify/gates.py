"""Channel gates: every block that computes ``x * gate(f(pool(x)))`` per channel, found, recorded over images and
replaced by a per-channel constant. The one room that knows them; analyze, fold, profile and convert ask it.

Found by their class: seify's own block; timm's ``SEModule``, ``EffectiveSEModule``, ``SqueezeExciteCl``, the
EfficientNet/MobileNetV3/GhostNet ``SqueezeExcite``, the legacy SENet module, ``EcaModule``/``CecaModule`` and
HGNet's ``EseModule``; torchvision's ``SqueezeExcitation``. Found by their shape, for gates written by other code:
a module whose output is its input times a value computed from it through a global pool (a squeeze). Not gates:
modules that only add (GCNet's global context), spatial gates (their pool is over channels), attention over
branches (selective kernels), response normalisation.

A gate's value is read off the activation that makes it where its class is known, and otherwise measured as
``<x, y> / <x, x>`` per channel (exact for ``y = x * g``; 1 where a channel of ``x`` is all zero, which any gate
leaves unchanged).
"""
from __future__ import annotations

import copy
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from . import graph as g
from . import kernels
from . import layers as L
from .compensation import fold_backward, fold_forward, tensor_of
from .errors import SeifyError
from .se import SqueezeExcite
from .surgery import remove_se

SATURATED = 0.05  # a gate this close to 0 or 1 is saturated


def _known() -> dict[type, tuple[str, str]]:
    """Gate class -> (the activation whose output is the gate, the excitation layer whose zero weights make the
    gate a constant)."""
    import timm.layers.eca as eca
    import timm.layers.squeeze_excite as timm_se
    import timm.models._efficientnet_blocks as effnet
    import timm.models.hgnet as hgnet
    import timm.models.senet as senet
    from torchvision.ops.misc import SqueezeExcitation
    return {SqueezeExcite: ("gate", "fc2"), timm_se.SEModule: ("gate", "fc2"),
            timm_se.EffectiveSEModule: ("gate", "fc"), timm_se.SqueezeExciteCl: ("gate", "fc2"),
            effnet.SqueezeExcite: ("gate", "conv_expand"), senet.SEModule: ("sigmoid", "fc2"),
            eca.EcaModule: ("gate", "conv"), eca.CecaModule: ("gate", "conv"), hgnet.EseModule: ("sigmoid", "conv"),
            SqueezeExcitation: ("scale_activation", "fc2")}


@dataclass
class Gate:
    """One channel gate in a model."""
    path: str
    module: nn.Module
    kind: str  # its class, as its library names it
    activation: Any  # the nn.Module whose output is the gate; None: measured from the module's input and output
    last: Any  # the excitation layer (a conv or linear) whose zero weights make the gate input-independent
    scale: float = 1.0  # seify's fresh gate is scaled by 2 where no neighbour took the factor

    @property
    def ours(self) -> bool:
        return isinstance(self.module, SqueezeExcite)

    @property
    def params(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def constant(self) -> torch.Tensor | None:
        """The per-channel multiplier where the gate does not depend on the input, else None."""
        if self.last is None or self.activation is None or self.last.weight.count_nonzero():
            return None
        bias = self.last.bias if self.last.bias is not None else torch.zeros(self.last.weight.shape[0])
        with torch.no_grad():
            return self.activation(bias.detach().clone()).flatten() * self.scale


def find_gates(model: nn.Module, include: str | None = None, exclude: str | None = None) -> dict[str, Gate]:
    """Every channel gate of ``model`` by module path (those ``include``/``exclude``, regular expressions on the
    path, leave)."""
    known = _known()
    found: dict[str, Gate] = {}
    for path, module in model.named_modules():
        if any(path.startswith(f"{p}.") for p in found):
            continue
        entry = next((v for k, v in known.items() if isinstance(module, k)), None)
        if entry is not None:
            found[path] = Gate(path, module, type(module).__name__, getattr(module, entry[0]),
                               getattr(module, entry[1]), float(getattr(module, "scale", 1.0)))
        elif _gate_by_shape(module):
            found[path] = Gate(path, module, type(module).__name__, None, None)
    patterns = [re.compile(p) if p else None for p in (include, exclude)]
    return {p: gate for p, gate in found.items() if (patterns[0] is None or patterns[0].search(p))
            and not (patterns[1] is not None and patterns[1].search(p))}


LOOKED_FOR = ("seify's SE blocks, timm's and torchvision's SE, ECA and ESE modules, and any block computing "
              "x * gate(pool(x))")


def no_gates(spec: str, include: str | None = None, exclude: str | None = None) -> SeifyError:
    if include or exclude:
        return SeifyError(f"no channel gate of {spec} matches {{include}}/{{exclude}}", "include", "exclude")
    return SeifyError(f"{spec} has no channel gates (looked for {LOOKED_FOR}); convert it first (seify convert "
                      "adds SE blocks)")


def check_pattern(text: str | None, name: str) -> None:
    try:
        re.compile(text or "")
    except re.error as e:
        raise SeifyError(f"{{{name}}} is not a valid regular expression: {e}", name) from e


def _gate_by_shape(module: nn.Module) -> bool:
    """A small module (it holds layers, at most a dozen) whose output is ``x * s``, ``s`` made from ``x`` through a
    pool over the map; nothing added. Traced alone; a module that does not trace is no gate."""
    children = list(module.modules())[1:]
    if not children or len(children) > 12 or type(module).__module__.startswith("torch.nn"):
        return False
    try:
        traced = fx.GraphModule(module, g.SeifyTracer().trace(module))
    except Exception:
        return False
    nodes = list(traced.graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output").args[0]
    if not isinstance(output, fx.Node) or not g.is_call(output, g.MUL_TARGETS) or not inputs \
            or any(g.is_call(n, {operator.add, torch.add, "add"}) for n in nodes):
        return False
    x = inputs[0]
    operands = [a for a in output.args if isinstance(a, fx.Node)]
    return len(operands) == 2 and x in operands and any(
        _spatial_pool(a) for other in operands if other is not x for a in g.ancestors(other) | {other})


def _spatial_pool(node: fx.Node) -> bool:
    if node.op == "call_module":
        root = node.graph.owning_module
        return root is not None and isinstance(root.get_submodule(str(node.target)),
                                               (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
    if not L.is_global_pool(node):
        return False
    if g.is_call(node, {torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d}):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return set(dims if isinstance(dims, (tuple, list)) else (dims,)) in ({2, 3}, {-1, -2})  # over the map


# ---------------------------------------------------------------- recording over images


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


# ---------------------------------------------------------------- replacing a gate by a constant


@dataclass
class Plan:
    """How one gate goes: its multiplier into ``into`` (parameters, channels along ``dim``), then out."""
    into: list[str]
    multiplier: torch.Tensor
    dim: int


def multiplier(gate: Gate, stats: GateStats | None, max_gate_std: float) -> tuple[torch.Tensor | None, str]:
    """What the gate multiplies its input by, per channel, where that is (nearly) a constant; else why not."""
    constant = gate.constant()
    if constant is None and stats is None:
        return None, "its gate depends on the input; measure it on DATA"
    if constant is None:
        assert stats is not None
        spread = float(stats.std.max())
        if spread > max_gate_std:
            return None, f"its gate varies by up to {spread:.3g} over the images (more than {max_gate_std:g})"
        constant = stats.mean * gate.scale
    if float(constant.min()) < 0:
        return None, "its gate is negative in some channel, which a ReLU before it would not pass"
    return constant, ""


def plan(model: nn.Module, gates: dict[str, Gate], multipliers: dict[str, torch.Tensor]
         ) -> tuple[dict[str, Plan], dict[str, str]]:
    """(a Plan per gate that folds exactly, why each other one stays): a multiplier goes into the layer that makes
    the gate's input (a norm, a convolution, a linear layer, a layer scale) or into the plain layers that read
    its output; a multiplier of exactly 1 needs no layer at all."""
    traced = trace_with_gates(model, gates)
    calls = Counter(n.target for n in traced.graph.nodes if n.op in ("call_module", "get_attr"))
    taken: set[str] = set()
    plans, kept = {}, {}
    for path, value in multipliers.items():
        if bool((value == 1).all()):
            plans[path] = Plan([], value, 0)
            continue
        target = _target(traced, path, calls, taken)
        if target is None:
            kept[path] = "no layer next to it takes a per-channel scale exactly"
            continue
        taken.update(target[0])
        plans[path] = Plan(target[0], value, target[1])
    return plans, kept


def trace_with_gates(model: nn.Module, gates: dict[str, Gate]) -> fx.GraphModule:
    """The model traced with every gate a leaf (one call in the graph)."""
    leaves = {id(gate.module) for gate in gates.values()}
    return fx.GraphModule(model, g.trace_graph(model, leaves=leaves), type(model).__name__)


def _target(traced: fx.GraphModule, path: str, calls: Counter, taken: set[str]):
    """(parameter names, channel dimension) where this gate's multiplier folds exactly, or None."""
    node = next((n for n in traced.graph.nodes if n.op == "call_module" and n.target == path), None)
    if node is None or not node.all_input_nodes:
        return None
    backward = fold_backward(node.all_input_nodes[0], [node], traced, calls)
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


def without_gates(model: nn.Module, plans: dict[str, Plan], slots: frozenset[str] | set[str] = frozenset()
                  ) -> nn.Module:
    """A copy of ``model`` with each planned multiplier in its layer's parameters and its gate gone: seify's blocks
    leave their owner's graph (an empty attention slot, ``slots``, gets its Identity back), other gates become an
    Identity (each returns ``x * gate``)."""
    folded = copy.deepcopy(model)
    with torch.no_grad():
        for p in plans.values():
            for name in p.into:
                t = tensor_of(folded, name)
                shape = [1] * t.dim()
                shape[p.dim] = -1
                t.mul_(p.multiplier.to(t).view(shape))
    ours = [path for path in plans if isinstance(folded.get_submodule(path), SqueezeExcite)]
    remove_se(folded, ours, slots)
    for path in plans:
        if path not in ours:
            replace_module(folded, path, nn.Identity())
    return folded.eval()


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)


def without_any_gate(model: nn.Module, gates: dict[str, Gate]) -> nn.Module:
    """A copy with every gate removed outright (not folded): the bound on what folding them can save."""
    plans = {path: Plan([], torch.ones(1), 0) for path in gates}
    return without_gates(model, plans)
