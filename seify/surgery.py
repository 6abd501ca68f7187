"""Inserting SE blocks at the sites ``sites.find_sites`` finds, keeping what the model computes exactly.

Sites are found on a trace of the whole model; then each block that owns sites is traced alone (specialised to
how the model calls it), edited and swapped in as a GraphModule, so the model keeps its class, its methods
(``forward_features``, ``reset_classifier``) and every state_dict key it had. A fresh gate's constant 0.5 is folded
exactly into a neighbouring layer, and the result is checked to compute the same operations as the original.
"""
from __future__ import annotations

import copy
import inspect
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from . import graph as g
from . import layers as L
from .compensation import compensate, join
from .errors import SeifyError
from .options import PRESERVING, SEOptions
from .se import ChannelScale, SiteBlock, SqueezeExcite
from .sites import Site, find_sites


@dataclass
class Conversion:
    model: nn.Module
    sites: list[Site]
    skipped: list[Site]
    placement: str
    options: SEOptions
    input_size: tuple[int, int, int]
    scope: str = ""  # the converted part: "" for the whole model, "backbone.body" for a detector

    @property
    def added_params(self) -> int:
        return sum(s.params for s in self.sites)


def convertible_scope(model: nn.Module) -> str:
    """The part of ``model`` seify converts: all of it, or the backbone of a torchvision detector or segmenter
    (their heads take lists of images and boxes, which torch.fx cannot trace; the paper's detection result is an SE
    backbone under Faster R-CNN)."""
    if type(model).__module__.startswith(("torchvision.models.detection", "torchvision.models.segmentation")):
        for path in ("backbone.body", "backbone"):
            try:
                model.get_submodule(path)
                return path
            except AttributeError:
                continue
    return ""


def add_se(model: nn.Module, options: SEOptions, input_size: tuple[int, int, int]) -> Conversion:
    """Return a copy of ``model`` (eval mode) with SE blocks at every site ``options`` selects.

    With ``init='identity'`` (the default) or ``'identity-gate'`` the copy computes exactly what ``model`` does
    until it is trained.
    """
    model = copy.deepcopy(model).eval()
    scope = convertible_scope(model)
    part = model.get_submodule(scope) if scope else model
    gm, placement, sites = find_sites(part, options, input_size)
    chosen, skipped = split_sites(part, placement, sites, options)
    by_owner = defaultdict(list)
    for site in chosen:
        by_owner[site.owner].append(site)
    fixed = _fixed_arguments(part, set(by_owner), input_size)
    for owner in sorted(by_owner, key=lambda p: (p.count(".") + bool(p)), reverse=True):
        try:
            part = _rebuild_owner(part, gm, owner, by_owner[owner], options, fixed.get(owner, {}))
        except _CannotRebuild as e:  # the rest of the model still gets its blocks
            for site in by_owner[owner]:
                site.skipped = str(e)
            chosen = [s for s in chosen if s.owner != owner]
            skipped += by_owner[owner]
    if not chosen:
        raise SeifyError(f"nothing to convert in {type(part).__name__}: no block that owns a site could be rebuilt "
                         f"({skipped[0].skipped})")
    if options.init in PRESERVING and options.block == "se":  # a fresh scale block is the identity already
        compensate(part, gm, chosen, scope, fold=options.init == "identity")
    _check_same_computation(gm, part)
    for site in chosen + skipped:
        site.path, site.owner, site.after = (join(scope, p) for p in (site.path, site.owner, site.after))
    return Conversion(_set_submodule(model, scope, part).eval(), chosen, skipped, placement, options,
                      input_size, scope)


def split_sites(model: nn.Module, placement: str, sites: list[Site], options: SEOptions):
    """(sites to insert, sites skipped); a SeifyError saying why when there is nothing to insert."""
    chosen = [s for s in sites if s.skipped is None]
    skipped = [s for s in sites if s.skipped is not None]
    if not chosen:
        raise SeifyError(_nothing_to_convert(model, placement, skipped, options), "stages", "include", "exclude",
                         "at")
    return chosen, skipped


def _nothing_to_convert(model: nn.Module, placement: str, skipped: list[Site], options: SEOptions) -> str:
    name = type(model).__name__
    if skipped:
        return (f"nothing to convert in {name}: all {len(skipped)} {placement} sites already have an SE-style "
                f"gate (e.g. {(skipped[0].skipped or '').split(' ', 3)[-1]})")
    if options.stages is not None or options.include or options.exclude:
        return f"nothing to convert in {name}: no {placement} site matches {{stages}}/{{include}}/{{exclude}}"
    if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) or placement == "activation":
        return (f"nothing to convert in {name}: it has no convolutional residual branches and no activations "
                "after convolutions (SE needs convolutional feature maps; transformers have none)")
    return f"nothing to convert in {name}: no {placement} sites found; try {{at}} activation"


# ---------------------------------------------------------------- inserting blocks


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
    return model


def _fixed_arguments(model: nn.Module, owners: set[str], input_size) -> dict[str, dict]:
    """Owner -> the optional arguments it is called without (or with None), to trace it as the model calls it.

    timm's DlaBasic is ``forward(x, shortcut=None)``, called with and without a shortcut: traced with every
    argument as a proxy it would lose the ``if shortcut is None: shortcut = x`` that makes its residual sum.
    """
    optional = {p: model.get_submodule(p) for p in owners if p and _optional_parameters(model.get_submodule(p))}
    if not optional:
        return {}
    seen: dict[str, set] = defaultdict(set)

    def recorder(path):
        def record(module, args, kwargs):
            bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
            seen[path].add(frozenset(n for n in _optional_parameters(module) if bound.get(n) is None))
        return record
    hooks = [m.register_forward_pre_hook(recorder(p), with_kwargs=True) for p, m in optional.items()]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_size), device=param.device, dtype=param.dtype))
    finally:
        for h in hooks:
            h.remove()
    for path, patterns in seen.items():
        if len(patterns) > 1:
            raise SeifyError(f"'{path}' is called with different optional arguments, so one traced copy cannot "
                             "serve every call; leave it out with {exclude}", "exclude")
    return {path: dict.fromkeys(next(iter(patterns))) for path, patterns in seen.items()}


def _optional_parameters(module: nn.Module) -> list[str]:
    return [name for name, p in inspect.signature(module.forward).parameters.items()
            if p.default is not inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _keep_members(original: nn.Module, rebuilt: fx.GraphModule, path: str) -> None:
    """A GraphModule copies only what its forward uses; keep the rest so no state_dict key is lost."""
    for name, child in original.named_children():
        if name not in rebuilt._modules:
            rebuilt.add_module(name, child)
    for name, p in original.named_parameters(recurse=False):
        if not hasattr(rebuilt, name):
            rebuilt.register_parameter(name, p)
    for name, b in original.named_buffers(recurse=False):
        if not hasattr(rebuilt, name):
            rebuilt.register_buffer(name, b, persistent=name not in original._non_persistent_buffers_set)
    lost = set(original.state_dict()) - set(rebuilt.state_dict())
    if lost:
        raise SeifyError(f"cannot rebuild '{path or 'model'}' with SE: it would lose {sorted(lost)[:3]}")


class _CannotRebuild(SeifyError):
    """A block whose sites are skipped: its own graph cannot be edited the way the model's trace says."""


def _trace_block(module: nn.Module, fixed: dict) -> fx.GraphModule:
    """The block's graph, traced in eval mode as the model calls it; refused if its code depends on the mode."""
    local = g.trace(module, fixed)
    if _operations(g.trace_graph(module, fixed, training=True)) != _operations(local.graph):
        raise _CannotRebuild("its forward branches on training mode")
    return local


def _operations(graph: fx.Graph) -> list[tuple[str, str, str, str]]:
    """What a graph's generated code is made of, without generating it (a GraphModule per owner costs more
    than the trace)."""
    return [(n.op, str(n.target), str(n.args), str(n.kwargs)) for n in graph.nodes]


def _rebuild_owner(model: nn.Module, gm_whole: fx.GraphModule, owner: str, sites: list[Site],
                   options: SEOptions, fixed: dict) -> nn.Module:
    module = model.get_submodule(owner) if owner else model
    local = _trace_block(module, fixed)
    local_by_key = g.scoped_keys(local.graph.nodes, "")
    key_of = {node: key for key, node in g.scoped_keys(gm_whole.graph.nodes, owner).items()}
    output = next(n for n in local.graph.nodes if n.op == "output")

    def local_node(node: fx.Node) -> fx.Node:
        if node not in key_of:
            return output
        if key_of[node] not in local_by_key:  # a block inside it that got SE first changed its graph
            raise _CannotRebuild("it holds another block that got SE, which changed its graph")
        return local_by_key[key_of[node]]
    prefix = f"{owner}." if owner else ""
    for site in sites:
        if site.slot is not None:  # the empty attention slot the block replaces leaves the graph
            slot = local_node(site.slot)
            slot.replace_all_uses_with(L.feature_input(slot) or output)
            local.graph.erase_node(slot)
        consumers = [local_node(c) for c in site.consumers]
        if site.producer in key_of:
            producer = local_node(site.producer)
        else:  # the block's input: the consumer's argument in the block's own graph
            inside = next(c for c in site.consumers if c in key_of)
            producer = local_node(inside).all_input_nodes[inside.all_input_nodes.index(site.producer)]
        name = site.path[len(prefix):]
        block = _block(site, options)
        local.add_submodule(name, block)
        if not _fuse_with_sum(local, name, producer, consumers):
            order = {n: i for i, n in enumerate(local.graph.nodes)}
            with local.graph.inserting_before(min(consumers, key=order.__getitem__)):
                se = local.graph.call_module(name, (producer,))
            for consumer in consumers:
                consumer.replace_input_with(producer, se)
    local.graph.lint()
    local.recompile()
    _keep_members(module, local, owner)
    if not owner:
        for attr in ("pretrained_cfg", "default_cfg", "num_classes", "feature_info"):
            if hasattr(module, attr):
                setattr(local, attr, getattr(module, attr))
    return _set_submodule(model, owner, local)


def _block(site: Site, options: SEOptions) -> SiteBlock:
    if options.block == "scale":
        return ChannelScale(site.channels)
    block = SqueezeExcite(site.channels, site.reduced_channels, options.squeeze, options.gate)
    if options.init in PRESERVING:
        block.init_identity()
    return block


def _fuse_with_sum(local: fx.GraphModule, name: str, producer: fx.Node, consumers: list[fx.Node]) -> bool:
    """Where the SE output only flows (through drop-path) into a residual sum, compute the scale and the sum as
    one ``addcmul`` inside the SE call: one pass over the feature map instead of two. The state_dict is unchanged.
    """
    if len(consumers) != 1 or len(producer.users) != 1:
        return False
    chain, node = [], consumers[0]
    while node.op == "call_module" and len(node.users) == 1 and \
            isinstance(local.get_submodule(g.target(node)), (nn.Identity, *L.per_sample_drops())):
        chain.append(node)
        node = next(iter(node.users))
    add, branch_end = node, (chain[-1] if chain else producer)
    if not g.is_call(add, g.ADD_TARGETS) or len(add.args) != 2 or add.kwargs or \
            sum(a is branch_end for a in add.args) != 1:
        return False
    shortcut = add.args[1] if add.args[0] is branch_end else add.args[0]
    drops = [n for n in chain if not isinstance(local.get_submodule(g.target(n)), nn.Identity)]
    if len(drops) > 1 or not isinstance(shortcut, fx.Node):
        return False
    with local.graph.inserting_before(add):
        factor: tuple[fx.Node, ...] = ()
        if drops:  # drop-path's per-sample draw, computed in the graph: the block takes tensors only
            size = local.graph.call_method("size", (producer, 0))
            # at least fp32 (a bf16 1/keep_prob is off by 1e-3), and fp64 in a float64 model
            dtype = local.graph.call_function(torch.promote_types, (
                local.graph.call_function(getattr, (producer, "dtype")), torch.float32))
            ones = local.graph.call_method("new_ones", (producer, (size, 1, 1, 1)), {"dtype": dtype})
            factor = (local.graph.call_module(g.target(drops[0]), (ones,)),)
        fused = local.graph.call_module(name, (producer, shortcut, *factor))
    add.replace_all_uses_with(fused)
    local.graph.erase_node(add)
    for node in reversed(chain):
        local.graph.erase_node(node)
    return True


# ---------------------------------------------------------------- taking blocks out again


# ---------------------------------------------------------------- the same computation, SE aside


def _computation(graph: fx.Graph, root: nn.Module) -> Counter:
    """What a graph computes, counted by (operation, number of graph values it takes): SE blocks and no-ops left
    out, a fused SE block counted as the sum it took over (its drop-path stays a call of its own). A sum of a
    feature map and a missing shortcut (None) counts differently from a sum of two feature maps."""
    ops: Counter = Counter()
    helpers = set()  # the ones that a fused block's drop-path factor is drawn on, and their size
    for node in graph.nodes:
        if isinstance(g.called_module(root, node), SiteBlock) and len(node.args) > 2:
            producer = node.args[0]
            helpers |= g.ancestors(node.args[2]) - g.ancestors(producer) - {producer}
    for node in graph.nodes:
        inputs = len(node.all_input_nodes)
        if node in helpers:
            continue
        if node.op == "call_module":
            m = root.get_submodule(node.target)
            if isinstance(m, SiteBlock):
                ops.update([("add", 2)] * (len(node.args) >= 2 and isinstance(node.args[1], fx.Node)))
            elif not isinstance(m, nn.Identity):
                ops[(type(m).__name__, inputs)] += 1
        elif node.op in ("call_function", "call_method"):
            if node.target is torch.fx._symbolic_trace._assert_is_none:
                continue
            name = "add" if node.target in g.ADD_TARGETS else getattr(node.target, "__name__", str(node.target))
            ops[(name, inputs)] += 1
    return ops


def _check_same_computation(original: fx.GraphModule, converted: nn.Module) -> None:
    """Refuse a conversion that lost or gained an operation of the original: it would be timed and counted as
    if it were the model with SE, and its fine-tuning would start from a different function."""
    before, after = _computation(original.graph, original), _computation(g.trace_graph(converted), converted)
    if before != after:
        lost = before - after
        gained = after - before
        what = ", ".join([f"lost {n}({i}) x{k}" for (n, i), k in lost.items()] +
                         [f"gained {n}({i}) x{k}" for (n, i), k in gained.items()])
        raise SeifyError(f"converting {type(converted).__name__} changed what it computes beyond the SE blocks "
                         f"({what}); seify cannot convert this model exactly yet, please report it (leave the "
                         "blocks concerned out with {exclude})", "exclude")
