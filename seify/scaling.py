"""Where a per-channel scale can go exactly: the layer that makes a value (backward through ReLU, pooling and
dropout, which pass a positive scale, into a norm, convolution, linear layer or layer scale), or the plain linear
layers that read it (forward, along their input dimension). A fresh SE gate's x2 goes there (``compensation``),
and so does a folded gate's constant (``gates``)."""
from __future__ import annotations

from collections import Counter

import torch
import torch.fx as fx
from torch import nn

from . import graph as g
from . import layers as L


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
            if arg.op == "get_attr" and _is_parameter(root, g.target(arg)) and calls[arg.target] == 1:
                return [g.target(arg)]
    return None


def _is_parameter(root: nn.Module, name: str) -> bool:
    """A parameter, not a buffer or a constant that tracing made an attribute: those are not ours to scale."""
    try:
        return isinstance(root.get_parameter(name), nn.Parameter)
    except AttributeError:
        return False


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
