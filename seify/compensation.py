"""Undoing a fresh SE gate's constant 0.5, exactly: the x2 folded into a neighbouring layer where that is exact
(backward through positively homogeneous ops into a norm, convolution, linear layer or layer scale, or forward into
the consumer convolutions), else the gate itself scaled by 2."""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from . import graph as g
from . import layers as L
from .se import SqueezeExcite
from .sites import Site


def join(scope: str, path: str) -> str:
    """A module path inside ``scope`` ('' for the whole model) as a path in the whole model."""
    return f"{scope}.{path}" if scope and path else scope or path


def _scalable_params(node: fx.Node, root: nn.Module, calls: Counter) -> list[str] | None:
    """Parameters (or a frozen norm's buffers) that scale this call's output exactly when multiplied by 2."""
    if node.op == "call_module":
        m = root.get_submodule(g.target(node))
        if calls[node.target] != 1:
            return None
        names = []
        if type(m) in L.LINEAR_LAYERS or isinstance(m, L.frozen_norms()):
            names = ["weight", "bias"]
        elif isinstance(m, L.NORMS) and getattr(m, "weight", None) is not None:
            if L.norm_act(m) and not (isinstance(m.act, L.POSITIVE_HOMOGENEOUS)
                                      and isinstance(getattr(m, "drop", nn.Identity()), nn.Identity)):
                return None
            names = ["weight", "bias"]
        elif type(m).__name__ in ("LayerScale", "LayerScale2d"):
            names = ["gamma"]
        present = [f"{node.target}.{n}" for n in names if getattr(m, n, None) is not None]
        return present or None
    if g.is_call(node, g.MUL_TARGETS):
        for arg in node.all_input_nodes:
            while arg.op == "call_method" and arg.target in L.SHAPE_METHODS:
                inner = L.feature_input(arg)
                if inner is None:
                    break
                arg = inner
            if arg.op == "get_attr" and isinstance(root.get_parameter(g.target(arg)), nn.Parameter) \
                    and calls[arg.target] == 1:
                return [g.target(arg)]
    return None


def fold_backward(producer: fx.Node | None, readers: list[fx.Node], root: nn.Module, calls: Counter
                  ) -> list[str] | None:
    """The parameters of the layer that makes ``producer``'s value, reached back through ops that pass a positive
    per-channel scale (ReLU, pooling, dropout): scaled along their first dimension, they scale that value exactly.
    None where ``producer`` has readers besides ``readers`` or no such layer is found."""
    if producer is None or not set(producer.users) <= set(readers):
        return None
    node: fx.Node | None = producer
    while node is not None:
        params = _scalable_params(node, root, calls)
        if params:
            return params
        if not L.passes_scale(node, root):
            return None
        node = L.feature_input(node)
        if node is not None and len(node.users) != 1:
            return None
    return None


def fold_forward(value: fx.Node | None, consumers: list[fx.Node], root: nn.Module, calls: Counter
                 ) -> list[str] | None:
    """The weights of ``consumers`` where all are plain linear layers reading ``value``: scaled along their input
    dimension, they undo a scale of ``value``."""
    params = []
    for c in consumers:
        m = g.called_module(root, c)
        if type(m) not in L.LINEAR_LAYERS or calls[c.target] != 1 or L.feature_input(c) is not value:
            return None
        params.append(f"{c.target}.weight")
    return params


def tensor_of(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter, or a frozen norm's buffer, by its full name."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def compensate(model: nn.Module, gm_whole: fx.GraphModule, sites: list[Site], scope: str) -> None:
    """Make every fresh gate's constant 0.5 an exact identity: fold x2 into a neighbour, else scale the gate."""
    calls = Counter(n.target for n in gm_whole.graph.nodes if n.op in ("call_module", "get_attr"))
    scaled: set[str] = set()
    for site in sites:
        readers = site.consumers + [site.slot] if site.slot is not None else site.consumers
        value = site.slot if site.slot is not None else site.producer
        for params in (fold_backward(site.producer, readers, gm_whole, calls),
                       fold_forward(value, site.consumers, gm_whole, calls)):
            if params and not scaled & set(params):
                with torch.no_grad():
                    for name in params:
                        tensor_of(model, name).mul_(2.0)
                scaled.update(params)
                owners = {p.rsplit(".", 1)[0] if p.endswith((".weight", ".bias")) else p for p in params}
                site.compensation = "x2 folded into " + ", ".join(sorted(join(scope, o) for o in owners))
                break
        else:
            block = model.get_submodule(site.path)
            assert isinstance(block, SqueezeExcite)
            block.scale = 2.0
            site.compensation = "gate scaled x2"
