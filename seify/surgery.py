"""Finding SE insertion sites on a model's fx graph and inserting SE blocks there, preserving its function.

A site is an edge of the graph: a producer node whose output the SE block rescales, and the consumers that
read the rescaled value instead. Sites are found on a trace of the whole model, then each block that owns
sites is traced alone, edited and swapped in as a GraphModule, so the model keeps its class, its methods
(``forward_features``, ``reset_classifier``) and every state_dict key it had.
"""
from __future__ import annotations

import copy
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import graph as g
from .errors import SeifyError
from .options import SEOptions
from .se import SqueezeExcite, reduced_channels

@dataclass
class Site:
    """One SE block: where it goes, what it costs, and how its fresh gate was made an identity."""
    path: str
    owner: str
    kind: str
    after: str
    stage: int
    channels: int
    reduced_channels: int
    height: int
    width: int
    skipped: str | None = None
    compensation: str = ""
    producer: fx.Node | None = field(default=None, repr=False, compare=False)
    consumers: list = field(default_factory=list, repr=False, compare=False)

    @property
    def params(self) -> int:
        c, r = self.channels, self.reduced_channels
        return 2 * c * r + r + c

    def to_dict(self) -> dict:
        keys = ("path", "owner", "kind", "after", "stage", "channels", "reduced_channels", "params",
                "height", "width", "compensation", "skipped")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Conversion:
    model: nn.Module
    sites: list[Site]
    skipped: list[Site]
    placement: str
    options: SEOptions
    input_size: tuple[int, int, int]

    @property
    def added_params(self) -> int:
        return sum(s.params for s in self.sites)


# ---------------------------------------------------------------- what kind of call a node is

_TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout2d)
_POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_LINEAR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_GATE_ACTIVATIONS = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.MultiheadAttention)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu, F.mish, torch.relu,
                         "relu", "relu_"}
_SHAPE_METHODS = {"permute", "reshape", "view", "contiguous", "flatten"}
_SCALE_PASSING_FUNCTIONS = {F.relu, torch.relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                            torch.flatten, "relu", "relu_", *_SHAPE_METHODS}
_SCALE_PASSING_MODULES = (*_POSITIVE_HOMOGENEOUS, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


def _drop_layers():
    from timm.layers import DropBlock2d
    return (*_per_sample_drops(), DropBlock2d)


def _is_transparent(node: fx.Node, root: nn.Module) -> bool:
    """Identity in eval: drop-path, dropout, identity modules that sit between a branch and its sum."""
    return isinstance(g.called_module(root, node), (*_TRANSPARENT, *_drop_layers())) or \
        g.is_call(node, {F.dropout})


def _is_conv(node: fx.Node, root: nn.Module) -> bool:
    return isinstance(g.called_module(root, node), nn.modules.conv._ConvNd) or g.is_call(node, {F.conv2d})


def _norm_act(m: nn.Module | None) -> bool:
    """timm's fused norm + activation layers (BatchNormAct2d and friends)."""
    return isinstance(m, _NORMS) and isinstance(getattr(m, "act", None), nn.Module)


def _is_activation(node: fx.Node, root: nn.Module) -> bool:
    m = g.called_module(root, node)
    if m is None:
        return g.is_call(node, _ACTIVATION_FUNCTIONS)
    if _norm_act(m):
        return not isinstance(m.act, nn.Identity)
    return type(m).__module__ in ("torch.nn.modules.activation", "timm.layers.activations",
                                  "timm.layers.activations_me") and not isinstance(m, _GATE_ACTIVATIONS)


def _is_norm(node: fx.Node, root: nn.Module) -> bool:
    return isinstance(g.called_module(root, node), _NORMS) or \
        g.is_call(node, {F.batch_norm, F.layer_norm, F.group_norm})


def _feature_input(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, fx.Node) else None


def _follows_conv(act: fx.Node, root: nn.Module) -> bool:
    """True where the activation's input comes from a convolution, through norms and identities only."""
    node = _feature_input(act)
    while node is not None and (_is_norm(node, root) or _is_transparent(node, root)):
        node = _feature_input(node)
    return node is not None and _is_conv(node, root)


def _is_channel_gate(node: fx.Node) -> bool:
    """x * s with s (N, C, 1, 1) computed from x: an SE-style gate already in the model."""
    if not g.is_call(node, g.MUL_TARGETS):
        return False
    ins = g.tensor_inputs(node)
    if len(ins) != 2:
        return False
    for x, s in (ins, ins[::-1]):
        xs, ss = g.shape(x), g.shape(s)
        if len(xs) == 4 and len(ss) == 4 and ss[1] == xs[1] and ss[2:] == (1, 1) and xs[2] * xs[3] > 1 \
                and x in g.ancestors(s):
            return True
    return False


# ---------------------------------------------------------------- finding sites


def _residual_edges(gm: fx.GraphModule, variant: str):
    """(owner, producer, consumers, after) for each sum of a convolutional branch and a shortcut."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for add in gm.graph.nodes:
        if isinstance(g.called_module(gm, add), SqueezeExcite) and len(add.args) >= 2:
            yield add, add.args[0], [add]  # a sum seify already fused into its SE block (gated, so skipped)
            continue
        if not g.is_call(add, g.ADD_TARGETS) or len(add.args) < 2:
            continue
        a, b = add.args[0], add.args[1]
        out = g.shape(add)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or out is None or len(out) != 4 \
                or g.shape(a) != out or g.shape(b) != out:
            continue
        anc_a, anc_b = g.ancestors(a) | {a}, g.ancestors(b) | {b}
        convs_a = sum(_is_conv(n, gm) for n in anc_a - anc_b)
        convs_b = sum(_is_conv(n, gm) for n in anc_b - anc_a)
        if convs_a > convs_b and convs_b <= 1:
            branch, shortcut, anc_branch, anc_short = a, b, anc_a, anc_b
        elif convs_b > convs_a and convs_a <= 1:
            branch, shortcut, anc_branch, anc_short = b, a, anc_b, anc_a
        else:
            continue
        if variant == "standard":
            producer, consumer = _skip_transparent(branch, add, gm)
            yield add, producer, [consumer]
        elif variant == "identity":
            producer, consumer = _skip_transparent(shortcut, add, gm)
            yield add, producer, [consumer]
        elif variant == "pre":
            split = max(anc_branch & anc_short, key=order.__getitem__)
            consumers = [u for u in split.users if u in anc_branch and u not in anc_short]
            if consumers:
                yield add, split, consumers
        else:
            users = list(add.users)
            producer = users[0] if len(users) == 1 and _is_activation(users[0], gm) else add
            yield add, producer, list(producer.users)


def _skip_transparent(node: fx.Node, consumer: fx.Node, root: nn.Module):
    while _is_transparent(node, root) and len(node.users) == 1:
        node, consumer = _feature_input(node), node
    return node, consumer


def _activation_edges(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        s = g.shape(node)
        if s is not None and len(s) == 4 and s[2] * s[3] > 1 and _is_activation(node, gm) \
                and _follows_conv(node, gm):
            yield node, node, list(node.users)


def _label(node: fx.Node) -> str:
    return node.target if node.op == "call_module" else node.name


def _stage_of(path: str, height: int, input_height: int, feature_info) -> int:
    """The paper's stage numbering (conv2_x is stage 2): log2 of the stage's spatial reduction."""
    for info in feature_info:
        if path == info["module"] or path.startswith(info["module"] + "."):
            return round(math.log2(info["reduction"]))
    return round(math.log2(input_height / height))


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    return [i for i in info if "module" in i and "reduction" in i] if isinstance(info, list) else []


def _gated_scopes(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> path of the gate inside it, for every module that already holds a channel gate."""
    gated = {}
    for node in gm.graph.nodes:
        is_ours = isinstance(g.called_module(gm, node), SqueezeExcite)
        if is_ours or _is_channel_gate(node):
            where = node.target if is_ours else g.owner(node)
            for scope in g.module_stack(node):
                gated.setdefault(scope, where)
            if not g.module_stack(node):
                gated.setdefault("", where)
    return gated


def _se_name(model: nn.Module, owner: str, kind: str, producer: fx.Node, taken: set[str]) -> str:
    """``se`` for a residual site (as in timm's SE nets), ``se_<what it follows>`` for an activation site."""
    prefix = f"{owner}." if owner else ""
    module = model.get_submodule(owner) if owner else model
    if kind == "residual":
        base = "se"
    else:
        rel = _label(producer)
        rel = rel[len(prefix):] if rel.startswith(prefix) else rel
        base = "se_" + rel.replace(".", "_").replace("-", "_")
    name, k = base, 1
    while prefix + name in taken or getattr(module, name, None) is not None:
        k += 1
        name = f"{base}{k}" if kind == "residual" else f"{base}_{k}"
    taken.add(prefix + name)
    return prefix + name


def find_sites(model: nn.Module, options: SEOptions, input_size: tuple[int, int, int]):
    """Trace ``model`` and return (graph, placement used, sites): every site, skipped ones marked."""
    gm = g.trace_with_shapes(model, input_size)
    residual = list(_residual_edges(gm, options.variant))
    placement = options.at if options.at != "auto" else ("residual" if residual else "activation")
    if placement == "residual":
        edges, kind = residual, "residual"
    else:
        edges, kind = list(_activation_edges(gm)), "activation"
    gated = _gated_scopes(gm)
    info = _feature_info(model)
    include = re.compile(options.include) if options.include else None
    exclude = re.compile(options.exclude) if options.exclude else None
    sites, taken, seen = [], set(), set()
    for anchor, producer, consumers in edges:
        if (producer, tuple(consumers)) in seen:
            continue
        seen.add((producer, tuple(consumers)))
        owner = g.owner(anchor)
        _, channels, height, width = g.shape(producer)
        path = _se_name(model, owner, kind, producer, taken)
        stage = _stage_of(path, height, input_size[1], info)
        if (options.stages is not None and stage not in options.stages) \
                or (include and not include.search(path)) or (exclude and exclude.search(path)):
            continue
        rd = reduced_channels(channels, options.reduction, options.divisor, options.min_channels)
        gate = gated.get(owner)
        skipped = f"already gated by '{gate}'" if gate is not None else None
        sites.append(Site(path, owner, kind, _label(producer), stage, channels, rd, height, width,
                          skipped=skipped, producer=producer, consumers=consumers))
    return gm, placement, sites


# ---------------------------------------------------------------- inserting blocks


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> nn.Module:
    if not path:
        return module
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, module)
    return model


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


def _trace_block(module: nn.Module, path: str) -> fx.GraphModule:
    """The block's graph, traced in eval mode; refused if its traced code depends on the mode."""
    module.train()
    try:
        train_code = fx.GraphModule(module, g.SeifyTracer().trace(module)).code
    finally:
        module.eval()
    local = g.trace(module)
    if train_code != local.code:
        raise SeifyError(f"cannot insert SE into '{path or 'model'}': its forward branches on training mode; "
                         "exclude it with {exclude}", "exclude")
    return local


def _rebuild_owner(model: nn.Module, gm_whole: fx.GraphModule, owner: str, sites: list[Site],
                   options: SEOptions) -> nn.Module:
    module = model.get_submodule(owner) if owner else model
    local = _trace_block(module, owner)
    local_by_key = g.scoped_keys(local.graph.nodes, "")
    key_of = {node: key for key, node in g.scoped_keys(gm_whole.graph.nodes, owner).items()}
    output = next(n for n in local.graph.nodes if n.op == "output")
    order = {n: i for i, n in enumerate(local.graph.nodes)}
    prefix = f"{owner}." if owner else ""
    for site in sites:
        consumers = [local_by_key[key_of[c]] if c in key_of else output for c in site.consumers]
        if site.producer in key_of:
            producer = local_by_key[key_of[site.producer]]
        else:
            inside = next(c for c in site.consumers if c in key_of)
            producer = local_by_key[key_of[inside]].all_input_nodes[inside.all_input_nodes.index(site.producer)]
        name = site.path[len(prefix):]
        block = SqueezeExcite(site.channels, site.reduced_channels, options.squeeze, options.gate)
        if options.init == "identity":
            block.init_identity()
        local.add_submodule(name, block)
        if not _fuse_with_sum(local, name, producer, consumers):
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


def _fuse_with_sum(local: fx.GraphModule, name: str, producer: fx.Node, consumers: list[fx.Node]) -> bool:
    """Where the SE output only flows (through drop-path) into a residual sum, compute the scale and the sum as
    one ``addcmul`` inside the SE call: one pass over the feature map instead of two. The state_dict is unchanged.
    """
    if len(consumers) != 1 or len(producer.users) != 1:
        return False
    chain, node = [], consumers[0]
    while node.op == "call_module" and len(node.users) == 1 and \
            isinstance(local.get_submodule(node.target), (nn.Identity, *_per_sample_drops())):
        chain.append(node)
        node = next(iter(node.users))
    add, branch_end = node, (chain[-1] if chain else producer)
    if not g.is_call(add, g.ADD_TARGETS) or len(add.args) != 2 or add.kwargs or \
            sum(a is branch_end for a in add.args) != 1:
        return False
    shortcut = add.args[1] if add.args[0] is branch_end else add.args[0]
    drops = [n for n in chain if not isinstance(local.get_submodule(n.target), nn.Identity)]
    if len(drops) > 1 or not isinstance(shortcut, fx.Node):
        return False
    with local.graph.inserting_before(add):
        drop = (local.graph.get_attr(drops[0].target),) if drops else ()
        fused = local.graph.call_module(name, (producer, shortcut, *drop))
    add.replace_all_uses_with(fused)
    local.graph.erase_node(add)
    for node in reversed(chain):
        local.graph.erase_node(node)
    return True


def _per_sample_drops():
    """Drop layers that scale each sample by one factor, so they commute with the channel-wise gate."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth
    return DropPath, StochasticDepth


# ---------------------------------------------------------------- undoing the fresh gate's 0.5


def _scalable_params(node: fx.Node, root: nn.Module, calls: Counter) -> list[str] | None:
    """Parameters that scale this call's output exactly when multiplied by 2, or None."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if calls[node.target] != 1:
            return None
        names = []
        if type(m) in _LINEAR_LAYERS:
            names = ["weight", "bias"]
        elif isinstance(m, _NORMS) and getattr(m, "weight", None) is not None:
            if _norm_act(m) and not (isinstance(m.act, _POSITIVE_HOMOGENEOUS)
                                     and isinstance(getattr(m, "drop", nn.Identity()), nn.Identity)):
                return None
            names = ["weight", "bias"]
        elif type(m).__name__ in ("LayerScale", "LayerScale2d"):
            names = ["gamma"]
        present = [f"{node.target}.{n}" for n in names if getattr(m, n, None) is not None]
        return present or None
    if g.is_call(node, g.MUL_TARGETS):
        for arg in node.all_input_nodes:
            while arg.op == "call_method" and arg.target in _SHAPE_METHODS:
                arg = arg.args[0]
            if arg.op == "get_attr" and isinstance(root.get_parameter(arg.target), nn.Parameter) \
                    and calls[arg.target] == 1:
                return [arg.target]
    return None


def _passes_scale(node: fx.Node, root: nn.Module) -> bool:
    """f(2x) == 2 f(x) exactly, and the feature is the first argument."""
    return isinstance(g.called_module(root, node), (*_SCALE_PASSING_MODULES, *_drop_layers())) or \
        g.is_call(node, _SCALE_PASSING_FUNCTIONS)


def _fold_backward(site: Site, root: nn.Module, calls: Counter) -> list[str] | None:
    if not set(site.producer.users) <= set(site.consumers):
        return None
    node = site.producer
    while node is not None:
        params = _scalable_params(node, root, calls)
        if params:
            return params
        if not _passes_scale(node, root):
            return None
        node = _feature_input(node)
        if node is not None and len(node.users) != 1:
            return None
    return None


def _fold_forward(site: Site, root: nn.Module, calls: Counter) -> list[str] | None:
    """Consumers that are all plain linear layers: doubling their weights undoes halving their input."""
    params = []
    for c in site.consumers:
        m = g.called_module(root, c)
        if type(m) not in _LINEAR_LAYERS or calls[c.target] != 1 or _feature_input(c) is not site.producer:
            return None
        params.append(f"{c.target}.weight")
    return params


def _compensate(model: nn.Module, gm_whole: fx.GraphModule, sites: list[Site]) -> None:
    """Make every fresh gate's constant 0.5 an exact identity: fold x2 into a neighbour, else scale the gate."""
    calls = Counter(n.target for n in gm_whole.graph.nodes if n.op in ("call_module", "get_attr"))
    scaled: set[str] = set()
    for site in sites:
        for fold in (_fold_backward, _fold_forward):
            params = fold(site, gm_whole, calls)
            if params and not scaled & set(params):
                with torch.no_grad():
                    for name in params:
                        model.get_parameter(name).mul_(2.0)
                scaled.update(params)
                owners = {p.rsplit(".", 1)[0] if p.endswith((".weight", ".bias")) else p for p in params}
                site.compensation = "x2 folded into " + ", ".join(sorted(owners))
                break
        else:
            model.get_submodule(site.path).scale = 2.0
            site.compensation = "gate scaled x2"


def convert(model: nn.Module, options: SEOptions, input_size: tuple[int, int, int]) -> Conversion:
    """Return a copy of ``model`` (eval mode) with SE blocks at every site ``options`` selects.

    With ``init='identity'`` (the default) the copy computes exactly what ``model`` does until it is trained.
    """
    model = copy.deepcopy(model).eval()
    gm, placement, sites = find_sites(model, options, input_size)
    chosen, skipped = split_sites(model, placement, sites, options)
    by_owner = defaultdict(list)
    for site in chosen:
        by_owner[site.owner].append(site)
    for owner in sorted(by_owner, key=lambda p: (p.count(".") + bool(p)), reverse=True):
        model = _rebuild_owner(model, gm, owner, by_owner[owner], options)
    if options.init == "identity":
        _compensate(model, gm, chosen)
    return Conversion(model.eval(), chosen, skipped, placement, options, tuple(input_size))


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
                f"gate (e.g. {skipped[0].skipped.split(' ', 3)[-1]})")
    if options.stages is not None or options.include or options.exclude:
        return f"nothing to convert in {name}: no {placement} site matches {{stages}}/{{include}}/{{exclude}}"
    if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()) or placement == "activation":
        return (f"nothing to convert in {name}: it has no convolutional residual branches and no activations "
                "after convolutions (SE needs convolutional feature maps; transformers have none)")
    return f"nothing to convert in {name}: no {placement} sites found; try {{at}} activation"
