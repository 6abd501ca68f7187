"""Where SE blocks go, found on a model's fx graph: the paper's placements (Sec. 3.3) and variants (Tables 14-15).

A site is an edge of the graph: a producer node whose output the SE block rescales, and the consumers that read
the rescaled value instead. The placements:

- ``residual``: on the non-identity branch of each residual sum, before the sum (SE-ResNet). A residual sum adds
  a branch to its block's input or a projection of it, not two parts of one branch (Res2Net's inner sums).
- ``module``: on the output of each multi-branch module (the concat of an Inception module, a ShuffleNet unit),
  and of each innermost block of two or more convolutions (a MobileNet depthwise-separable block).
- ``activation``: after each nonlinearity that follows a convolution (SE-VGG).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from itertools import combinations

import torch
import torch.fx as fx
from torch import nn

from . import graph as g
from . import layers as L
from .gates import is_channel_gate
from .options import SEOptions
from .se import SiteBlock, reduced_channels

_SLOTS = ("se", "attn", "attn_last")  # empty (Identity) attention slots that timm's blocks keep for SE


@dataclass
class Site:
    """One site's block (SE, or a scale and shift): where it goes, what it costs, and how its fresh gate was made
    an identity."""
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
    block: str = "se"
    producer: fx.Node | None = field(default=None, repr=False, compare=False)
    consumers: list = field(default_factory=list, repr=False, compare=False)
    slot: fx.Node | None = field(default=None, repr=False, compare=False)  # the Identity the block replaces

    @property
    def params(self) -> int:
        c, r = self.channels, self.reduced_channels
        return 2 * c if self.block == "scale" else 2 * c * r + r + c

    def to_dict(self) -> dict:
        keys = ("path", "owner", "kind", "after", "stage", "channels", "reduced_channels", "params",
                "height", "width", "compensation", "skipped", "block")
        return {k: getattr(self, k) for k in keys}


# ---------------------------------------------------------------- residual sums


def _residual_edges(gm: fx.GraphModule, variant: str):
    """(owner, producer, consumers) for each sum of a convolutional branch and its block's input."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for add in gm.graph.nodes:
        if isinstance(g.called_module(gm, add), SiteBlock) and len(add.args) >= 2:
            yield g.owner(add), add.args[0], [add]  # a sum already fused into an SE block (gated, so skipped)
            continue
        if not g.is_call(add, g.ADD_TARGETS) or len(add.args) < 2:
            continue
        a, b = add.args[0], add.args[1]
        out = g.shape(add)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or out is None or len(out) != 4 \
                or g.shape(a) != out or g.shape(b) != out:
            continue
        anc_a, anc_b = g.ancestors(a) | {a}, g.ancestors(b) | {b}
        convs_a = sum(L.is_conv(n, gm) for n in anc_a - anc_b)
        convs_b = sum(L.is_conv(n, gm) for n in anc_b - anc_a)
        if convs_a > convs_b and convs_b <= 1:
            branch, shortcut, anc_branch, anc_short = a, b, anc_a, anc_b
        elif convs_b > convs_a and convs_a <= 1:
            branch, shortcut, anc_branch, anc_short = b, a, anc_b, anc_a
        else:
            continue
        if not _adds_block_input(add, anc_branch & anc_short, order, gm):
            continue
        edge = _variant_edge(variant, add, branch, shortcut, anc_branch, anc_short, order, gm)
        if edge is not None:
            yield (g.owner(add), *edge)


def _adds_block_input(add: fx.Node, common: set[fx.Node], order: dict, root: nn.Module) -> bool:
    """True where the two operands part at the block's input (through norms and activations only, as in
    pre-activation blocks), not inside the block: Res2Net's ``sp + spx[i]`` parts after a convolution."""
    scope = g.owner(add)
    if not scope or not common:
        return True
    node: fx.Node | None = max(common, key=order.__getitem__)
    while node is not None and g.in_scope(node, scope) and \
            (L.is_norm(node, root) or L.is_activation(node, root) or L.is_transparent(node, root)
             or L.is_constant_scale(node)):
        node = L.feature_input(node)
    return node is None or not g.in_scope(node, scope)


def _variant_edge(variant, add, branch, shortcut, anc_branch, anc_short, order, gm):
    """(producer, consumers) of the paper's integration variants (Table 14) and SE-3x3 (Table 15)."""
    if variant == "standard":
        producer, consumer = _skip_transparent(branch, add, gm)
        return producer, [consumer]
    if variant == "identity":
        producer, consumer = _skip_transparent(shortcut, add, gm)
        return producer, [consumer]
    if variant == "pre":
        split = max(anc_branch & anc_short, key=order.__getitem__)
        consumers = [u for u in split.users if u in anc_branch and u not in anc_short]
        return (split, consumers) if consumers else None
    if variant == "3x3":
        spatial = [n for n in anc_branch - anc_short if L.kernel_area(n, gm) > 1]
        if not spatial:
            return None
        producer = node = max(spatial, key=order.__getitem__)
        while len(node.users) == 1 and (_normalises(next(iter(node.users)), gm) or
                                        L.is_transparent(next(iter(node.users)), gm)):
            node = next(iter(node.users))
            producer = node if _normalises(node, gm) else producer  # after its norm and activation
        return producer, list(producer.users)
    users = list(add.users)  # post: after the sum and the activation that follows it
    producer = users[0] if len(users) == 1 and L.is_activation(users[0], gm) else add
    return producer, list(producer.users)


def _normalises(node: fx.Node, root: nn.Module) -> bool:
    return L.is_norm(node, root) or L.is_activation(node, root)


def _skip_transparent(node: fx.Node, consumer: fx.Node, root: nn.Module):
    """Back from a sum's operand to the branch's last layer: SE goes before drop-path, dropout and a constant
    scale (``out * alpha`` in normalizer-free ResNets)."""
    while (L.is_transparent(node, root) or L.is_constant_scale(node)) and len(node.users) == 1:
        before = L.feature_input(node)
        if before is None:
            break
        node, consumer = before, node
    return node, consumer


# ---------------------------------------------------------------- activations and modules


def _activation_edges(gm: fx.GraphModule):
    for node in gm.graph.nodes:
        s = g.shape(node)
        if s is not None and len(s) == 4 and s[2] * s[3] > 1 and L.is_activation(node, gm) \
                and L.follows_conv(node, gm):
            yield g.owner(node), node, list(node.users)


def _scope_nodes(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Module path -> the calls made inside it (its own submodule calls included)."""
    scopes: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        stack = g.module_stack(node)
        if node.op == "call_module" and stack and stack[-1] == node.target:
            stack = stack[:-1]
        for path in stack:
            scopes.setdefault(path, []).append(node)
    return scopes


def _module_output(nodes: list[fx.Node]) -> fx.Node | None:
    """The one 4-d feature map a module hands on, or None (several outputs, or not a feature map)."""
    inside = set(nodes)
    leaving = [n for n in nodes if any(u not in inside for u in n.users)]
    if len(leaving) != 1:
        return None
    s = g.shape(leaving[0])
    return leaving[0] if s is not None and len(s) == 4 and s[2] * s[3] > 1 else None


def _concat_before(node: fx.Node | None, inside: set[fx.Node], root: nn.Module) -> fx.Node | None:
    """The channel concat a module's output comes from, through norms, activations and channel shuffles."""
    while node is not None and node in inside:
        if g.is_call(node, {torch.cat, torch.concat, "cat"}):
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            return node if dim in (1, -3) else None
        if not (_normalises(node, root) or L.is_transparent(node, root) or g.is_call(node, L.REARRANGING)):
            return None
        node = L.feature_input(node)
    return None


def _is_multi_branch(cat: fx.Node, inside: set[fx.Node], root: nn.Module) -> bool:
    """Two inputs computed apart (neither from the other), and a convolution in at least one: Inception's and
    NASNet's modules; DenseNet's concat of a chain of features is not one."""
    listed = cat.args[0] if cat.args else []
    parts = [p for p in listed if isinstance(p, fx.Node)] if isinstance(listed, (list, tuple)) else []
    ancestry = {p: g.ancestors(p) | {p} for p in parts}
    if not any(a not in ancestry[b] and b not in ancestry[a] for a, b in combinations(parts, 2)):
        return False
    return any(any(L.is_conv(n, root) for n in ancestry[p] & inside) for p in parts)


def _module_edges(gm: fx.GraphModule) -> tuple[list, list]:
    """(multi-branch module edges, convolution-block edges), each (module, its output, the output's users)."""
    scopes = _scope_nodes(gm)
    multi: dict[str, fx.Node] = {}
    blocks: dict[str, fx.Node] = {}
    for path, nodes in sorted(scopes.items(), key=lambda item: -item[0].count(".")):  # innermost first
        output = _module_output(nodes)
        if output is None:
            continue
        if output in multi.values() or output in blocks.values():
            continue  # a container whose output is its last module's: the SE block belongs to that module
        cat = _concat_before(output, set(nodes), gm)
        if cat is not None and _is_multi_branch(cat, set(nodes), gm):
            multi[path] = output
        elif sum(L.is_conv(n, gm) for n in nodes) >= 2:
            blocks[path] = output
    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")
    innermost = {p: out for p, out in blocks.items()
                 if not any(q.startswith(p + ".") for q in blocks) and not any(related(p, m) for m in multi)}
    return [(p, out, list(out.users)) for p, out in multi.items()], \
        [(p, out, list(out.users)) for p, out in innermost.items()]


# ---------------------------------------------------------------- naming, stages, gates


def _label(node: fx.Node) -> str:
    return g.target(node) if node.op == "call_module" else node.name


def stage_of(path: str, height: int, input_height: int, feature_info) -> int:
    """log2 of the stride at the site: the paper's convN_x for ResNets (conv2_x, layer1, is stage 2)."""
    for info in feature_info:
        if path == info["module"] or path.startswith(info["module"] + "."):
            return round(math.log2(info["reduction"]))
    return round(math.log2(input_height / height))


def feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    return [i for i in info if "module" in i and "reduction" in i] if isinstance(info, list) else []


def _gated_scopes(gm: fx.GraphModule) -> dict[str, str]:
    """Module path -> path of the gate inside it, for every module that already holds a channel gate."""
    gated: dict[str, str] = {}
    for node in gm.graph.nodes:
        is_ours = isinstance(g.called_module(gm, node), SiteBlock)
        if is_ours or is_channel_gate(node):
            where = g.target(node) if is_ours else g.owner(node)
            for scope in g.module_stack(node):
                gated.setdefault(scope, where)
            if not g.module_stack(node):
                gated.setdefault("", where)
    return gated


def _slot(consumers: list[fx.Node], root: nn.Module) -> fx.Node | None:
    """An empty attention slot (an Identity named se/attn/attn_last) right after the site, through identities:
    the SE block takes its place, so the converted state_dict matches timm's native SE twin."""
    node = consumers[0] if len(consumers) == 1 else None
    while node is not None and isinstance(g.called_module(root, node), nn.Identity):
        if g.target(node).rsplit(".", 1)[-1] in _SLOTS:
            return node
        node = next(iter(node.users)) if len(node.users) == 1 else None
    return None


def _se_name(model: nn.Module, owner: str, kind: str, producer: fx.Node, taken: set[str]) -> str:
    """``se`` for a residual or module site (as in timm's SE nets), ``se_<what it follows>`` for an activation."""
    prefix = f"{owner}." if owner else ""
    module = model.get_submodule(owner) if owner else model
    if kind != "activation":
        base = "se"
    else:
        rel = _label(producer)
        rel = rel[len(prefix):] if rel.startswith(prefix) else rel
        base = "se_" + rel.replace(".", "_").replace("-", "_")
    name, k = base, 1
    while prefix + name in taken or getattr(module, name, None) is not None:
        k += 1
        name = f"{base}{k}" if kind != "activation" else f"{base}_{k}"
    taken.add(prefix + name)
    return prefix + name


def _placement(options: SEOptions, gm: fx.GraphModule) -> tuple[str, list]:
    """The placement and its edges. ``auto``: module where multi-branch modules (Inception's, NASNet's cells)
    outnumber residual sums, residual where the model has residual sums, activation otherwise (VGG)."""
    residual = list(_residual_edges(gm, options.variant)) if options.at in ("auto", "residual") else []
    multi, blocks = _module_edges(gm) if options.at in ("auto", "module") else ([], [])
    if options.at == "residual" or (options.at == "auto" and residual and 2 * len(residual) >= len(multi)):
        return "residual", residual
    if options.at == "module" or (options.at == "auto" and len(multi) >= 2):
        order = {n: i for i, n in enumerate(gm.graph.nodes)}
        return "module", sorted(multi + blocks, key=lambda edge: order[edge[1]])
    return "activation", list(_activation_edges(gm))


def find_sites(model: nn.Module, options: SEOptions, input_size: tuple[int, int, int]):
    """Trace ``model`` and return (graph, placement used, sites): every site, skipped ones marked."""
    gm = g.trace_with_shapes(model, input_size)
    placement, edges = _placement(options, gm)
    gated = _gated_scopes(gm)
    info = feature_info(model)
    include = re.compile(options.include) if options.include else None
    exclude = re.compile(options.exclude) if options.exclude else None
    sites, taken, seen = [], set(), set()
    for owner, producer, consumers in edges:
        if (producer, tuple(consumers)) in seen:
            continue
        seen.add((producer, tuple(consumers)))
        slot = _slot(consumers, gm)
        slot_input = L.feature_input(slot) if slot is not None else None
        if slot is not None and slot_input is not None:
            producer, consumers = slot_input, list(slot.users)
            path = g.target(slot)
            owner = path.rpartition(".")[0]  # the block that holds the slot, which the producer may not be
            taken.add(path)
        else:
            path = _se_name(model, owner, placement, producer, taken)
        _, channels, height, width = g.shape(producer) or (0, 0, 0, 0)
        stage = stage_of(path, height, input_size[1], info)
        if (options.stages is not None and stage not in options.stages) \
                or (include and not include.search(path)) or (exclude and exclude.search(path)):
            continue
        rd = reduced_channels(channels, options.reduction, options.divisor, options.min_channels) \
            if options.block == "se" else 0
        gate = gated.get(owner)
        skipped = f"already gated by '{gate}'" if gate is not None else None
        sites.append(Site(path, owner, placement, _label(producer), stage, channels, rd, height, width,
                          skipped=skipped, block=options.block, producer=producer, consumers=consumers,
                          slot=slot))
    return gm, placement, sites

