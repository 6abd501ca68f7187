"""Finding channel gates: by their class where a library names it, by their shape otherwise."""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import graph as g
from ..errors import SeifyError
from ..se import SqueezeExcite


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

    @property
    def hidden(self) -> int | None:
        """The width of its excitation: the output of its first layer (None for a gate without one)."""
        first = next((m for m in self.module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        return getattr(first, "out_channels", getattr(first, "out_features", None))

    def constant(self) -> torch.Tensor | None:
        """The per-channel multiplier where the gate does not depend on the input, else None."""
        if self.last is None or self.activation is None or self.last.weight.count_nonzero():
            return None
        bias = self.last.bias if self.last.bias is not None else torch.zeros(self.last.weight.shape[0])
        with torch.no_grad():
            return self.activation(bias.detach().clone()).flatten() * self.scale


class Found(dict):
    """Gates by module path, and ``untraced``: the paths of modules that might have been gates but could not be
    traced to tell (a gate among them is missed: commands say so)."""
    untraced: list[str]

    def note(self) -> list[str]:
        if not self.untraced:
            return []
        return [f"{len(self.untraced)} module(s) could not be traced to tell whether they are channel gates (e.g. "
                f"{self.untraced[0]}); a gate among them is left out"]


def find_gates(model: nn.Module, include: str | None = None, exclude: str | None = None) -> Found:
    """Every channel gate of ``model`` by module path (those ``include``/``exclude``, regular expressions on the
    path, leave)."""
    known = _known()
    found: dict[str, Gate] = {}
    untraced: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(f"{p}.") for p in found):
            continue
        entry = next((v for k, v in known.items() if isinstance(module, k)), None)
        if entry is not None:
            found[path] = Gate(path, module, type(module).__name__, getattr(module, entry[0]),
                               getattr(module, entry[1]), float(getattr(module, "scale", 1.0)))
            continue
        shaped = _gate_by_shape(module)
        if shaped is None:
            untraced.append(path)
        elif shaped:
            found[path] = Gate(path, module, type(module).__name__, None, None)
    patterns = [re.compile(p) if p else None for p in (include, exclude)]
    chosen = Found({p: gate for p, gate in found.items() if (patterns[0] is None or patterns[0].search(p))
                    and not (patterns[1] is not None and patterns[1].search(p))})
    chosen.untraced = [p for p in untraced if not any(p.startswith(f"{q}.") for q in found)]
    return chosen


LOOKED_FOR = ("seify's SE blocks, timm's and torchvision's SE, ECA and ESE modules, and any block computing "
              "x * gate(pool(x))")


def no_gates(spec: str, include: str | None = None, exclude: str | None = None) -> SeifyError:
    if include or exclude:
        return SeifyError(f"no channel gate of {spec} matches {{include}}/{{exclude}}", "include", "exclude")
    return SeifyError(f"{spec} has no channel gates (looked for {LOOKED_FOR}); convert it first (seify convert "
                      "adds SE blocks)")


def _gate_by_shape(module: nn.Module) -> bool | None:
    """A small module (it holds layers, at most a dozen) whose output is ``x * s``, ``s`` made from ``x`` through a
    pool over the map; nothing added. Traced alone; None where it holds a pool but does not trace (cannot tell)."""
    children = list(module.modules())[1:]
    if not children or len(children) > 12 or type(module).__module__.startswith("torch.nn"):
        return False
    try:  # optional arguments at their defaults: a module is called so by the model (a head's pre_logits=False)
        traced = fx.GraphModule(module, g.SeifyTracer().trace(module, concrete_args=_defaults(module)))
    except Exception:
        pooled = any(isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) for m in children)
        return None if pooled or "mean(" in _source(module) else False
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


def _defaults(module: nn.Module) -> dict:
    import inspect
    try:
        parameters = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def _source(module: nn.Module) -> str:
    import inspect
    try:
        return inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return ""


def _spatial_pool(node: fx.Node) -> bool:
    """A pool over the map (a squeeze): not a mean over channels, nor a norm (ConvNeXt-V2's response
    normalisation divides a map's L2 norm by its mean over channels, and adds the result back: not a gate)."""
    if node.op == "call_module":
        from timm.layers import SelectAdaptivePool2d
        root = node.graph.owning_module
        return root is not None and isinstance(root.get_submodule(str(node.target)),
                                               (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, SelectAdaptivePool2d))
    if not is_global_pool(node):
        return False
    if g.is_call(node, {torch.nn.functional.adaptive_avg_pool2d, torch.nn.functional.adaptive_max_pool2d}):
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    return set(dims if isinstance(dims, (tuple, list)) else (dims,)) in ({2, 3}, {-1, -2})  # over the map


_POOL_CALLS = {torch.mean, torch.amax, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, "mean", "amax"}


def is_global_pool(node: fx.Node) -> bool:
    """A pool over the whole map (a squeeze): ``x.mean((2, 3))``, ``amax``, adaptive pooling."""
    from timm.layers import SelectAdaptivePool2d
    module = g.called_module(node.graph.owning_module, node) if node.graph.owning_module is not None else None
    return g.is_call(node, _POOL_CALLS) or isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
                                                               SelectAdaptivePool2d))


def is_channel_gate(node: fx.Node) -> bool:
    """x * s with s (N, C, 1, 1) computed from x through a squeeze: an SE-style gate already in the model, at any
    map size (at 1x1, ``x * sigmoid(x)`` is not one: it has no squeeze)."""
    if not g.is_call(node, g.MUL_TARGETS):
        return False
    ins = g.tensor_inputs(node)
    if len(ins) != 2:
        return False
    for x, s in (ins, ins[::-1]):
        xs, ss = g.shape(x), g.shape(s)
        if xs is None or ss is None:
            continue
        if len(xs) == 4 and len(ss) == 4 and ss[1] == xs[1] and ss[2:] == (1, 1) and x in g.ancestors(s) \
                and any(_spatial_pool(a) for a in g.ancestors(s)):
            return True
    return False
