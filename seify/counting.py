"""Counting what a model costs: parameters and multiply-adds (MACs), per model and per SE block, for profile,
analyze, fold and the model cards of exported folders.

Counting runs on the meta device (no weights are allocated), so a model of any size is counted in seconds.
MACs are multiply-accumulates: the paper's "FLOPs" are MACs. We count every convolution and linear layer, and
SE's own work: one MAC per input element for the squeeze, one per element for the channel-wise scale, and the
two excitation layers. Counters that see only conv/linear miss the squeeze and scale, four fifths of SE's cost.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .errors import SeifyError, first_line
from .se import ChannelScale, SiteBlock


@dataclass
class Cost:
    params: int
    trainable: int
    macs: int
    conv_linear_macs: int


def count_macs(model: nn.Module, input_size, gates: dict[str, nn.Module] | None = None
               ) -> tuple[int, int, dict[str, int]]:
    """(all MACs, conv/linear MACs, MACs per gate) of one image through ``model``; ``gates`` are the channel gates
    to count one by one (default: seify's blocks), each with its squeeze, its excitation layers and its scale (a
    scale-and-shift block: one multiply-add per element).

    Forward hooks see every call, also inside modules that tracing treats as leaves (timm's ConvMlp).
    """
    if gates is None:
        gates = {name: m for name, m in model.named_modules() if isinstance(m, SiteBlock)}
    names = {m: path for path, m in gates.items()}
    inside_gate = {id(c): path for path, m in gates.items() for c in m.modules() if c is not m}
    conv_linear, squeeze_scale = [0], [0]
    per_block: dict[str, int] = dict.fromkeys(gates, 0)

    def on_layer(m, inputs, out):
        if isinstance(m, nn.Linear):
            macs = out[0].numel() * m.in_features
        elif not m.transposed:
            macs = out[0].numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        else:
            return
        conv_linear[0] += macs
        if id(m) in inside_gate:
            per_block[inside_gate[id(m)]] += macs

    def on_gate(m, inputs, out):
        # a gate's excitation layers count as layers; here its squeeze and its scale, or a scale and shift's one
        # multiply-add per element
        pool_scale = (1 if isinstance(m, ChannelScale) else 2) * inputs[0][0].numel()
        squeeze_scale[0] += pool_scale
        per_block[names[m]] += pool_scale

    hooks = [m.register_forward_hook(on_gate) for m in gates.values()] + \
        [m.register_forward_hook(on_layer) for m in model.modules()
         if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    param = next(model.parameters())
    try:
        with torch.no_grad():
            model.eval()(torch.zeros((1, *input_size), device=param.device, dtype=param.dtype))
    except (RuntimeError, ValueError) as e:
        if not _shape_error(e):  # a fault of ours is a bug, not the user's input
            raise
        size = "x".join(map(str, input_size))
        raise SeifyError(f"{type(model).__name__} cannot take an input of {size} "
                         f"({first_line(e)}); pass an {{input_size}} the model accepts", "input_size") from e
    finally:
        for h in hooks:
            h.remove()
    return conv_linear[0] + squeeze_scale[0], conv_linear[0], per_block


_SHAPE_WORDS = ("size", "shape", "dimension", "kernel", "expected", "channels", "match", "divisible", "too small")


def _shape_error(e: BaseException) -> bool:
    """Whether a model's forward refused its input's shape (what users can change), from torch's and timm's
    words for it."""
    text = str(e).lower()
    return any(word in text for word in _SHAPE_WORDS)


def cost(model: nn.Module, input_size, gates: dict[str, nn.Module] | None = None) -> tuple[Cost, dict[str, int]]:
    """Parameters and MACs of ``model`` for one image, and the MACs of each gate in it (``count_macs``)."""
    macs, conv_linear, per_block = count_macs(model, input_size, gates)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return Cost(params, trainable, macs, conv_linear), per_block
