"""Replacing a gate by a per-channel constant: its multiplier into a neighbouring layer, the gate out of the model."""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .. import graph as g
from ..errors import SeifyError
from ..scaling import fold_backward, fold_forward, tensor_of
from ..se import SqueezeExcite
from .find import Gate
from .record import GateStats


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


def remove_se(model: nn.Module, paths: list[str], slots: set[str] | frozenset[str] = frozenset()) -> None:
    """Take the SE blocks at ``paths`` out of the graphs that call them, in place, as if they had never been
    inserted: the block's input goes where its output went, and a sum fused into the block is a sum again, with
    its drop-path. Where a block took an empty attention slot (``slots``), an Identity takes it back."""
    for path in paths:
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        if not isinstance(owner, fx.GraphModule) or not any(
                n.op == "call_module" and n.target == name for n in owner.graph.nodes):
            raise SeifyError(f"no SE block is called at {path}; the file's recipe and its model disagree")
        for node in [n for n in owner.graph.nodes if n.op == "call_module" and n.target == name]:
            _bypass(owner.graph, node)
        owner.delete_submodule(name)
        if path in slots:
            owner.add_submodule(name, nn.Identity())
        owner.graph.lint()
        owner.recompile()


def _bypass(graph: fx.Graph, node: fx.Node) -> None:
    x, rest = node.all_input_nodes[0], list(node.all_input_nodes[1:])
    replacement = x
    if rest:  # shortcut + drop_path(x), as the block computed before its sum was fused
        with graph.inserting_before(node):
            branch = graph.call_module(g.target(rest[1]), (x,)) if len(rest) > 1 else x
            replacement = graph.call_function(operator.add, (branch, rest[0]))
    node.replace_all_uses_with(replacement)
    graph.erase_node(node)
    helpers = rest[1:]  # the factor's drop-path call, its ones and their size, which nothing uses now
    while helpers:
        helper = helpers.pop()
        if not helper.users and helper is not x:
            helpers += helper.all_input_nodes
            graph.erase_node(helper)
