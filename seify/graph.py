"""Tracing real timm and torchvision models with torch.fx, and reading facts off the traced graph.

timm marks the modules and functions it cannot trace through (``register_notrace_module``); we treat them as
leaves, as timm's own feature extractor does. Modules that behave differently in training are leaves too, so
that a graph traced in eval mode still runs drop-path and dropout in training.
"""
from __future__ import annotations

import operator
from collections import Counter
from typing import Iterable

import torch
import torch.fx as fx
from torch import nn

from .errors import SeifyError, first_line
from .se import SiteBlock


def _timm_notrace():
    import timm.models  # noqa: F401  (importing the models registers their notrace modules)
    from timm.layers import DropBlock2d, DropPath, get_notrace_functions, get_notrace_modules
    return tuple(get_notrace_modules()) + (DropPath, DropBlock2d), tuple(get_notrace_functions())


def _torchvision_leaves():
    """Stochastic depth acts in training only; FrozenBatchNorm2d computes from its buffers, which a trace would
    freeze into constants (and the surgery scales them)."""
    from torchvision.ops import FrozenBatchNorm2d, StochasticDepth
    return (StochasticDepth, FrozenBatchNorm2d)


def _traceable_anyway(m: nn.Module) -> bool:
    """timm marks NormFreeBlock untraceable for its skipinit gain's ``mul_``, which fx drops (pytorch#68301). Without
    that gain (timm's default) the block traces, and its residual sum is where SE goes."""
    from timm.models.nfnet import NormFreeBlock
    return isinstance(m, NormFreeBlock) and m.skipinit_gain is None


class SeifyTracer(fx.Tracer):
    """An fx tracer that knows timm's leaves and reports which module broke tracing."""

    def __init__(self, leaves: frozenset[int] | set[int] = frozenset()):
        leaf_modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.leaf_types = leaf_modules + _torchvision_leaves() + (SiteBlock,)
        self.leaves = leaves  # ids of more modules to keep whole

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.leaves:
            return True
        if _traceable_anyway(m):
            return False
        return isinstance(m, self.leaf_types) or super().is_leaf_module(m, qualname)


    def trace(self, root, concrete_args=None):
        try:
            return super().trace(root, concrete_args)
        except SeifyError:
            raise
        except Exception as e:
            where = [path for path, _ in self.module_stack.values()]
            inside = f"in module '{where[-1]}' ({type(root.get_submodule(where[-1])).__name__})" if where \
                else f"in {type(root).__name__}.forward"
            reason = first_line(e)
            raise SeifyError(f"cannot trace {type(root).__name__}: {inside}: {reason}. seify needs a model that "
                             "torch.fx can trace; mark that module as a leaf with "
                             "timm.layers.register_notrace_module, or rewrite its data-dependent control flow"
                             ) from e


def trace_graph(module: nn.Module, concrete_args: dict | None = None, training: bool = False,
                leaves: frozenset[int] | set[int] = frozenset()) -> fx.Graph:
    """``module``'s graph, traced in eval (or training) mode, its own mode restored after; ``concrete_args``
    fixes optional arguments to the values the model calls it with; ``leaves`` (module ids) stay whole."""
    was_training = module.training
    module.train(training)
    try:
        return SeifyTracer(leaves).trace(module, concrete_args or None)
    finally:
        module.train(was_training)


def trace(module: nn.Module, concrete_args: dict | None = None) -> fx.GraphModule:
    """``trace_graph`` in eval mode, as a GraphModule over the same submodules (one that can be edited)."""
    return fx.GraphModule(module, trace_graph(module, concrete_args), type(module).__name__)


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph once and notes each node's output shape; says which call failed if one does."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # our message already names the failing call

    def run_node(self, n: fx.Node):
        try:
            result = super().run_node(n)
        except Exception as e:
            what = n.target if n.op == "call_module" else n.name
            reason = first_line(e)
            raise SeifyError(f"at '{what}': {reason}") from e
        if isinstance(result, torch.Tensor):
            n.meta["shape"] = tuple(result.shape)
        return result


def trace_with_shapes(model: nn.Module, input_size: tuple[int, int, int]) -> fx.GraphModule:
    """Trace ``model`` and record every node's output shape for one image of ``input_size`` (C, H, W)."""
    gm = trace(model)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    probe = torch.zeros((1, *input_size), device=device)
    try:
        with torch.no_grad():
            _ShapeRecorder(gm.eval()).run(probe)
    except SeifyError as e:
        size = "x".join(map(str, input_size))
        raise SeifyError(f"{type(model).__name__} cannot take an input of {size} ({e}); "
                         "pass an {input_size} the model accepts", "input_size") from e
    return gm


def shape(node: fx.Node) -> tuple[int, ...] | None:
    return node.meta.get("shape")


def module_stack(node: fx.Node) -> list[str]:
    """Paths of the modules whose forward was running when ``node`` was recorded, outermost first."""
    return [path for path, _ in node.meta.get("nn_module_stack", {}).values()]


def owner(node: fx.Node) -> str:
    """Path of the innermost traced-through module whose forward made this call ('' for the root)."""
    stack = module_stack(node)
    if node.op == "call_module" and stack and stack[-1] == node.target:
        stack = stack[:-1]
    return stack[-1] if stack else ""


def in_scope(node: fx.Node, scope: str) -> bool:
    return scope == "" or scope in module_stack(node)


def scoped_keys(nodes: Iterable[fx.Node], scope: str) -> dict[tuple, fx.Node]:
    """Key each call made inside ``scope`` by (op, target relative to scope, occurrence).

    The same keys computed on a trace of the scope's module alone find the same calls there, so a site found
    on the whole model's graph can be edited in its owning block's own graph.
    """
    prefix = f"{scope}." if scope else ""
    seen: Counter = Counter()
    keys = {}
    for node in nodes:
        if node.op in ("placeholder", "output") or not in_scope(node, scope):
            continue
        target = node.target
        if isinstance(target, str) and node.op in ("call_module", "get_attr") and target.startswith(prefix):
            target = target[len(prefix):]
        seen[(node.op, target)] += 1
        keys[(node.op, target, seen[(node.op, target)])] = node
    return keys


ADD_TARGETS = {operator.add, operator.iadd, torch.add, "add", "add_"}
MUL_TARGETS = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}


def is_call(node: fx.Node, targets) -> bool:
    return node.op in ("call_function", "call_method") and node.target in targets


def target(node: fx.Node) -> str:
    """The module or attribute path a ``call_module`` or ``get_attr`` node names."""
    assert isinstance(node.target, str), node
    return node.target


def called_module(root: nn.Module, node: fx.Node) -> nn.Module | None:
    return root.get_submodule(target(node)) if node.op == "call_module" else None


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if shape(a) is not None]


def ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), list(node.all_input_nodes)
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen
