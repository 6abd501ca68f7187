"""What kind of call an fx node is: convolutions, norms, activations, drop layers, existing gates.

The surgery asks these questions of nodes in a traced graph; the answers hold for timm's and torchvision's layers.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from . import graph as g

TRANSPARENT = (nn.Identity, nn.Dropout, nn.Dropout2d)
POSITIVE_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
LINEAR_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_GATE_ACTIVATIONS = (nn.Sigmoid, nn.Hardsigmoid, nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.MultiheadAttention)
_ACTIVATION_FUNCTIONS = {F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.leaky_relu, F.elu, F.mish, torch.relu,
                         "relu", "relu_"}
SHAPE_METHODS = {"permute", "reshape", "view", "contiguous", "flatten"}
REARRANGING = {*SHAPE_METHODS, "transpose", torch.transpose, torch.flatten, torch.reshape}
_SCALE_PASSING_FUNCTIONS = {F.relu, torch.relu, F.dropout, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d,
                            torch.flatten, "relu", "relu_", *SHAPE_METHODS}
_SCALE_PASSING_MODULES = (*POSITIVE_HOMOGENEOUS, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
                          nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten)


def per_sample_drops():
    """Drop layers that scale each sample by one factor, so they commute with the channel-wise gate."""
    from timm.layers import DropPath
    from torchvision.ops import StochasticDepth
    return DropPath, StochasticDepth


def drop_layers():
    from timm.layers import DropBlock2d
    return (*per_sample_drops(), DropBlock2d)


def frozen_norms():
    """Norms whose affine terms are buffers, not parameters (torchvision's detection backbones)."""
    from torchvision.ops import FrozenBatchNorm2d
    return (FrozenBatchNorm2d,)


def is_transparent(node: fx.Node, root: nn.Module) -> bool:
    """Identity in eval: drop-path, dropout, identity modules that sit between a branch and its sum."""
    return isinstance(g.called_module(root, node), (*TRANSPARENT, *drop_layers())) or g.is_call(node, {F.dropout})


def is_constant_scale(node: fx.Node) -> bool:
    """x * c or x / c for a number c: a normalizer-free ResNet's ``out * alpha`` before its residual sum."""
    if not g.is_call(node, {*g.MUL_TARGETS, operator.truediv, torch.div, "div"}) or len(node.args) != 2:
        return False
    x, c = node.args
    return isinstance(x, fx.Node) and isinstance(c, (int, float)) and not isinstance(c, bool) and \
        (c != 0 or node.target in g.MUL_TARGETS)


def is_conv(node: fx.Node, root: nn.Module) -> bool:
    return isinstance(g.called_module(root, node), nn.modules.conv._ConvNd) or g.is_call(node, {F.conv2d})


def kernel_area(node: fx.Node, root: nn.Module) -> int:
    """Spatial taps of a convolution call (9 for 3x3), 1 for anything else."""
    m = g.called_module(root, node)
    if isinstance(m, nn.modules.conv._ConvNd):
        area = 1
        for k in m.kernel_size:
            area *= k
        return area
    return 1


def norm_act(m: nn.Module | None) -> bool:
    """timm's fused norm + activation layers (BatchNormAct2d and friends)."""
    return isinstance(m, NORMS) and isinstance(getattr(m, "act", None), nn.Module)


def is_activation(node: fx.Node, root: nn.Module) -> bool:
    m = g.called_module(root, node)
    if m is None:
        return g.is_call(node, _ACTIVATION_FUNCTIONS)
    if norm_act(m):
        return not isinstance(m.act, nn.Identity)
    return type(m).__module__ in ("torch.nn.modules.activation", "timm.layers.activations",
                                  "timm.layers.activations_me") and not isinstance(m, _GATE_ACTIVATIONS)


def is_norm(node: fx.Node, root: nn.Module) -> bool:
    return isinstance(g.called_module(root, node), (*NORMS, *frozen_norms())) or \
        g.is_call(node, {F.batch_norm, F.layer_norm, F.group_norm})


def feature_input(node: fx.Node) -> fx.Node | None:
    arg = node.args[0] if node.args else None
    return arg if isinstance(arg, fx.Node) else None


def follows_conv(act: fx.Node, root: nn.Module) -> bool:
    """True where the activation's input comes from a convolution, through norms and identities only."""
    node = feature_input(act)
    while node is not None and (is_norm(node, root) or is_transparent(node, root)):
        node = feature_input(node)
    return node is not None and is_conv(node, root)


def passes_scale(node: fx.Node, root: nn.Module) -> bool:
    """f(2x) == 2 f(x) exactly, and the feature is the first argument."""
    return isinstance(g.called_module(root, node), (*_SCALE_PASSING_MODULES, *drop_layers())) or \
        g.is_call(node, _SCALE_PASSING_FUNCTIONS)
